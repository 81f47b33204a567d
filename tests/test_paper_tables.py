"""scripts/paper_tables.py: the paper's ablation grid as one resumable command.

The grid runs end to end, shrunk to two rows (the ViT and OOD distillation), one seed and a few
optimizer steps of a small student; every run is a real `deitlt` process on the embedded data.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "paper_tables.py"

_spec = importlib.util.spec_from_file_location("paper_tables", SCRIPT)
paper_tables = importlib.util.module_from_spec(_spec)
sys.modules["paper_tables"] = paper_tables  # dataclasses look their module up while defining
_spec.loader.exec_module(paper_tables)

SHRINK = [
    "--seeds", "0", "--rows", "vit", "ood", "--epochs", "1", "--teacher-epochs", "1",
    "--set", "model.embed_dim=48", "model.depth=2", "model.num_heads=2", "train.micro_batch=16",
    "data.epoch_multiple=16", "train.max_steps=4", "tracking.enabled=false", "data.num_threads=1",
    "--teacher-set", "train.max_steps=3", "tracking.enabled=false", "data.num_threads=1",
]  # fmt: skip
RUNS = ("teachers/ce_weak-seed0", "students/vit-seed0", "students/ood-seed0")
README = (f"# A project\n\nbefore\n{paper_tables.SUMMARY_START}\nstale figures\n"
          f"{paper_tables.SUMMARY_END}\nafter\n")  # fmt: skip


def _invoke(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), *SHRINK, *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """The shrunk grid run twice into one directory, the second time publishing into
    ``out/docs``: (out, first stdout, second stdout)."""
    out = tmp_path_factory.mktemp("paper-tables")
    first = _invoke(out).stdout
    (out / "README.md").write_text(README)
    second = _invoke(out, "--publish", str(out / "docs")).stdout
    return out, first, second


def _csv(out: Path) -> list[dict[str, str]]:
    with open(out / "tables.csv") as f:
        return list(csv.DictReader(f))


def test_the_csv_has_every_selected_row_and_head_with_percent_cells(grid):
    out, _, _ = grid
    rows = _csv(out)
    assert [(r["table"], r["row"], r["head"]) for r in rows] == [
        ("5", "vit", "cls"),
        ("5", "ood", "cls"),
        ("5", "ood", "dist"),
        ("5", "ood", "mean"),
        ("teacher", "ce_weak", "teacher"),
    ]
    for r in rows:
        assert r["seeds"] == "1"
        for group in ("overall", "head", "mid", "tail"):
            assert 0.0 <= float(r[f"{group}_mean"]) <= 100.0
            assert r[f"{group}_std"] == ""  # one seed: no standard deviation


def test_the_markdown_table_lists_each_head_with_the_papers_figure_beside_the_reported_one(grid):
    out, _, _ = grid
    md = (out / "tables.md").read_text()
    assert "| vit | CLS |" in md and "| ood | DIST |" in md
    line = next(x for x in md.splitlines() if x.startswith("| ood | mean of logits |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert all(0.0 <= float(c) <= 100.0 for c in cells[2:6])
    assert cells[6:] == ["84.5", "48.9"]  # paper Table 5, row 2: CIFAR-10-LT, CIFAR-100-LT
    assert "| ce_weak: ResNet-32, plain CE" in md
    assert "CIFAR-10-LT" in md


def test_the_budget_line_sums_the_cpu_seconds_recorded_next_to_each_run(grid):
    out, _, _ = grid
    timings = [json.loads((out / run / "paper_tables.json").read_text()) for run in RUNS]
    cpu = sum(t["cpu_s"] for t in timings)
    assert cpu > 0
    assert all(t["attempts"][0]["exit"] == 0 for t in timings)
    assert f"3 runs, {cpu:.0f} CPU seconds" in (out / "tables.md").read_text()
    assert "Budget: 4 optimizer steps per student run" in (out / "tables.md").read_text()


def test_the_plots_are_png_images(grid):
    import matplotlib.image as mpimg

    out, _, _ = grid
    path = out / "plots" / "rows.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = mpimg.imread(path).shape
    assert height > 100 and width > 100


def test_the_per_class_plot_draws_the_three_heads_of_a_distilled_rows_runs(grid, tmp_path):
    import matplotlib.image as mpimg

    out, _, _ = grid
    row = paper_tables.ROWS["ood"]
    run = paper_tables.Run("ood", 0, ("train",), "recipes/tiny_digits.yaml", [],
                           out / "students" / "ood-seed0")  # fmt: skip
    students = {"ood": paper_tables.aggregate([paper_tables.metrics(run)])}
    written = paper_tables.write_plots(tmp_path, [row], students, [run], out / "digits-lt")
    assert [p.name for p in written] == ["rows.png", "ood_per_class.png"]
    assert mpimg.imread(written[1]).shape[2] in (3, 4)


def test_the_rows_listing_gives_the_exact_command_of_every_run(grid):
    out, _, _ = grid
    listing = (out / "rows.md").read_text()
    commands = [shlex.split(x) for x in listing.splitlines() if x.startswith("deitlt ")]
    recorded = [
        json.loads((out / run / "paper_tables.json").read_text())["command"] for run in RUNS
    ]
    data = ["deitlt", "data", "prepare", "digits-lt", "--out", str(out / "digits-lt")]
    assert commands == [data, *recorded]
    vit, ood = recorded[1], recorded[2]
    assert {"distill.type=none", "model.distilled=false", "distill.drw_epoch=null"} <= set(vit)
    assert f"teacher.path={out / 'teachers' / 'ce_weak-seed0' / 'teacher'}" in ood
    assert sum(x.startswith("distill.drw_epoch=") for x in ood) == 1  # stated once per key


def test_a_second_invocation_skips_every_completed_run(grid):
    out, first, second = grid
    progress = [line.split(": ", 1)[1] for line in first.splitlines() if line.startswith("[")]
    assert len(progress) == 3 and all(p.startswith("done in") for p in progress)
    again = [line.split(": ", 1)[1] for line in second.splitlines() if line.startswith("[")]
    assert len(again) == 3 and all(p.startswith("skipped (complete)") for p in again)
    assert "data digits-lt" not in second
    for run in RUNS:
        assert len(json.loads((out / run / "paper_tables.json").read_text())["attempts"]) == 1


def test_publishing_writes_the_tables_as_the_results_page_with_its_plots_beside_it(grid):
    out, _, second = grid
    page = (out / "docs" / "results.md").read_text()
    assert f"published {out / 'docs' / 'results.md'}" in second
    assert page == (out / "tables.md").read_text().replace("](plots/", "](img/paper-tables/")
    assert "](img/paper-tables/rows.png)" in page
    copied = out / "docs" / "img" / "paper-tables" / "rows.png"
    assert copied.read_bytes() == (out / "plots" / "rows.png").read_bytes()


def test_publishing_puts_the_summary_between_the_readmes_markers_and_nothing_else(grid):
    out, _, second = grid
    summary = (out / "summary.md").read_text().strip()
    assert summary.startswith("On digits-lt over 1 seed(s); 0 of the paper's 0 claims tested")
    assert f"published {out / 'README.md'}" in second
    assert (out / "README.md").read_text() == README.replace("stale figures", summary)


def test_the_tables_name_the_command_the_machine_and_the_dates_of_the_runs(grid):
    out, _, _ = grid
    md = (out / "tables.md").read_text()
    command = next(x for x in md.splitlines() if x.startswith("Command: "))
    assert command.startswith(f"Command: `python scripts/paper_tables.py --out {out} --seeds 0")
    assert command.endswith(f"--publish {out / 'docs'}`")
    machine = next(x for x in md.splitlines() if x.startswith("Machine: "))
    assert f"{os.cpu_count()} CPU cores" in machine and "torch " in machine and "DALI " in machine
    ended = json.loads((out / RUNS[0] / "paper_tables.json").read_text())["attempts"][0]["ended"]
    assert f"Runs ended {ended[:10]}" in machine


def test_the_claims_section_appears_only_when_a_claim_has_both_sides_measured(grid):
    out, _, _ = grid
    assert "## The paper's claims at this scale" not in (out / "tables.md").read_text()
    # vit and ood answer no claim of the paper on their own; with deit_indist beside ood, one.
    per_seed = {"ood": [{"mean/overall": 0.40}], "deit_indist": [{"mean/overall": 0.30}]}
    (verdict,) = paper_tables.check(paper_tables.CLAIMS, per_seed)
    assert verdict.claim.source == "Table 5, rows 1-2" and verdict.outcome == "holds (one seed)"


def test_the_heads_sweep_puts_dist_the_mean_and_cls_at_w_0_half_and_1(grid):
    out, _, _ = grid
    run = paper_tables.Run("ood", 0, ("train",), "recipes/tiny_digits.yaml", [],
                           out / "students" / "ood-seed0")  # fmt: skip
    posthoc = paper_tables.analyse_heads(run)
    log = out / "students" / "ood-seed0.log"
    evals = log.read_text().count("$ deitlt eval ")
    assert paper_tables.analyse_heads(run) == posthoc  # kept: not evaluated again
    assert log.read_text().count("$ deitlt eval ") == evals == 1
    table = paper_tables.heads_markdown([posthoc]).splitlines()
    final = paper_tables.metrics(run)
    for w, head in (("0.0", "dist"), ("0.5", "mean"), ("1.0", "cls")):
        cells = next(x for x in table if x.startswith(f"| {w} |")).strip("|").split("|")
        expected = [100 * final[paper_tables.group_key(head, g)] for g in paper_tables.COLUMNS]
        assert [float(c) for c in cells[1:5]] == pytest.approx(expected, abs=0.051)
    assert sum(x.startswith("| 0.") or x.startswith("| 1.") for x in table) == 11
    calibrated = [
        x.split("|")[1].strip() for x in table if x.startswith(("| cls ", "| dist ", "| mean "))
    ]
    assert calibrated == ["cls", "dist", "mean"]


def test_a_missing_teacher_recipe_is_named_before_anything_runs(tmp_path):
    row = paper_tables.ROWS["deitlt_paco"]
    with pytest.raises(SystemExit, match="recipes/teacher_paco_digits.yaml, which does not exist"):
        paper_tables.check_recipes([row], ["paco_sam"], root=tmp_path)


def test_shorter_runs_keep_the_schedules_proportions():
    overrides = paper_tables.scaled_schedule("recipes/tiny_digits.yaml", 10)
    # 100 epochs, warm-up 2, DRW from epoch 90 -> 10 epochs, warm-up 0.2, DRW from epoch 9.
    assert overrides == ["train.epochs=10", "schedule.warmup_epochs=0.2", "distill.drw_epoch=9"]
    assert paper_tables.scaled_schedule("recipes/tiny_digits.yaml", None) == []


def test_a_later_override_of_a_key_replaces_the_earlier_one():
    assert paper_tables.last_wins(["a=1", "b=2", "a=3"]) == ["b=2", "a=3"]
