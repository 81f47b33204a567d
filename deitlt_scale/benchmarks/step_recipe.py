"""The step recipe of `deitlt bench step` and what builds and measures it: the Config it trains
with (the command line's student, ``--ablate`` overrides), :class:`StepRecipe` (the project's
Trainer stepping on demand, so the timed rounds of two recipes can alternate), its build and
warm-up, and :class:`Measured` (a recipe's figures). ``deitlt bench step --overhead``
(:mod:`~deitlt_scale.benchmarks.overhead`) builds its framework side from the same parts.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from deitlt_scale.benchmarks.measure import Memory, Timing, progress, sync

MODEL_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "drop_path", "distilled")
LOG_NEVER = 1 << 30  # train.log_every: no logging step (and so no host sync) while timing


# --------------------------------------------------------------------------------------------
# Set-up


def model_overrides(pairs: list[str]) -> list[str]:
    """``["patch_size=4", ...]`` -> ``["model.patch_size=4", ...]``; unknown keys are a UserError."""
    from deitlt_scale.errors import UserError

    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in MODEL_KEYS:
            raise UserError(
                f"--model-args {pair!r} must be KEY=VALUE with KEY one of {', '.join(MODEL_KEYS)}"
            )
        out.append(f"model.{key}={value}")
    return out


def bench_config(
    args: argparse.Namespace,
    *,
    device: str,
    bf16: bool,
    compile_student: bool,
    teacher_dir: Path | None,
    run_dir: Path,
    extra: tuple[str, ...] = (),
):
    """The Config the step recipe trains with: the paper's objective and mixup, no logging step,
    no checkpoints, no tracking; ``extra`` overrides (an ``--ablate`` variant) come last."""
    from deitlt_scale import config as config_mod

    overrides = [
        f"model.arch={args.model}",
        *model_overrides(args.model_args),
        f"model.compile={str(compile_student).lower()}",
        f"data.image_size={args.image_size}",
        f"data.device={'gpu' if device == 'cuda' else 'cpu'}",
        f"data.num_threads={args.threads}",
        f"teacher.path={teacher_dir or ''}",
        f"teacher.dtype={'bf16' if bf16 else 'fp32'}",
        f"distill.type={'hard' if teacher_dir else 'none'}",
        "train.epochs=1",
        f"train.micro_batch={args.batch}",
        "train.grad_accum=1",
        f"train.log_every={LOG_NEVER}",
        f"train.max_steps={args.warmup + args.steps * args.rounds}",
        "schedule.warmup_epochs=0",
        f"deepspeed.zero_stage={args.zero}",
        f"deepspeed.bf16={str(bf16).lower()}",
        "checkpoint.resume=false",
        "tracking.enabled=false",
        f"runtime.run_dir={run_dir}",
        f"runtime.device={device}",
    ]
    if args.shards is not None:
        overrides.append(f"data.shards={args.shards}")
    return config_mod.load(None, [*overrides, *extra])


def ablation_overrides(variant: str) -> tuple[str, ...]:
    """``"a.b=1,c.d=x"`` -> ``("a.b=1", "c.d=x")``; a part without ``=`` is a UserError."""
    from deitlt_scale.errors import UserError

    parts = tuple(part.strip() for part in variant.split(",") if part.strip())
    if not parts or any("=" not in part for part in parts):
        raise UserError(
            f"--ablate {variant!r} must be KEY=VALUE overrides joined by commas, "
            "e.g. teacher.side_stream=false,optim.fused=false"
        )
    return parts


# --------------------------------------------------------------------------------------------
# The step recipe. Like the reference recipe (reference_step.py) it runs optimizer steps on
# demand, so the timed rounds of the two can alternate.


class StepRecipe:
    """The project's training step: :class:`~deitlt_scale.engine.trainer.Trainer` steps as its
    loop runs them (lr set, micro-steps, the one-step-late flag exchange), minus logging."""

    def __init__(self, trainer, batches: Iterator[Any], name: str = "step") -> None:
        self.trainer, self.batches, self.name = trainer, batches, name
        self.images_per_step = trainer.cfg.train.micro_batch * trainer.cfg.train.grad_accum

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.trainer.train_step(self.batches)

    def mean_loss(self) -> float:
        """Mean loss of the steps run (reads the device: call after timing)."""
        self.trainer.finish_steps()  # a non-finite loss raises here
        window = self.trainer.window
        return float(window.sums["loss"]) / max(window.count, 1)


def describe_student(trainer) -> str:
    spec = trainer.model_spec["model_args"]
    module = trainer.engine.module
    module = getattr(module, "_orig_mod", module)
    fused = all(getattr(b.attn, "fused_attn", False) for b in module.blocks)
    return (
        f"student: {trainer.model_spec['architecture']} (patch {spec['patch_size']}, width "
        f"{spec['embed_dim']}, depth {spec['depth']}, heads {spec['num_heads']}), attention "
        f"{'fused scaled_dot_product_attention' if fused else 'explicit softmax (not fused)'}"
    )


def build_step(name, cfg, world, meta, args, step_batches, device) -> tuple[StepRecipe, float]:
    """A step recipe built like `deitlt train` builds its trainer, after its warm-up steps."""
    from deitlt_scale.engine.trainer import Trainer

    memory = Memory(device)
    trainer = Trainer(cfg, world, meta=meta).build(with_data=args.shards is not None)
    print(f"{name}: {describe_student(trainer)}", flush=True)
    batches = _epochs(trainer.train_loader) if args.shards else step_batches()
    recipe = StepRecipe(trainer, batches, name)
    return recipe, warm_up(recipe, args.warmup, device, memory)


def warm_up(recipe, steps: int, device, memory: Memory) -> float:
    """Run the untimed steps (compilation, autotuning, allocator growth); the peak memory (MiB)
    they reached, which is the recipe's steady-state peak."""
    for _ in progress(steps, f"{recipe.name} warm-up"):
        recipe.run(1)
    sync(device)
    return memory.peak_mib()


def _epochs(loader) -> Iterator[Any]:
    """The DALI train loader's batches, epoch after epoch."""
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


# --------------------------------------------------------------------------------------------
# Measurement


@dataclass
class Measured:
    """A recipe being measured: its untimed-warm-up peak memory, description, model FLOPs per
    image and timed rates."""

    recipe: Any
    peak_mib: float
    how: str
    flops: Any  # TrainingFlops
    rates: list[float] = field(default_factory=list)
    timing: Timing | None = None

    def finish(self) -> Measured:
        """Read the mean loss (a device read: after timing) and drop a step recipe's trainer."""
        self.timing = Timing(
            self.rates, self.recipe.images_per_step, self.peak_mib, self.recipe.mean_loss()
        )
        self.recipe = _Finished(self.recipe.name)
        return self


class _Finished(NamedTuple):
    name: str


def training_flops(cfg, teacher: str, num_classes: int):
    from deitlt_scale.benchmarks.flops import (
        TrainingFlops,
        student_forward_flops,
        teacher_forward_flops,
    )

    size = cfg.data.image_size
    return TrainingFlops(
        student_forward_flops(cfg.model, num_classes, size),
        teacher_forward_flops(teacher, num_classes, size) if teacher != "none" else 0,
    )
