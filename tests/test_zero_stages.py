"""`deitlt eval`, `deitlt export` and `deitlt analyze` on checkpoints of every ZeRO stage.

One tiny real run per stage (`deitlt train` on the embedded digits; ZeRO 3 with two processes,
so its parameters really are partitioned), then each reader as a user runs it. Eval reads the
checkpoint's consolidated weights without an optimizer or engine, and must report exactly what
the training run logged for the same step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_trainer import REPO, _fail, _free_port, launch, tiny_overrides

pytestmark = pytest.mark.slow
STAGES = (0, 1, 2, 3)
PROCESSES = {0: 1, 1: 1, 2: 1, 3: 2}


def cli(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    prefix = [sys.executable]
    if nproc > 1:
        prefix += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        prefix += ["--master_port", str(_free_port())]
    cmd = [*prefix, "-m", "deitlt_scale.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def runs(digits_lt, random_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    out = {}
    for stage in STAGES:
        run_dir = root / f"zero{stage}"
        overrides = tiny_overrides(
            digits_lt,
            random_teacher,
            run_dir,
            **{"deepspeed.zero_stage": stage, "train.epochs": 1, "distill.drw_epoch": "null"},
        )
        done = launch(overrides, nproc=PROCESSES[stage])
        assert done.returncode == 0, _fail(done)
        out[stage] = run_dir
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_eval_reports_what_training_logged_for_the_same_step(stage, runs, tmp_path):
    run_dir = runs[stage]
    done = cli(["eval", str(run_dir), "--tag", "latest", "--out", str(tmp_path)], PROCESSES[stage])
    assert done.returncode == 0, _fail(done)
    logged = json.loads((run_dir / "eval" / "latest.json").read_text())
    evaluated = json.loads((tmp_path / "latest.json").read_text())
    assert evaluated["step"] == logged["step"]
    assert evaluated["metrics"] == logged["metrics"]
    assert (tmp_path / "per_class_latest.csv").read_text() == (
        run_dir / "eval" / "per_class_latest.csv"
    ).read_text()


@pytest.mark.parametrize("stage", STAGES)
def test_export_and_timm_load(stage, runs, tmp_path):
    import timm
    import torch

    from deitlt_scale.engine.checkpoint import consolidate, latest_checkpoint
    from deitlt_scale.export import build_model, read_student

    done = cli(["export", str(runs[stage]), "--out", str(tmp_path / "export")])
    assert done.returncode == 0, _fail(done)
    exported = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    ref = latest_checkpoint(runs[stage])
    trained = build_model(read_student(runs[stage], ref))
    trained.load_state_dict(consolidate(ref.path)[0])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(exported(x), trained.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("stage", STAGES)
def test_analyze_reads_the_runs_final_weights(stage, runs, digits_lt, tmp_path):
    """Over the whole eval split, analyze's per-class accuracy of every head is the one the
    run's final evaluation wrote: it read the weights of the last checkpoint of that stage."""
    import csv

    what = ["--what", "per-class,divergence", "--images", "0", "--device", "cpu"]
    done = cli(
        ["analyze", str(runs[stage]), "--data", str(digits_lt), "--out", str(tmp_path), *what]
    )
    assert done.returncode == 0, _fail(done)
    assert (tmp_path / "per_class.png").stat().st_size > 0
    assert (tmp_path / "divergence.png").stat().st_size > 0

    def table(path):
        with open(path) as f:
            return list(csv.DictReader(f))

    analysed = table(tmp_path / "per_class.csv")
    evaluated = table(runs[stage] / "eval" / "per_class_latest.csv")
    heads = [c for c in analysed[0] if c.startswith("acc_")]
    assert heads == ["acc_cls", "acc_dist", "acc_mean"]
    for mine, theirs in zip(analysed, evaluated, strict=True):
        assert int(mine["eval_images"]) == int(theirs["eval_count"])
        for head in heads:
            assert float(mine[head]) == pytest.approx(float(theirs[head]), abs=1e-6), head
