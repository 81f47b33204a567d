"""Non-finite loss: injected by a learning rate so large that the loss overflows at step 3.

With ``optim.lr=1e8`` (no batch scaling) steps 1 and 2 are finite and every later step is NaN.
``train.on_nonfinite=stop`` must stop the run naming the step and the last good checkpoint;
``train.on_nonfinite=skip`` must skip such steps, visibly, without touching the weights.
"""

from __future__ import annotations

import re

import pytest
import torch

from deitlt_scale.engine.checkpoint import consolidate
from faults import TrainProcess, one_line_error, tiny_overrides

pytestmark = pytest.mark.slow

HUGE_LR = {"optim.lr": 1.0e8, "optim.lr_scale_batch": 0, "train.max_steps": 10}
STOPPED = re.compile(
    r"non-finite loss at or before step (\d+); last good checkpoint: (\S+) "
    r"\(set train.on_nonfinite=skip"
)
STEP = re.compile(r"^\[step (\d+)/\d+\] (.*)$", re.MULTILINE)


def _steps(stdout: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in STEP.finditer(stdout)}


def _first_nonfinite(stdout: str) -> int:
    return min(s for s, line in _steps(stdout).items() if re.search(r"loss=(nan|inf)", line))


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.fixture(scope="module")
def stopped(digits_lt, random_teacher, tmp_path_factory):
    """on_nonfinite=stop, a checkpoint after every step, ZeRO stage 0 (no overflow check of its
    own, as for SAM teachers): the trainer alone guards the checkpoints."""
    root = tmp_path_factory.mktemp("stopped")
    extra = {
        **HUGE_LR,
        "deepspeed.zero_stage": 0,
        "checkpoint.every_steps": 1,
        "checkpoint.keep_last": 10,
    }
    done = TrainProcess.start(
        tiny_overrides(digits_lt, random_teacher, root / "run", **extra), root / "logs"
    ).finish()
    return {"done": done, "run_dir": root / "run"}


@pytest.fixture(scope="module")
def skipped(digits_lt, random_teacher, tmp_path_factory):
    """on_nonfinite=skip with checkpoints at steps 5 and 10 (ZeRO stage 1, the paper recipes')."""
    root = tmp_path_factory.mktemp("skipped")
    extra = {**HUGE_LR, "train.on_nonfinite": "skip", "checkpoint.every_steps": 5}
    done = TrainProcess.start(
        tiny_overrides(digits_lt, random_teacher, root / "run", **extra), root / "logs"
    ).finish()
    return {"done": done, "run_dir": root / "run"}


@pytest.mark.fault(
    "non-finite loss, train.on_nonfinite=stop",
    "exit 3 with one line naming the step and the last good checkpoint",
)
def test_a_nonfinite_loss_stops_the_run_naming_the_step_and_the_last_checkpoint(stopped):
    done = stopped["done"]
    assert done.returncode == 3, done.describe()
    match = STOPPED.search(one_line_error(done))
    assert match, done.stderr
    first_bad = _first_nonfinite(done.stdout)
    named_step, named = int(match.group(1)), match.group(2)
    assert first_bad <= named_step <= first_bad + 1  # flags are read one step late
    assert (stopped["run_dir"] / "checkpoints" / named.split("/")[-1] / "COMPLETE").is_file()
    assert max(_steps(done.stdout)) <= named_step, "no step is trained after the stop"


@pytest.mark.fault(
    "non-finite loss, train.on_nonfinite=stop, checkpoint after every step",
    "the checkpoint named as last good holds finite weights",
)
def test_the_checkpoint_named_as_last_good_holds_finite_weights(stopped):
    match = STOPPED.search(stopped["done"].stderr)
    assert match, stopped["done"].describe()
    state, _ = consolidate(stopped["run_dir"] / "checkpoints" / match.group(2).split("/")[-1])
    assert _finite(state)


@pytest.mark.fault(
    "non-finite loss, train.on_nonfinite=skip",
    "the run finishes and every non-finite step is logged as skipped",
)
def test_skip_mode_marks_every_skipped_step(skipped):
    done = skipped["done"]
    assert done.returncode == 0, done.describe()
    steps = _steps(done.stdout)
    assert sorted(steps) == list(range(1, 11))
    skipped_steps = [s for s, line in steps.items() if "skipped=1" in line]
    assert skipped_steps == list(range(3, 11)), steps
    assert all("skipped" not in steps[s] for s in (1, 2))


@pytest.mark.fault(
    "non-finite loss, train.on_nonfinite=skip",
    "a skipped step leaves the weights unchanged",
)
def test_skipped_steps_leave_the_weights_unchanged(skipped):
    steps = _steps(skipped["done"].stdout)
    assert all("skipped=1" in steps[s] for s in range(6, 11))  # every step between the saves
    root = skipped["run_dir"] / "checkpoints"
    before, _ = consolidate(root / "step_00000005")
    after, _ = consolidate(root / "step_00000010")
    assert _finite(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
