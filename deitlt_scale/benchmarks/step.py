"""`deitlt bench step`: images/s and MFU of the training step against the reference recipe.

Two recipes train the same student with the same frozen teacher, batch, image size and data in
one process:

* **step**: the project's :class:`~deitlt_scale.engine.trainer.Trainer` exactly as `deitlt train`
  builds it (DeepSpeed engine, bf16 on CUDA, ZeRO ``--zero``, ``torch.compile`` on CUDA, the teacher
  in bf16 and channels_last, mixup on device, the one-step-late flag exchange), fed by the DALI
  train loader (``--shards``) or by device-resident synthetic images (``--synthetic``).
* **reference**: the original code's loop in plain torch
  (:mod:`~deitlt_scale.benchmarks.reference_step`): timm's eager distilled ViT, timm Mixup,
  ``torch.autocast`` fp16 + ``GradScaler`` around student, teacher (fp32 weights, run in fp16 by
  autocast) and loss, ``loss.item()`` every step (the finiteness check), torch AdamW; with
  ``--shards`` the CPU-side timm augmentation of :mod:`deitlt_scale.data.reference`. On a CPU
  fp16 autocast is used when it works, else bf16 (the line says which).

The teacher has random weights (written to a temporary teacher file): throughput does not depend
on them. Model FLOPs per image come from :mod:`deitlt_scale.benchmarks.flops` (student
forward + backward = 3 forwards, teacher forward once); MFU divides the model FLOP rate by a
matrix-rate ceiling measured in the same run (a large bf16 matmul on CUDA, fp32 on CPU). The first
``--warmup`` steps of each recipe (compilation, autotuning, allocator growth) are not timed; then
``--rounds`` rounds of ``--steps`` steps are, each from an idle device to an idle device. With
synthetic data the two recipes alternate round by round, so a change in the machine's load
affects both alike; the median round is reported. With ``--shards`` they run one after the other
(a loader would keep prefetching while the other recipe runs). Figures print per recipe; the
ratios print last.

``--ablate KEY=VALUE[,KEY=VALUE]`` adds variants of the step recipe, each built with those config
overrides (``teacher.side_stream=false``, ``optim.fused=false``, ``model.compile_mode=...``) and
measured in the same rounds, so one run gives what each optimisation is worth
(``ratio step[...]/step``).

``--overhead`` measures something else: the framework's cost per step over a plain torch loop
doing exactly the same work (same weights, batches, teacher, mixup, objective, AdamW groups and
lr; fp32, eager), the recipe's step (``--recipe``, default ``recipes/tiny_digits.yaml``) on
in-memory batches; see :mod:`~deitlt_scale.benchmarks.overhead`.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deitlt_scale.benchmarks.measure import (
    MatmulCeiling,
    Memory,
    Timing,
    memory_kind,
    progress,
    timed,
)
from deitlt_scale.benchmarks.reference_step import ReferenceRecipe, reference_amp_dtype
from deitlt_scale.benchmarks.step_recipe import (
    MODEL_KEYS,
    Measured,
    ablation_overrides,
    bench_config,
    build_step,
    model_overrides,
    training_flops,
    warm_up,
)
from deitlt_scale.benchmarks.synthetic import (
    synthetic_batches,
    synthetic_meta,
    write_random_teacher,
)

HELP = (
    "images/s, model FLOPs and MFU of the training step vs the reference recipe; --overhead: "
    "ms/step of the framework's step vs a plain torch loop doing the same work"
)

TEACHERS = ("resnet50", "resnet32", "none")


def register(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--synthetic",
        action="store_true",
        help="device-resident random images and labels (no DALI, no decoding)",
    )
    source.add_argument(
        "--shards",
        type=Path,
        help="prepared dataset directory (meta.json): the step reads it through DALI, the "
        "reference through the CPU-side timm loader",
    )
    source.add_argument(
        "--overhead",
        action="store_true",
        help="the framework's step (Trainer + DeepSpeed engine, built from --recipe) against a "
        "plain torch loop doing the same work (same weights, in-memory batches, teacher, mixup, "
        "DeiTLTObjective, AdamW groups and lr; fp32): ms/step of both, alternating rounds, the "
        "ratio framework/plain last; fails when the two sides' weights disagree afterwards",
    )
    parser.add_argument(
        "--recipe",
        type=Path,
        default=None,
        help="with --overhead: the recipe whose step is measured (default recipes/tiny_digits.yaml"
        "); --model, --model-args, --batch, --image-size and --zero override it",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="with --overhead: more alternating rounds with every part of both steps timed "
        "(engine forward/backward/step, ZeRO optimizer, flag exchange, StepWindow, lr, ...), "
        "printed as ms/step per part",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="student architecture (a timm DeiT name; default deit_base_distilled_patch16_224, "
        "with --overhead the recipe's)",
    )
    parser.add_argument(
        "--model-args",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help=f"student overrides, keys: {', '.join(MODEL_KEYS)} (e.g. patch_size=4 depth=4)",
    )
    parser.add_argument(
        "--teacher",
        choices=TEACHERS,
        default=None,
        help="frozen teacher (random weights) run on every batch; none: no distillation "
        "(default resnet50, with --overhead resnet32)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="images per step (default 128; with --overhead the recipe's train.micro_batch)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="student and teacher input side in px (224; with --overhead the recipe's)",
    )
    parser.add_argument(
        "--classes",
        type=int,
        default=None,
        help="number of classes with --synthetic (default 1000) and --overhead (default 10); "
        "--shards uses the dataset's",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (10)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="timed rounds per recipe; with --synthetic the two recipes alternate round by round "
        "and the median round is reported (3)",
    )
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed steps before timing, per recipe (5)"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where to train (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the student of the step recipe (default: on for cuda, off for cpu)",
    )
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="DeepSpeed bf16 and a bf16 teacher in the step recipe (default: on for cuda, off "
        "for cpu, whose bf16 is emulated)",
    )
    parser.add_argument(
        "--zero",
        type=int,
        choices=(0, 1, 2, 3),
        default=None,
        help="DeepSpeed ZeRO stage (default 1; with --overhead the recipe's)",
    )
    parser.add_argument(
        "--reference-amp",
        choices=("auto", "fp16", "bf16", "off"),
        default="auto",
        help="autocast of the reference recipe (auto: fp16 + GradScaler, on cpu bf16 when fp16 "
        "autocast does not work there)",
    )
    parser.add_argument(
        "--ablate",
        nargs="+",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="variants of the step recipe, each with these config overrides (e.g. "
        "teacher.side_stream=false optim.fused=false model.compile_mode=max-autotune), measured "
        "in the same run as the step recipe; each one's ratio to the step recipe prints last",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=8,
        help="with --shards: DALI CPU threads and reference DataLoader workers (8)",
    )


# --------------------------------------------------------------------------------------------
# Command


# Defaults of the throughput comparison; with --overhead the recipe gives them instead.
THROUGHPUT_DEFAULTS = {
    "model": "deit_base_distilled_patch16_224",
    "teacher": "resnet50",
    "batch": 128,
    "image_size": 224,
    "classes": 1000,
    "zero": 1,
}


def _check_args(args: argparse.Namespace) -> None:
    from deitlt_scale import config as config_mod
    from deitlt_scale.errors import UserError

    if args.overhead:
        _check_overhead_args(args)
    else:
        for flag in ("recipe", "breakdown"):
            if getattr(args, flag):
                raise UserError(f"--{flag} needs --overhead")
        for key, value in THROUGHPUT_DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    for flag in ("batch", "steps", "rounds", "image_size", "classes", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.warmup < 1:
        raise UserError("--warmup must be >= 1 (the first step builds caches and compiles)")
    if args.batch is not None and args.batch % 2:
        raise UserError(f"--batch must be even (mixup pairs sample i with B-1-i), got {args.batch}")
    if args.shards is not None and not (args.shards / "meta.json").is_file():
        raise UserError(f"--shards {args.shards} holds no meta.json; prepare it with deitlt data")
    model_overrides(args.model_args)  # a bad KEY=VALUE fails before anything is built
    for variant in args.ablate:  # unknown keys and bad values, before anything is built
        config_mod.load(None, list(ablation_overrides(variant)))


def _check_overhead_args(args: argparse.Namespace) -> None:
    """--overhead compares fp32 eager steps on in-memory batches: the throughput comparison's
    own flags do not apply to it."""
    from deitlt_scale.benchmarks.overhead import DEFAULT_RECIPE
    from deitlt_scale.errors import UserError

    if args.ablate or args.bf16 or args.compile or args.reference_amp != "auto":
        raise UserError(
            "--overhead compares fp32 eager steps; drop --ablate, --bf16, --compile and "
            "--reference-amp (the recipe gives the rest)"
        )
    if args.recipe is None:
        args.recipe = DEFAULT_RECIPE
    if not args.recipe.is_file():
        raise UserError(f"--recipe {args.recipe} does not exist")


def _figures(name: str, t: Timing, flops_per_image: int, ceiling: float, device, how: str) -> str:
    from deitlt_scale.benchmarks.flops import format_flops

    rate = t.images_per_s * flops_per_image
    rounds = ", ".join(f"{r:.1f}" for r in t.round_rates)
    return (
        f"{name}: {t.images_per_s:.1f} images/s, {t.seconds_per_step * 1e3:.2f} ms/step, "
        f"{format_flops(rate)}/s model, MFU {100 * rate / ceiling:.2f}%, peak memory "
        f"{t.peak_mib:.0f} MiB ({memory_kind(device)}), loss {t.loss:.4g} [{how}]; "
        f"rounds {rounds} images/s"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from deitlt_scale.engine.distributed import init_distributed, shutdown_distributed
    from deitlt_scale.errors import UserError

    _check_args(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but CUDA is not available; use --device cpu")
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    was_initialised = torch.distributed.is_initialized()
    world = init_distributed(device_name)
    try:
        if world.world_size != 1:
            raise UserError("deitlt bench step runs as one process; start it without torchrun/srun")
        with tempfile.TemporaryDirectory(prefix="deitlt-bench-step-") as tmp:
            if args.overhead:
                from deitlt_scale.benchmarks.overhead import OverheadFailed, run_overhead

                try:
                    run_overhead(args, world, Path(tmp))
                except OverheadFailed as err:
                    print(f"error: {err}", file=sys.stderr, flush=True)
                    return 1
            else:
                _bench(args, world, Path(tmp))
    finally:
        if not was_initialised:
            shutdown_distributed()
    return 0


def _bench(args: argparse.Namespace, world, tmp: Path) -> None:
    import torch

    from deitlt_scale.benchmarks.flops import format_flops
    from deitlt_scale.data import meta as meta_io

    device = world.device
    on_cuda = device.type == "cuda"
    bf16 = on_cuda if args.bf16 is None else args.bf16
    compile_student = on_cuda if args.compile is None else args.compile
    if args.shards is not None:
        meta = meta_io.load(args.shards)
    else:
        meta = synthetic_meta(args.classes, args.batch * (args.warmup + args.steps * args.rounds))
    num_classes = meta.num_classes
    teacher_dir = None
    if args.teacher != "none":
        teacher_dir = write_random_teacher(
            tmp / "teacher", args.teacher, num_classes, args.image_size
        )

    def config(extra: tuple[str, ...] = ()):
        return bench_config(
            args,
            device=device.type,
            bf16=bf16,
            compile_student=compile_student,
            teacher_dir=teacher_dir,
            run_dir=tmp / "run",
            extra=extra,
        )

    cfg = config()
    variants = {"step": cfg}
    for variant in args.ablate:
        variants[f"step[{variant}]"] = config(ablation_overrides(variant))
    teacher_arch = args.teacher if teacher_dir else "none"
    flops = training_flops(cfg, teacher_arch, num_classes)
    # Loaders keep prefetching while the other recipe runs, so with real data the recipes run
    # one after the other; synthetic batches allow alternating rounds (fair under varying load).
    alternate = args.shards is None
    hardware = (
        f"cuda ({torch.cuda.get_device_name(device)})"
        if on_cuda
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    source = (
        f"shards {args.shards} (DALI {cfg.data.device} for the step, CPU-side timm DataLoader "
        f"with {args.threads} workers for the reference)"
        if args.shards
        else "synthetic (device-resident random images)"
    )
    order = "alternating" if alternate else "one recipe after the other"
    print(
        f"setup: device {hardware}, torch {torch.__version__}; data {source}; batch {args.batch}, "
        f"{args.image_size} px, {num_classes} classes; {args.warmup} warm-up steps, then "
        f"{args.rounds} timed rounds of {args.steps} steps per recipe, {order}",
        flush=True,
    )
    print(
        f"model FLOPs per image: {format_flops(flops.total)} ({flops.total}) = student "
        f"3 x {format_flops(flops.student_forward)} (forward + backward) + teacher "
        f"{format_flops(flops.teacher_forward)} (forward only, {args.teacher})",
        flush=True,
    )
    ceiling = MatmulCeiling(device)
    ceiling.sample(rounds=3)

    def step_batches() -> Iterator[Any]:
        return synthetic_batches(args.batch, args.image_size, num_classes, device)

    # The step recipe and its variants: the real Trainer, built as `deitlt train` builds it.
    measured: list[Measured] = []
    for name, variant_cfg in variants.items():
        recipe, peak = build_step(name, variant_cfg, world, meta, args, step_batches, device)
        how = _step_how(variant_cfg, teacher_dir, on_cuda)
        entry = Measured(recipe, peak, how, training_flops(variant_cfg, teacher_arch, num_classes))
        if alternate:
            measured.append(entry)
        else:
            entry.rates = timed(recipe, args.rounds, args.steps, device, ceiling)
            measured.append(entry.finish())
            del recipe, entry
            gc.collect()  # the trainer and its loader go before the next recipe is built

    # The reference recipe.
    amp_dtype, amp_how = reference_amp_dtype(args.reference_amp, device)
    memory = Memory(device)
    if args.shards is not None:
        from deitlt_scale.data.reference import ReferenceLoader

        tars = [tar for tar, _ in meta.shard_files("train")]
        workers = min(args.threads, len(tars))
        ref_batches = iter(ReferenceLoader(tars, cfg.data, args.batch, workers, device=device))
    else:
        ref_batches = step_batches()
    reference = ReferenceRecipe(cfg, num_classes, teacher_dir, ref_batches, device, amp_dtype)
    ref_teacher = "no teacher"
    if teacher_dir:
        ref_teacher = "teacher fp32 weights" + (" under the same autocast" if amp_dtype else "")
    ref = Measured(
        reference,
        warm_up(reference, args.warmup, device, memory),
        f"eager student, {amp_how}, {ref_teacher}, torch AdamW, loss.item() every step",
        flops,
    )
    if alternate:
        for _ in progress(args.rounds, "timed rounds"):
            for entry in [*measured, ref]:
                entry.rates += timed(entry.recipe, 1, args.steps, device, ceiling)
        for entry in measured:
            entry.finish()
    else:
        ref.rates = timed(reference, args.rounds, args.steps, device, ceiling)
    ref.finish()

    print(f"matmul ceiling: {format_flops(ceiling.best)}/s ({ceiling.description})", flush=True)
    for entry in [*measured, ref]:
        name, total = entry.recipe.name, entry.flops.total
        print(_figures(name, entry.timing, total, ceiling.best, device, entry.how))
    step = measured[0].timing
    step_mfu = 100 * step.images_per_s * flops.total / ceiling.best
    ref_mfu = 100 * ref.timing.images_per_s * flops.total / ceiling.best
    print(f"ratio step/reference images/s: {step.images_per_s / ref.timing.images_per_s:.2f}x")
    print(f"ratio step/ceiling (MFU): {step_mfu:.2f}%")
    print(f"ratio reference/ceiling (MFU): {ref_mfu:.2f}%")
    for entry in measured[1:]:
        print(
            f"ratio {entry.recipe.name}/step images/s: "
            f"{entry.timing.images_per_s / step.images_per_s:.2f}x"
        )
    sys.stdout.flush()


def _step_how(cfg, teacher_dir: Path | None, on_cuda: bool) -> str:
    """What the step recipe runs; the side stream and fused AdamW act on CUDA only."""
    precision = "bf16" if cfg.deepspeed.bf16 else "fp32"
    teacher = "no teacher"
    if teacher_dir:
        layout = "channels_last" if cfg.teacher.channels_last else "contiguous"
        stream = ", side stream" if cfg.teacher.side_stream and on_cuda else ""
        teacher = f"teacher {cfg.teacher.dtype} {layout}{stream}"
    student = f"compiled ({cfg.model.compile_mode})" if cfg.model.compile else "eager"
    fused = on_cuda and cfg.optim.fused and cfg.optim.name == "adamw"
    fused = ", fused AdamW" if fused else ""
    return (
        f"DeepSpeed ZeRO {cfg.deepspeed.zero_stage}, {precision}, {student} student, "
        f"{teacher}{fused}"
    )
