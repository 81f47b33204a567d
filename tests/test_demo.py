"""`deitlt demo` end to end (shortened epochs): every stage runs and leaves its outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PLOTS = ("distance", "rollout", "divergence", "rank", "entropy", "per-class")
SHORT = ["--epochs", "3", "--teacher-epochs", "3", "tracking.enabled=false"]

pytestmark = pytest.mark.slow


def run_demo(out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "deitlt_scale.cli", "demo", "--out", str(out), *SHORT]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, run_demo(out)


def test_demo_runs_every_stage_and_says_where_outputs_are(demo):
    out, done = demo
    for stage in range(1, 8):
        assert f"[{stage}/7]" in done.stdout
    assert "demo finished" in done.stdout
    for path in (out / "teacher" / "teacher", out / "student", out / "export", out / "analysis"):
        assert str(path) in done.stdout


def test_demo_leaves_teacher_eval_table_and_timm_export(demo):
    out, done = demo
    assert (out / "teacher" / "teacher" / "model.safetensors").is_file()
    table = (out / "student" / "eval" / "table.txt").read_text()
    assert "overall" in table and "tail" in table and "mean" in table
    assert table.strip() in done.stdout
    assert (out / "export" / "model.safetensors").is_file()
    assert (out / "export" / "config.json").is_file()


def test_demo_scores_the_export_in_plain_timm_as_training_scored_it(demo):
    out, done = demo
    line = next(x for x in done.stdout.splitlines() if "timm's prediction" in x)
    timm_score = float(line.split("logits): ")[1].split(" overall")[0])
    trained = json.loads((out / "student" / "eval" / "latest.json").read_text())["metrics"]
    assert timm_score == round(100 * trained["mean/overall"], 1)
    assert f"row mean: {timm_score:.1f}" in line
    meta = json.loads((out / "data" / "digits-lt" / "meta.json").read_text())
    assert meta["train_counts"] == [120, 86, 61, 44, 31, 22, 16, 11, 8, 6]
    assert sum(meta["val_counts"]) == 892  # every digit neither split uses


def test_demo_student_produces_every_plot_as_a_titled_png(demo):
    out, _ = demo
    summary = json.loads((out / "analysis" / "summary.json").read_text())
    for name in PLOTS:
        entry = summary["outputs"][name]
        with Image.open(out / "analysis" / entry["png"]) as image:
            image.verify()
        assert entry["title"], f"{name} has a title"
        assert entry["axes"] and all(entry["axes"]), f"{name}: every axes is titled"


def test_demo_rerun_resumes_instead_of_retraining(demo):
    out, _ = demo
    again = run_demo(out)
    assert again.stdout.count("resumed from") == 2  # the teacher and the student
    assert "[step 1/" not in again.stdout
