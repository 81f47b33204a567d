"""`deitlt bench step --overhead`: what the framework costs per step over a plain torch loop
doing the same work.

Two sides train in one process from the same initial weights on the same in-memory batches
(:func:`~deitlt_scale.benchmarks.synthetic.synthetic_batches`, so data loading is excluded from
both):

* **framework**: :class:`~deitlt_scale.engine.trainer.Trainer` built as `deitlt train` builds it
  from the recipe (``--recipe``, default ``recipes/tiny_digits.yaml``; ZeRO stage from the recipe
  or ``--zero``), its DeepSpeed engine, ``Trainer.train_step`` as the loop runs it;
* **plain**: :class:`~deitlt_scale.benchmarks.plain_step.PlainStep`, the same work in plain torch.

Both run fp32 and eager (the recipe must not set bf16 or compile). After ``--warmup`` untimed
steps each, ``--rounds`` rounds alternate framework and plain (A B A B ...), ``--steps`` steps
each; a round's ms/step is its wall time over its steps, and the median round is reported. Then
the two sides' weights, after the same steps, are compared (:func:`~deitlt_scale.benchmarks.
plain_step.compare_weights`): they must agree to fp32 rounding, else the command fails (exit 1),
since a ratio between different work would mean nothing. ``--breakdown`` adds rounds in which
every part of both steps is timed (:class:`PartTimer`) and prints ms/step per part side by side.
The ratio framework/plain prints last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deitlt_scale.benchmarks.measure import progress, sync

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_digits.yaml"
DEFAULT_TEACHER = "resnet32"  # the tiny recipe's teacher (recipes/teacher_digits.yaml)
DEFAULT_CLASSES = 10  # the digits


class OverheadFailed(RuntimeError):
    """The two sides did not do the same work (their weights disagree)."""


# --------------------------------------------------------------------------------------------
# Set-up


def overhead_config(args: argparse.Namespace, teacher_dir: Path | None, run_dir: Path, device):
    """The recipe's Config with the benchmark's changes: the random teacher, no logging step, no
    checkpoints or tracking, and the command line's student, batch, size and ZeRO overrides."""
    from deitlt_scale import config as config_mod
    from deitlt_scale.benchmarks.step_recipe import LOG_NEVER, model_overrides

    overrides = list(model_overrides(args.model_args))
    if args.model is not None:
        overrides.append(f"model.arch={args.model}")
    if args.batch is not None:
        overrides.append(f"train.micro_batch={args.batch}")
    if args.image_size is not None:
        overrides.append(f"data.image_size={args.image_size}")
    if args.zero is not None:
        overrides.append(f"deepspeed.zero_stage={args.zero}")
    if teacher_dir is None:
        overrides.append("distill.type=none")
    overrides += [
        f"teacher.path={teacher_dir or ''}",
        f"train.log_every={LOG_NEVER}",
        f"train.max_steps={total_steps(args)}",
        "checkpoint.resume=false",
        "tracking.enabled=false",
        f"runtime.run_dir={run_dir}",
        f"runtime.device={device.type}",
        f"data.device={'gpu' if device.type == 'cuda' else 'cpu'}",
    ]
    return config_mod.load(args.recipe, overrides)


def total_steps(args: argparse.Namespace) -> int:
    """Optimizer steps each side runs: warm-up, timed rounds, breakdown rounds."""
    rounds = args.rounds * (2 if args.breakdown else 1)
    return args.warmup + rounds * args.steps


def check_recipe(cfg, recipe: Path) -> None:
    """The comparison is fp32 and eager on both sides; a recipe that says otherwise is refused."""
    from deitlt_scale.errors import UserError

    if cfg.deepspeed.bf16 or cfg.model.compile:
        raise UserError(
            f"--overhead compares fp32 eager steps, but {recipe} sets "
            f"deepspeed.bf16={cfg.deepspeed.bf16} model.compile={cfg.model.compile}; use a "
            "recipe without them (e.g. recipes/tiny_digits.yaml)"
        )
    if cfg.train.task == "teacher" or cfg.optim.name != "adamw":
        raise UserError(f"--overhead measures the student step with AdamW; {recipe} is not one")


# --------------------------------------------------------------------------------------------
# The parts of a step, timed


@dataclass
class PartTimer:
    """Wall time per named part, summed over the calls made while installed.

    :meth:`wrap` replaces an instance's attribute (a bound method or a callable object) by a
    timing wrapper; on CUDA it synchronises the device on both ends, so each part is charged the
    device work it queued (which serialises the step: the parts add up to more than the untimed
    step there). :meth:`remove` puts every original back."""

    device: Any
    seconds: dict[str, float] = field(default_factory=dict)
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def wrap(self, owner: Any, attr: str, part: str) -> None:
        original = getattr(owner, attr)
        had_own = attr in vars(owner)
        seconds, device = self.seconds, self.device
        seconds.setdefault(part, 0.0)

        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(device)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync(device)
                seconds[part] += time.perf_counter() - start

        setattr(owner, attr, timed)

        def undo() -> None:
            if had_own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)

        self._undo.append(undo)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


