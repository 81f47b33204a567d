"""Process kills: SIGKILL during a step, during evaluation and during a checkpoint save.

One run directory, continued from the shared step-10 checkpoint, is killed three times, each time
at another kind of point, and the same command is run again after each kill; the last run
finishes. Resume must pick the newest checkpoint with a COMPLETE marker, never a half-written one,
and the finished run must hold bitwise the weights of the uninterrupted reference run.
"""

from __future__ import annotations

import json
import random

import pytest

from faults import (
    Finished,
    TrainProcess,
    WriteTrap,
    assert_same_weights,
    final_weights,
    resumed_at,
    tiny_overrides,
)
from faults.conftest import REFERENCE, continue_from_start

pytestmark = pytest.mark.slow

SEED = 20240617  # picks the step of the first kill
EPOCH_END = 25  # 405 images / 16 per step: the first evaluation follows step 25
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"  # ZeRO-1, written after the model


@pytest.fixture(scope="module")
def killed(digits_lt, random_teacher, start_run, tmp_path_factory):
    """Kill, rerun, kill, rerun, kill, rerun; checkpoints every 10 steps and at epoch ends."""
    run_dir = continue_from_start(start_run, tmp_path_factory.mktemp("killed") / "run")
    logs = run_dir.parent / "logs"
    overrides = tiny_overrides(digits_lt, random_teacher, run_dir, **REFERENCE)
    record: dict[str, object] = {"run_dir": run_dir}

    # 1. During a training step: a seeded random step between the checkpoints of steps 10 and 20.
    step = random.Random(SEED).randint(11, 19)
    run = TrainProcess.start(overrides, logs)
    record["step_killed_at"] = run.wait_for_step(step)
    record["after_step_kill"] = run.kill()

    # 2. During the evaluation after step 25. The kill follows the step-25 line at once; the trap
    # on the first file the evaluation writes holds the process inside it should the kill lag.
    trap = WriteTrap(run_dir / "eval" / f"per_class_step{EPOCH_END:08d}.csv")
    run = TrainProcess.start(overrides, logs)
    run.wait_for_step(EPOCH_END)
    record["after_eval_kill"] = run.kill()
    trap.release()
    record["eval_outputs_after_kill"] = sorted(p.name for p in (run_dir / "eval").iterdir())
    record["tags_after_eval_kill"] = _tags(run_dir)

    # 3. During the save of step 30: its model states are on disk, its optimizer states half.
    trap = WriteTrap(run_dir / "checkpoints" / "step_00000030" / OPTIM_STATES)
    run = TrainProcess.start(overrides, logs)
    record["partial_bytes"] = len(trap.wait_for_writer(run.proc))
    record["after_save_kill"] = run.kill()
    trap.release()
    record["tags_after_save_kill"] = _tags(run_dir)

    # 4. The same command again, to the end.
    record["final"] = TrainProcess.start(overrides, logs).finish()
    return record


def _tags(run_dir) -> dict[str, bool]:
    """Checkpoint tag -> whether it holds a COMPLETE marker."""
    root = run_dir / "checkpoints"
    return {p.name: (p / "COMPLETE").is_file() for p in sorted(root.iterdir()) if p.is_dir()}


def _step_lines(stdout: str, last: int) -> list[str]:
    """The logged lines of steps 1..last without the throughput fields (they vary)."""
    out = []
    for line in stdout.splitlines():
        if line.startswith("[step ") and "/" in line.split("]")[0]:
            step = int(line[6:].split("/")[0])
            if step <= last:
                fields = line.split("] ", 1)[1].split()
                out.append(" ".join(f for f in fields if not f.startswith(_VARYING)))
    return out


_VARYING = ("images_per_s=", "data_wait_fraction=")


def _resumed(finished: Finished) -> tuple[str, int] | None:
    return resumed_at(finished.stdout)


@pytest.mark.fault(
    "SIGKILL during a training step (a seeded random step)",
    "rerun resumes from the newest complete checkpoint; only the steps since it are lost",
)
def test_sigkill_during_a_step_loses_only_the_steps_since_the_last_checkpoint(killed):
    assert killed["after_step_kill"].returncode == -9
    assert killed["step_killed_at"] > 10
    second = killed["after_eval_kill"]
    assert _resumed(second) == ("step_00000010", 10), second.describe()


