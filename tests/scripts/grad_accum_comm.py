"""Count the torch.distributed collectives of each micro-step of real trainer steps.

Launched by tests/test_grad_accum_comm.py with
``python -m torch.distributed.run --nproc_per_node=2 tests/scripts/grad_accum_comm.py ...``.
Every rank wraps the torch.distributed collectives with counters *before* DeepSpeed's backend is
created (it keeps references to some of them), builds the tiny Trainer of tests/test_no_sync.py
(real DeepSpeed engine, real frozen teacher, synthetic batches, fp32, ``train.grad_accum=2``) for
each ``--stage``, runs ``--steps`` optimizer steps through ``Trainer.train_step`` and records, per
optimizer step, the collectives of each micro-step (``train_micro_step``) and of the whole step.

Each collective is keyed ``ORIGIN/NAME``: ORIGIN is ``deepspeed`` when DeepSpeed code is on the
call stack, ``trainer`` when only project code is, ``other`` otherwise. A collective called from
inside another (``broadcast_object_list`` calls ``broadcast``) counts once, as the outer one.
Every rank writes its counts to ``--out``/rank<RANK>.json.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import threading
from collections import Counter
from pathlib import Path

import torch
import torch.distributed
import torch.distributed.distributed_c10d as c10d

TESTS = Path(__file__).resolve().parents[1]
COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "all_gather", "all_gather_into_tensor", "_all_gather_base",
    "all_gather_coalesced", "all_gather_object", "broadcast", "broadcast_object_list",
    "all_to_all", "all_to_all_single", "gather", "scatter", "barrier", "monitored_barrier",
)  # fmt: skip
DEEPSPEED = f"{os.sep}deepspeed{os.sep}"
PROJECT = f"{os.sep}deitlt_scale{os.sep}"
TORCH_DIST = str(Path(torch.distributed.__file__).parent)


class CollectiveCounter:
    """Counts calls of the torch.distributed collectives, keyed ``ORIGIN/NAME``."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()  # "NAME at FILE:LINE FUNCTION", innermost caller
        self._inside = threading.local()

    def install(self) -> None:
        for name in COLLECTIVES:
            real = getattr(torch.distributed, name, None)
            if real is None:
                continue
            wrapped = self._wrap(name, real)
            setattr(torch.distributed, name, wrapped)
            if getattr(c10d, name, None) is real:
                setattr(c10d, name, wrapped)

    def _wrap(self, name: str, real):
        @functools.wraps(real)
        def counted(*args, **kwargs):
            if getattr(self._inside, "active", False):
                return real(*args, **kwargs)
            origin, site = _origin()
            self.counts[f"{origin}/{name}"] += 1
            self.sites[f"{name} at {site}"] += 1
            self._inside.active = True
            try:
                return real(*args, **kwargs)
            finally:
                self._inside.active = False

        counted.__wrapped_collective__ = real
        return counted

    def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        return Counter(self.counts), Counter(self.sites)


def _origin() -> tuple[str, str]:
    """The origin of the collective being called, and its innermost caller outside the comm layers."""
    frame = sys._getframe(2)
    origin, site = None, None
    while frame is not None:
        path = frame.f_code.co_filename
        comm_layer = TORCH_DIST in path or f"{DEEPSPEED}comm{os.sep}" in path
        if site is None and not comm_layer:
            site = f"{_short(path)}:{frame.f_lineno} {frame.f_code.co_name}"
        if DEEPSPEED in path:
            origin = "deepspeed"
        elif origin is None and PROJECT in path:
            origin = "trainer"
        frame = frame.f_back
    return origin or "other", site or "?"


def _short(path: str) -> str:
    for marker in (DEEPSPEED, PROJECT):
        if marker in path:
            return marker.strip(os.sep) + os.sep + path.rsplit(marker, 1)[1]
    return Path(path).name


def diff(after, before) -> dict[str, dict[str, int]]:
    """Counts (by ORIGIN/NAME) and call sites of the collectives between two snapshots."""
    return {
        key: {k: n for k, n in sorted((now - then).items()) if n}
        for key, now, then in zip(("counts", "sites"), after, before, strict=True)
    }


def run_stage(world, counter: CollectiveCounter, stage: int, args: argparse.Namespace) -> dict:
    from test_no_sync import synthetic_batch, tiny_trainer

    before_build = counter.snapshot()
    trainer = tiny_trainer(
        world,
        Path(args.teacher),
        Path(args.run_dir) / f"zero{stage}",
        "cpu",
        **{
            "deepspeed.zero_stage": stage,
            "deepspeed.bf16": "false",
            "train.grad_accum": args.grad_accum,
        },
    )
    build = diff(counter.snapshot(), before_build)
    assert trainer.engine.gradient_accumulation_steps() == args.grad_accum
    assert trainer.engine.zero_optimization_stage() == stage

    micro_counts: list[dict] = []
    real_micro_step = trainer.train_micro_step

    def watched_micro_step(batch, step, micro, count=None):
        before = counter.snapshot()
        out = real_micro_step(batch, step, micro, count)
        # The trainer sets the boundary flag of this micro-batch before its backward.
        boundary = trainer.engine.is_gradient_accumulation_boundary()
        micro_counts.append(
            {"micro": micro, "boundary": boundary, **diff(counter.snapshot(), before)}
        )
        return out

    trainer.train_micro_step = watched_micro_step
    batches = itertools.repeat(synthetic_batch(world.device))
    steps = []
    for _ in range(args.steps):
        micro_counts.clear()
        before = counter.snapshot()
        global_before = trainer.engine.global_steps
        trainer.train_step(batches)
        steps.append(
            {
                "micro_steps": list(micro_counts),
                "whole_step": diff(counter.snapshot(), before),
                "engine_steps": trainer.engine.global_steps - global_before,
            }
        )
    trainer.finish_steps()
    return {"stage": stage, "build": build, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, action="append", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--grad-accum", type=int, default=2)
    args = parser.parse_args()

    counter = CollectiveCounter()
    counter.install()  # before DeepSpeed's backend takes references to the functions
    sys.path.insert(0, str(TESTS))  # the tiny trainer of test_no_sync

    from deepspeed import comm as ds_comm

    from deitlt_scale.engine.distributed import init_distributed

    world = init_distributed("cpu")
    assert world.world_size == 2, world
    backend = ds_comm.comm.cdb
    for ref in (backend.reduce_scatter_function, backend.all_gather_function):
        assert hasattr(ref, "__wrapped_collective__"), f"DeepSpeed holds an unwrapped {ref}"

    results = [run_stage(world, counter, stage, args) for stage in args.stage]
    out = Path(args.out) / f"rank{world.rank}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"world_size": world.world_size, "stages": results}, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