# Parts as (label, nested): a nested part runs inside the part listed before it and is not
# counted again in the parts' total.
FRAMEWORK_PARTS = (
    ("set lr", False),
    ("targets (mixup)", False),
    ("teacher forward", False),
    ("student forward (engine)", False),
    ("  of which the student module", True),
    ("loss", False),
    ("  of which DeiTLTObjective", True),
    ("backward (engine)", False),
    ("accumulation boundary", False),
    ("optimizer step (engine)", False),
    ("  of which the ZeRO optimizer", True),
    ("  of which torch AdamW", True),
    ("StepWindow.add", False),
    ("flag exchange", False),
)
PLAIN_PARTS = (
    ("set lr", False),
    ("targets (mixup)", False),
    ("teacher forward", False),
    ("student forward", False),
    ("loss", False),
    ("backward", False),
    ("torch AdamW step", False),
    ("zero_grad", False),
)


def instrument_framework(trainer, timer: PartTimer) -> None:
    task, engine = trainer.task, trainer.engine
    timer.wrap(trainer, "_set_lr", "set lr")
    timer.wrap(task, "inputs", "targets (mixup)")
    if task.teacher is not None:
        timer.wrap(task.teacher, "launch", "teacher forward")
    timer.wrap(engine, "forward", "student forward (engine)")
    timer.wrap(engine.module, "forward", "  of which the student module")
    timer.wrap(task, "loss", "loss")
    timer.wrap(task, "objective", "  of which DeiTLTObjective")
    timer.wrap(engine, "backward", "backward (engine)")
    timer.wrap(engine, "set_gradient_accumulation_boundary", "accumulation boundary")
    timer.wrap(engine, "step", "optimizer step (engine)")
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and inner is not optimizer:
        timer.wrap(optimizer, "step", "  of which the ZeRO optimizer")
        timer.wrap(inner, "step", "  of which torch AdamW")
    else:
        timer.wrap(optimizer, "step", "  of which torch AdamW")
    timer.wrap(trainer.window, "add", "StepWindow.add")
    timer.wrap(trainer, "_check_flags", "flag exchange")


def instrument_plain(plain, timer: PartTimer) -> None:
    timer.wrap(plain, "_set_lr", "set lr")
    timer.wrap(plain, "_targets", "targets (mixup)")
    if plain.teacher is not None:
        timer.wrap(plain, "teacher", "teacher forward")
    timer.wrap(plain.student, "forward", "student forward")
    timer.wrap(plain, "objective", "loss")
    timer.wrap(plain, "_backward", "backward")
    timer.wrap(plain.optimizer, "step", "torch AdamW step")
    timer.wrap(plain.optimizer, "zero_grad", "zero_grad")


def breakdown_lines(
    framework: dict[str, float], plain: dict[str, float], steps: int, whole: tuple[float, float]
) -> list[str]:
    """The breakdown table: ms/step of each part of each side, and the parts' totals against the
    timed steps' wall time (the rest: the loops themselves, next(batches), seeding)."""

    def rows(parts, seconds: dict[str, float], wall: float) -> list[str]:
        out, counted = [], 0.0
        for label, nested in parts:
            if label not in seconds:
                continue
            ms = 1e3 * seconds[label] / steps
            if not nested:
                counted += ms
            out.append(f"  {label:<32} {ms:9.3f} ms/step")
        wall_ms = 1e3 * wall / steps
        out.append(f"  {'outside the parts':<32} {wall_ms - counted:9.3f} ms/step")
        out.append(f"  {'whole step (with the timers)':<32} {wall_ms:9.3f} ms/step")
        return out

    return [
        f"breakdown framework ({steps} steps):",
        *rows(FRAMEWORK_PARTS, framework, whole[0]),
        f"breakdown plain ({steps} steps):",
        *rows(PLAIN_PARTS, plain, whole[1]),
    ]


# --------------------------------------------------------------------------------------------
# The command


def interleaved_rounds(
    sides: tuple[Any, ...], rounds: int, steps: int, device: Any, label: str
) -> dict[str, list[float]]:
    """Per side, the seconds of each of ``rounds`` rounds of ``steps`` steps, the sides taking
    turns within every round (so a slower spell of the machine hits both)."""
    seconds: dict[str, list[float]] = {side.name: [] for side in sides}
    for _ in progress(rounds, label):
        for side in sides:
            sync(device)
            t0 = time.perf_counter()
            side.run(steps)
            sync(device)
            seconds[side.name].append(time.perf_counter() - t0)
    return seconds