@pytest.mark.fault(
    "SIGKILL during evaluation",
    "no evaluation output or checkpoint of that step survives; rerun resumes from the previous "
    "checkpoint and evaluates again",
)
def test_sigkill_during_evaluation_resumes_from_the_previous_checkpoint(killed):
    assert killed["after_eval_kill"].returncode == -9
    # Killed inside the evaluation: none of its outputs, no checkpoint of step 25.
    assert killed["eval_outputs_after_kill"] == []
    assert "step_00000025" not in killed["tags_after_eval_kill"]
    assert not any(tag.startswith("best") for tag in killed["tags_after_eval_kill"])
    third = killed["after_save_kill"]
    assert _resumed(third) == ("step_00000020", 20), third.describe()
    assert f"[step {EPOCH_END}] eval" in third.stdout


@pytest.mark.fault(
    "SIGKILL during a checkpoint save (half-written optimizer states)",
    "the partial checkpoint has no COMPLETE marker and is never resumed from",
)
def test_sigkill_during_a_save_never_resumes_from_the_partial_checkpoint(killed):
    assert killed["after_save_kill"].returncode == -9
    assert killed["partial_bytes"] > 0
    tags = killed["tags_after_save_kill"]
    assert tags["step_00000030"] is False, "the killed save must not be marked complete"
    assert tags["step_00000025"] is True
    final = killed["final"]
    assert _resumed(final) == ("step_00000025", 25), final.describe()


@pytest.mark.fault(
    "three SIGKILLs (step, evaluation, save), each followed by a rerun",
    "the run finishes with bitwise the weights of an uninterrupted run",
)
def test_killed_and_rerun_training_ends_with_the_uninterrupted_weights(killed, reference_run):
    final = killed["final"]
    assert final.returncode == 0, final.describe()
    run_dir = killed["run_dir"]
    latest = json.loads((run_dir / "eval" / "latest.json").read_text())
    assert latest["step"] == 50
    assert_same_weights(reference_run["weights"], final_weights(run_dir))


@pytest.mark.fault(
    "SIGKILL before the first checkpoint",
    "the rerun starts over from step 1 and follows the same trajectory",
)
def test_sigkill_before_the_first_checkpoint_reruns_the_same_trajectory(
    digits_lt, random_teacher, start_run, tmp_path
):
    run_dir = tmp_path / "run"
    run = TrainProcess.start(
        tiny_overrides(digits_lt, random_teacher, run_dir, **REFERENCE), tmp_path / "logs"
    )
    run.wait_for_step(3)
    killed = run.kill()
    assert not (run_dir / "checkpoints").exists()
    assert _step_lines(killed.stdout, 3) == _step_lines(start_run["stdout"], 3)


@pytest.mark.fault(
    "the process dies while a new best checkpoint is written (shards on disk, no COMPLETE yet)",
    "the previous best stays complete and is what --tag best loads; the next best replaces both",
)
def test_a_kill_while_saving_a_new_best_keeps_the_previous_best(
    world, random_teacher, tmp_path, monkeypatch
):
    from test_no_sync import run_steps, synthetic_batch, tiny_trainer

    from deitlt_scale import export
    from deitlt_scale.engine import checkpoint

    run_dir = tmp_path / "run"
    trainer = tiny_trainer(world, random_teacher, run_dir, "cpu", **{"deepspeed.bf16": "false"})
    batch = synthetic_batch(world.device)
    run_steps(trainer, batch, 1)
    trainer._save(epoch=0, best=True)
    run_steps(trainer, batch, 1)
    save_checkpoint = trainer.engine.save_checkpoint

    def killed_before_the_marker(*args, **kwargs):
        save_checkpoint(*args, **kwargs)  # every shard is on disk...
        raise SystemExit(-9)  # ...and the process dies before COMPLETE is written

    monkeypatch.setattr(trainer.engine, "save_checkpoint", killed_before_the_marker)
    with pytest.raises(SystemExit):
        trainer._save(epoch=0, best=True)
    root = run_dir / "checkpoints"
    bests = {p.name: (p / "COMPLETE").is_file() for p in root.glob("best*")}
    assert bests == {"best_step_00000001": True, "best_step_00000002": False}
    assert checkpoint.find_checkpoint(run_dir, "best").step == 1
    assert export.find_checkpoint(run_dir, "best").tag == "best_step_00000001"

    monkeypatch.setattr(trainer.engine, "save_checkpoint", save_checkpoint)
    run_steps(trainer, batch, 1)
    trainer._save(epoch=0, best=True)
    assert [p.name for p in root.glob("best*")] == ["best_step_00000003"]
    assert checkpoint.find_checkpoint(run_dir, "best").step == 3
