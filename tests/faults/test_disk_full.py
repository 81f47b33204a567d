"""Full disk: the run directory on a tmpfs too small for a second checkpoint.

The test mounts the tmpfs itself (root only). Without root it skips with one line, unless CI is
set: there it must run, and fails instead.
"""

from __future__ import annotations

import gc
import math
import os
import subprocess

import pytest
import torch

from faults import (
    TrainProcess,
    assert_same_weights,
    final_weights,
    one_line_error,
    resumed_at,
    tiny_overrides,
)
from faults.conftest import REFERENCE, continue_from_start

pytestmark = pytest.mark.slow


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"{reason}; CI must run the disk-full tests (as root)")
    pytest.skip(reason)


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        _unavailable(f"mount {' '.join(args)} failed: {done.stderr.strip()}")


def _checkpoint_bytes(run_dir) -> tuple[int, int]:
    """(bytes of one step checkpoint, bytes of the scripts DeepSpeed puts beside them)."""
    root = run_dir / "checkpoints"
    step = next(p for p in sorted(root.glob("step_*")) if (p / "COMPLETE").is_file())
    one = sum(f.stat().st_size for f in step.iterdir())
    scripts = sum(f.stat().st_size for f in root.iterdir() if f.is_file())
    return one, scripts


def _in_memory(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of tensors that zero_to_fp32 may have memory-mapped from the tmpfs."""
    return {k: v.clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def full_disk(digits_lt, random_teacher, start_run, reference_run, tmp_path_factory):
    """Room for the shared step-10 checkpoint but not for step 20's; then room for everything."""
    if os.geteuid() != 0:
        _unavailable("needs root to mount a tmpfs (runs in CI)")
    one, scripts = _checkpoint_bytes(reference_run["run_dir"])
    size_k = math.ceil((scripts + 1.5 * one + 64 * 1024) / 1024)
    mount_point = tmp_path_factory.mktemp("tmpfs")
    _mount("-t", "tmpfs", "-o", f"size={size_k}k", "tmpfs", str(mount_point))
    try:
        run_dir = continue_from_start(start_run, mount_point / "run")
        overrides = tiny_overrides(digits_lt, random_teacher, run_dir, **REFERENCE)
        logs = mount_point.parent / "logs"  # outside the tmpfs
        failed = TrainProcess.start(overrides, logs).finish()
        tags = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
        kept = _in_memory(final_weights(run_dir))  # the newest complete checkpoint
        _mount("-o", "remount,size=64m", str(mount_point))
        rerun = TrainProcess.start(overrides, logs).finish()
        yield {
            "failed": failed,
            "tags": tags,
            "kept": kept,
            "rerun": rerun,
            "weights": _in_memory(final_weights(run_dir)) if rerun.returncode == 0 else None,
        }
    finally:
        gc.collect()  # drop any tensor still mapped from a file on the tmpfs
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


@pytest.mark.fault(
    "disk full while saving a checkpoint",
    "the run stops (exit 2) with one line naming the checkpoint, the free space and the "
    "checkpoint it will resume from",
)
def test_a_full_disk_stops_the_run_with_one_line_naming_the_checkpoint(full_disk):
    failed = full_disk["failed"]
    assert failed.returncode == 2, failed.describe()
    line = one_line_error(failed)
    assert line.startswith("deitlt train: error: saving checkpoint "), line
    assert "step_00000020" in line and "no space left on device" in line
    assert "step_00000010" in line and "resumes from it" in line


@pytest.mark.fault(
    "disk full while saving a checkpoint",
    "the partial checkpoint is removed; the previous one stays complete and loadable",
)
def test_the_previous_checkpoint_survives_a_full_disk(full_disk):
    assert full_disk["tags"] == ["step_00000010"]
    assert all(torch.isfinite(v).all() for v in full_disk["kept"].values())


@pytest.mark.fault(
    "disk full while saving a checkpoint, then space freed",
    "the rerun resumes from the previous checkpoint and ends with the uninterrupted weights",
)
def test_after_freeing_space_the_rerun_resumes_and_matches_the_uninterrupted_run(
    full_disk, reference_run
):
    rerun = full_disk["rerun"]
    assert rerun.returncode == 0, rerun.describe()
    assert resumed_at(rerun.stdout) == ("step_00000010", 10)
    assert_same_weights(reference_run["weights"], full_disk["weights"])
