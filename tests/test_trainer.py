"""The trainer end to end on CPU with the real stack: DALI, DeepSpeed (gloo), MLflow (SQLite).

Each test launches `deitlt train` the way a user does (one process, or two under torchrun) on the
embedded digits with a tiny student, and reads what the run leaves behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tiny_digits.yaml"
STEP_LINE = re.compile(r"^\[step (\d+)/(\d+)\] loss=([0-9.eE+-]+|nan|inf)")

pytestmark = pytest.mark.slow


def tiny_overrides(data: Path, teacher: Path, run_dir: Path, **extra: object) -> list[str]:
    base = {
        "data.shards": data,
        "teacher.path": teacher,
        "runtime.run_dir": run_dir,
        "model.embed_dim": 48,
        "model.depth": 2,
        "model.num_heads": 2,
        "train.epochs": 2,
        "train.micro_batch": 16,
        # 400 of the 405 images per epoch: 25 steps of 16, the step layout the fault suite's
        # checkpoints and kills are placed on (the reference's 256-multiple would give 16).
        "data.epoch_multiple": 16,
        "train.log_every": 1,
        "schedule.warmup_epochs": 1,
        "distill.drw_epoch": 1,
        "checkpoint.every_epochs": 1,
        "eval.every_epochs": 1,
        "tracking.enabled": "false",
        # The paper recipes' stage (the embedded recipe's one process uses 0): the fault suite
        # places kills on its separate optimizer-state files.
        "deepspeed.zero_stage": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def launch(
    overrides: list[str], nproc: int = 1, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if nproc == 1:
        cmd = [sys.executable, "-m", "deitlt_scale.cli", "train", str(RECIPE), *overrides]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_port", str(_free_port()), "-m", "deitlt_scale.cli", "train", str(RECIPE),
            *overrides,
        ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    return out


def losses(stdout: str) -> dict[int, float]:
    found = {}
    for line in stdout.splitlines():
        match = STEP_LINE.match(line)
        if match:
            found[int(match.group(1))] = float(match.group(3))
    return found


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from deitlt_scale.engine.checkpoint import consolidate, latest_checkpoint

    ref = latest_checkpoint(run_dir)
    assert ref is not None, f"no complete checkpoint in {run_dir}"
    state, _ = consolidate(ref.path)
    return state


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fail(out: subprocess.CompletedProcess) -> str:
    return f"exit {out.returncode}\nSTDOUT:\n{out.stdout[-4000:]}\nSTDERR:\n{out.stderr[-4000:]}"


# -------------------------------------------------------------------------------------------


def test_single_process_run_trains_evaluates_and_checkpoints(digits_lt, random_teacher, tmp_path):
    run_dir = tmp_path / "run"
    out = launch(tiny_overrides(digits_lt, random_teacher, run_dir, **{"tracking.enabled": "true"}))
    assert out.returncode == 0, _fail(out)
    steps = losses(out.stdout)
    total = max(steps)
    assert sorted(steps) == list(range(1, total + 1))
    assert all(v == v and v < 50 for v in steps.values())
    assert (run_dir / "config.yaml").is_file()
    spec = json.loads((run_dir / "student.json").read_text())
    assert spec["num_classes"] == 10 and spec["img_size"] == 32
    latest = json.loads((run_dir / "eval" / "latest.json").read_text())
    assert latest["step"] == total
    for head in ("cls", "dist", "mean"):
        for conv in ("paper", "count"):
            for group in ("head", "mid", "tail"):
                assert f"{head}/{conv}/{group}" in latest["metrics"]
    best = json.loads((run_dir / "eval" / "best.json").read_text())
    assert best["selected_on"] == "eval" and best["step"] <= total  # no val split: the test split
    assert set(best["metrics"]) == set(latest["metrics"])
    bests = list((run_dir / "checkpoints").glob("best*"))  # the best so far, one directory
    assert len(bests) == 1 and (bests[0] / "COMPLETE").is_file(), bests
    table = (run_dir / "eval" / "table.txt").read_text()
    assert "mean" in table and "paper" in table and "count" in table
    assert (run_dir / "mlflow.db").is_file() and (run_dir / "mlflow-run-id").is_file()


def test_dry_run_prints_layout_and_stops_before_step_one(digits_lt, random_teacher, tmp_path):
    run_dir = tmp_path / "dry"
    out = launch([*tiny_overrides(digits_lt, random_teacher, run_dir), "--dry-run"])
    assert out.returncode == 0, _fail(out)
    assert "16 per process x 1 accumulation x 1 = 16 global" in out.stdout
    assert "dry run: stopping before step 1" in out.stdout
    assert not losses(out.stdout)
    assert not (run_dir / "checkpoints").exists()


def test_wrong_teacher_class_count_is_one_line(digits_lt, tmp_path):
    from deitlt_scale.models.teacher_file import TeacherInfo, save_teacher
    from deitlt_scale.models.teachers import create_teacher_arch

    teacher = tmp_path / "teacher7"
    save_teacher(
        teacher,
        create_teacher_arch("resnet32", 7),
        TeacherInfo("resnet32", 7, 32, label_space="model"),
    )
    out = launch(tiny_overrides(digits_lt, teacher, tmp_path / "run"))
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert "predicts 7 classes" in last and "10" in last
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("zero", [1, 2])
def test_two_processes_follow_the_single_process_loss_trajectory(
    digits_lt, random_teacher, tmp_path, zero
):
    """Same global batch (32), bf16, ZeRO 1 or 2 on 2 gloo ranks vs one process with
    accumulation 2. The ranks read disjoint halves of each epoch, so the images of a step differ
    between the layouts: the check is on the trajectory (mean over windows), within 15 %."""
    common = {"train.epochs": 3, "deepspeed.bf16": "true", "deepspeed.zero_stage": zero}
    single = launch(
        tiny_overrides(
            digits_lt, random_teacher, tmp_path / "one", **common, **{"train.grad_accum": 2}
        )
    )
    double = launch(tiny_overrides(digits_lt, random_teacher, tmp_path / "two", **common), nproc=2)
    assert single.returncode == 0, _fail(single)
    assert double.returncode == 0, _fail(double)
    a, b = losses(single.stdout), losses(double.stdout)
    assert sorted(a) == sorted(b), "both layouts take the same number of optimizer steps"
    n = len(a)
    for window in (range(1, n // 2 + 1), range(n // 2 + 1, n + 1)):
        mean_a = sum(a[s] for s in window) / len(window)
        mean_b = sum(b[s] for s in window) / len(window)
        assert abs(mean_a - mean_b) <= 0.15 * mean_a, (window, mean_a, mean_b)
    assert sum(a[s] for s in range(n - 2, n + 1)) < sum(a[s] for s in (1, 2, 3))


def test_killed_runs_resume_to_the_same_final_weights(digits_lt, random_teacher, tmp_path):
    """SIGKILL at a few points (then once SIGTERM, which must leave a final checkpoint and exit
    75); re-running the same command finishes with bitwise the same weights as one clean run:
    every source of randomness is a function of (seed, rank, step), and the CPU path is
    deterministic."""
    extra = {"train.epochs": 3, "checkpoint.every_steps": 2, "checkpoint.keep_last": 2}
    clean = launch(tiny_overrides(digits_lt, random_teacher, tmp_path / "clean", **extra))
    assert clean.returncode == 0, _fail(clean)
    total = max(losses(clean.stdout))

    run_dir = tmp_path / "killed"
    overrides = tiny_overrides(digits_lt, random_teacher, run_dir, **extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deitlt_scale.cli", "train", str(RECIPE), *overrides]
    for sig, after_step in [(signal.SIGKILL, 3), (signal.SIGKILL, 7), (signal.SIGTERM, 10)]:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
        )
        seen = []
        for line in proc.stdout:
            seen.append(line)
            match = STEP_LINE.match(line)
            if match and int(match.group(1)) >= after_step:
                proc.send_signal(sig)
                break
        rest, _ = proc.communicate(timeout=120)
        if sig == signal.SIGTERM:
            assert proc.returncode == 75, "".join(seen) + rest
            assert "stopped at step" in rest
        else:
            assert proc.returncode == -signal.SIGKILL
    final = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert final.returncode == 0, _fail(final)
    assert "resumed from" in final.stdout
    assert max(losses(final.stdout)) == total
    want, got = final_weights(tmp_path / "clean"), final_weights(run_dir)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    # The summary covers all four attempts, as the clean run's covers its one: each checkpoint
    # carried the sums, so steps, images and every mean train metric are the clean run's.
    timed = ("train_seconds", "images_per_s")
    want, got = (
        {k: v for k, v in json.loads((d / "train_summary.json").read_text()).items()
         if k not in timed}
        for d in (tmp_path / "clean", run_dir)
    )  # fmt: skip
    assert got == want
    assert "teacher_agreement" in got


def test_compiled_student_trains(digits_lt, random_teacher, tmp_path):
    cache = REPO / ".venv" / "inductor-cache"  # reused by later runs on the same machine
    out = launch(
        tiny_overrides(
            digits_lt, random_teacher, tmp_path / "compiled",
            **{"model.compile": "true", "train.max_steps": 2, "eval.every_epochs": 5},
        ),
        timeout=600,
        env={"TORCHINDUCTOR_CACHE_DIR": str(cache)},
    )  # fmt: skip
    assert out.returncode == 0, _fail(out)
    assert sorted(losses(out.stdout)) == [1, 2]
    spec = json.loads((tmp_path / "compiled" / "student.json").read_text())
    state = final_weights(tmp_path / "compiled")
    assert not any(k.startswith("_orig_mod.") for k in state)
    assert spec["architecture"].startswith("deit_tiny_distilled")


def test_nonfinite_loss_stops_naming_the_step(digits_lt, random_teacher, tmp_path):
    out = launch(
        tiny_overrides(
            digits_lt,
            random_teacher,
            tmp_path / "nan",
            **{"optim.lr": 1.0e12, "optim.lr_scale_batch": 0},
        )
    )
    assert out.returncode == 3, _fail(out)
    assert "non-finite loss" in out.stderr and "last good checkpoint" in out.stderr


def test_resume_on_another_world_size_goes_through_a_universal_checkpoint(
    digits_lt, random_teacher, tmp_path
):
    """2 processes train and checkpoint; 1 process with twice the accumulation (same global
    batch) resumes from the converted universal checkpoint and finishes the run."""
    run_dir = tmp_path / "reshaped"
    first = launch(
        tiny_overrides(
            digits_lt,
            random_teacher,
            run_dir,
            **{"train.max_steps": 4, "checkpoint.every_steps": 2},
        ),
        nproc=2,
    )
    assert first.returncode == 0, _fail(first)
    second = launch(tiny_overrides(digits_lt, random_teacher, run_dir, **{"train.grad_accum": 2}))
    assert second.returncode == 0, _fail(second)
    assert "resumed from" in second.stdout and "universal_step_00000004" in second.stdout
    steps = losses(second.stdout)
    assert min(steps) == 5, "the resumed run continues after the converted step"
    assert not (run_dir / "checkpoints" / "universal_step_00000004").exists(), "pruned once stale"


def test_a_second_training_in_the_same_process_after_shutdown(
    random_teacher, tmp_path, monkeypatch
):
    """A notebook or an in-process sweep trains, shuts the process group down, and trains again:
    the second engine must not reach for the groups DeepSpeed cached for the first."""
    from test_no_sync import run_steps, synthetic_batch, tiny_trainer

    from deitlt_scale.engine.distributed import init_distributed, shutdown_distributed

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # restored after the test
    if torch.distributed.is_initialized():
        shutdown_distributed()
    for run in ("first", "second"):
        world = init_distributed("cpu")
        trainer = tiny_trainer(world, random_teacher, tmp_path / run, "cpu")
        run_steps(trainer, synthetic_batch(world.device), 2)
        trainer.finish_steps()
        assert trainer.state.step == 2
        shutdown_distributed()
        assert not torch.distributed.is_initialized()
