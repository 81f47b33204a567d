"""Gradient accumulation without extra all-reduces.

With ``train.grad_accum=2`` on 2 processes (gloo, CPU), tests/scripts/grad_accum_comm.py wraps the
torch.distributed collectives of every rank with counters (before DeepSpeed's communication
backend is created, so the references it keeps are the counted ones), runs real optimizer steps
of the real :class:`~deitlt_scale.engine.trainer.Trainer` (the tiny fp32 trainer of
tests/test_no_sync.py: DeepSpeed engine, frozen ResNet-32 teacher, synthetic batches) and records
the collectives of each micro-step and of each whole ``train_step``.

* ZeRO 0 and 1: the micro-step before the accumulation boundary makes no collective at all; the
  boundary micro-step reduces the accumulated gradients (DeepSpeed's ``allreduce_gradients``
  communicates only at the boundary for these stages).
* ZeRO 2 (partitioned gradients) reduces the gradient buckets on *every* micro-step: DeepSpeed's
  ``allreduce_gradients`` runs ``overlapping_partition_gradients_reduce_epilogue`` whatever the
  boundary, so that each rank keeps only its own gradient partition between micro-steps. This is
  ZeRO-2's design, trading communication for memory; it is asserted as such here.
* The trainer's own collective, the all-reduce of the [non-finite, stop] flags in
  ``Trainer._check_flags``, happens once per optimizer step, never inside a micro-step
  (``train.on_nonfinite=stop``, the default).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "scripts" / "grad_accum_comm.py"
STAGES = (0, 1, 2)
STEPS = 3
GRAD_ACCUM = 2
REDUCTIONS = frozenset(
    {
        "all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter",
        "reduce_scatter_tensor", "_reduce_scatter_base",
    }
)  # fmt: skip
GATHERS = frozenset({"all_gather", "all_gather_into_tensor", "_all_gather_base"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def measured(random_teacher, tmp_path_factory) -> dict[int, list[dict]]:
    """Per stage, each rank's record: ``{"build": ..., "steps": [...]}`` (see the worker)."""
    tmp = tmp_path_factory.mktemp("grad-accum-comm")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER),
        f"--teacher={random_teacher}", f"--run-dir={tmp / 'run'}", f"--out={tmp / 'counts'}",
        f"--steps={STEPS}", f"--grad-accum={GRAD_ACCUM}", *(f"--stage={s}" for s in STAGES),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    ranks = [json.loads((tmp / "counts" / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    return {
        stage: [next(s for s in r["stages"] if s["stage"] == stage) for r in ranks]
        for stage in STAGES
    }


def ops(counts: dict[str, int], origin: str, names: frozenset[str]) -> int:
    """How many of ``counts`` (keyed ORIGIN/NAME) come from ``origin`` with a name in ``names``."""
    total = 0
    for key, n in counts.items():
        who, name = key.split("/", 1)
        total += n if who == origin and name in names else 0
    return total


def micro_steps(record: dict):
    """(optimizer step, micro-step record) for every measured micro-step, checking the layout."""
    assert len(record["steps"]) == STEPS
    for i, step in enumerate(record["steps"]):
        assert step["engine_steps"] == 1, f"step {i}: the engine did not step exactly once"
        micros = step["micro_steps"]
        assert [m["micro"] for m in micros] == list(range(GRAD_ACCUM))
        assert [m["boundary"] for m in micros] == [False] * (GRAD_ACCUM - 1) + [True]
        for micro in micros:
            yield i, micro


def where(record: dict) -> str:
    return json.dumps(record, indent=1)[-4000:]


def test_the_counter_sees_deepspeed_collectives(measured):
    """Building the engine broadcasts the initial weights from rank 0: the counter must see it."""
    for record in measured[0]:
        assert ops(record["build"]["counts"], "deepspeed", frozenset({"broadcast"})) > 0, where(
            record["build"]
        )


@pytest.mark.parametrize("stage", [0, 1])
def test_zero_0_and_1_communicate_gradients_only_at_the_accumulation_boundary(measured, stage):
    for rank, record in enumerate(measured[stage]):
        for step, micro in micro_steps(record):
            counts, at = micro["counts"], f"rank {rank} step {step} micro {micro['micro']}"
            if micro["boundary"]:
                assert ops(counts, "deepspeed", REDUCTIONS) >= 1, f"{at}: {micro['sites']}"
                gathers = ops(counts, "deepspeed", GATHERS)
                # ZeRO 1 gathers the updated parameter partitions after the optimizer step.
                assert gathers >= 1 if stage == 1 else gathers == 0, f"{at}: {micro['sites']}"
            else:
                assert counts == {}, f"{at}: collectives before the boundary: {micro['sites']}"


def test_zero_2_reduces_gradients_every_micro_step_by_design(measured):
    for rank, record in enumerate(measured[2]):
        per_micro = []
        for step, micro in micro_steps(record):
            counts, at = micro["counts"], f"rank {rank} step {step} micro {micro['micro']}"
            per_micro.append(ops(counts, "deepspeed", REDUCTIONS))
            assert per_micro[-1] >= 1, f"{at}: no gradient reduction: {micro['sites']}"
            assert ops(counts, "trainer", REDUCTIONS | GATHERS) == 0, f"{at}: {micro['sites']}"
            gathers = ops(counts, "deepspeed", GATHERS)
            # Parameters are gathered once, after the optimizer step at the boundary.
            assert gathers >= 1 if micro["boundary"] else gathers == 0, f"{at}: {micro['sites']}"
        # The same gradient volume is reduced on every micro-step, boundary or not.
        assert len(set(per_micro)) == 1, per_micro


@pytest.mark.parametrize("stage", STAGES)
def test_the_flags_all_reduce_runs_once_per_optimizer_step(measured, stage):
    for rank, record in enumerate(measured[stage]):
        for step, whole in enumerate(record["steps"]):
            at = f"ZeRO {stage} rank {rank} step {step}"
            inside = {}
            for micro in whole["micro_steps"]:
                assert ops(micro["counts"], "trainer", REDUCTIONS) == 0, (at, micro["sites"])
                for key, n in micro["counts"].items():
                    inside[key] = inside.get(key, 0) + n
            outside = {
                key: n - inside.get(key, 0)
                for key, n in whole["whole_step"]["counts"].items()
                if n != inside.get(key, 0)
            }
            assert outside == {"trainer/all_reduce": 1}, f"{at}: {whole['whole_step']['sites']}"
            flag_sites = [
                site
                for site in whole["whole_step"]["sites"]
                if site.startswith("all_reduce at deitlt_scale/")
            ]
            assert len(flag_sites) == 1 and flag_sites[0].endswith(" _check_flags"), flag_sites