def run_overhead(args: argparse.Namespace, world, tmp: Path) -> None:
    """Build both sides, time them alternately, check the same work, print; raises
    :class:`OverheadFailed` when the weights disagree."""
    import torch

    from deitlt_scale.benchmarks.plain_step import PlainStep, compare_weights, engine_weights
    from deitlt_scale.benchmarks.step_recipe import StepRecipe, describe_student
    from deitlt_scale.benchmarks.synthetic import (
        synthetic_batches,
        synthetic_meta,
        write_random_teacher,
    )
    from deitlt_scale.engine.trainer import Trainer

    device = world.device
    teacher_arch = args.teacher or DEFAULT_TEACHER
    classes = args.classes or DEFAULT_CLASSES
    # The image size and batch come from the recipe (unless overridden); read them first.
    probe = overhead_config(args, None, tmp / "run", device)
    check_recipe(probe, args.recipe)
    size, batch = probe.data.image_size, probe.train.micro_batch
    teacher_dir = None
    if teacher_arch != "none":
        teacher_dir = write_random_teacher(tmp / "teacher", teacher_arch, classes, size)
    cfg = overhead_config(args, teacher_dir, tmp / "run", device)
    check_recipe(cfg, args.recipe)
    steps_total = total_steps(args)
    meta = synthetic_meta(classes, batch * cfg.train.grad_accum * steps_total)

    trainer = Trainer(cfg, world, meta=meta).build(with_data=False)
    framework = StepRecipe(trainer, synthetic_batches(batch, size, classes, device), "framework")
    plain = PlainStep(cfg, meta, device, synthetic_batches(batch, size, classes, device))
    initial = plain.weights()
    start = compare_weights(engine_weights(trainer.engine), initial, initial)
    if start.max_abs != 0.0:
        raise OverheadFailed(
            f"the two sides start from different weights (max |difference| {start.max_abs:.3g})"
        )

    threads = "" if device.type == "cuda" else f", {torch.get_num_threads()} threads"
    print(
        f"setup: device {device.type}{threads}, torch {torch.__version__}; recipe {args.recipe}; "
        f"batch {batch} x {cfg.train.grad_accum} micro-batches, {size} px, {classes} classes, "
        f"teacher {teacher_arch} (random weights, {cfg.teacher.dtype}); in-memory synthetic "
        f"batches; {args.warmup} warm-up steps, then {args.rounds} rounds of {args.steps} steps "
        "per side, alternating framework, plain",
        flush=True,
    )
    print(f"framework: {describe_student(trainer)}", flush=True)
    print(
        f"framework: Trainer.train_step, DeepSpeed ZeRO {cfg.deepspeed.zero_stage}, fp32, eager",
        flush=True,
    )
    print(
        "plain: torch loop, same student/teacher/targets/DeiTLTObjective, torch AdamW over the "
        "same parameter groups and lr, fp32, eager",
        flush=True,
    )
    for side in (framework, plain):
        for _ in progress(args.warmup, f"{side.name} warm-up"):
            side.run(1)
    sync(device)

    sides = (framework, plain)
    seconds = interleaved_rounds(sides, args.rounds, args.steps, device, "timed rounds")
    ms = {name: [1e3 * t / args.steps for t in times] for name, times in seconds.items()}

    breakdown: list[str] = []
    if args.breakdown:
        timers = {name: PartTimer(device) for name in ms}
        instrument_framework(trainer, timers["framework"])
        instrument_plain(plain, timers["plain"])
        whole = interleaved_rounds(sides, args.rounds, args.steps, device, "breakdown rounds")
        for timer in timers.values():
            timer.remove()
        breakdown = breakdown_lines(
            timers["framework"].seconds,
            timers["plain"].seconds,
            args.rounds * args.steps,
            (sum(whole["framework"]), sum(whole["plain"])),
        )

    losses = (framework.mean_loss(), plain.mean_loss())  # also raises on a non-finite loss
    check = compare_weights(engine_weights(trainer.engine), plain.weights(), initial)
    print(
        f"same work: after {steps_total} steps each from the same initial weights and batches, "
        f"the weights {check.describe()}; mean loss framework {losses[0]:.6g}, plain "
        f"{losses[1]:.6g}",
        flush=True,
    )
    if not check.ok:
        raise OverheadFailed(
            f"the framework and plain sides did not do the same work: their weights disagree "
            f"after {steps_total} steps ({check.describe()})"
        )
    for line in breakdown:
        print(line)
    medians = {name: statistics.median(values) for name, values in ms.items()}
    for name, values in ms.items():
        rounds = ", ".join(f"{v:.2f}" for v in values)
        print(f"{name}: {medians[name]:.2f} ms/step (median of rounds {rounds})")
    paired = statistics.median(f / p for f, p in zip(ms["framework"], ms["plain"], strict=True))
    print(
        f"ratio framework/plain ms/step: {medians['framework'] / medians['plain']:.3f}x "
        f"(median of the per-round ratios {paired:.3f}x)"
    )
    sys.stdout.flush()
