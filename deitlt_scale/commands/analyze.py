"""`deitlt analyze`: plot the paper's diagnostics: attention distance, rollout, CLS/DIST divergence,
feature rank, teacher entropy and per-class accuracy. See docs/analysis.md."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

HELP = (
    "plot the paper's diagnostics: attention distance, rollout, CLS/DIST divergence, rank, "
    "teacher entropy, per-class accuracy"
)
WHAT = ("distance", "rollout", "divergence", "rank", "entropy", "per-class")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        metavar="RUN_DIR|EXPORT",
        help="a run directory of `deitlt train` or an export directory of `deitlt export`",
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="prepared dataset directory (meta.json); default: data.shards of the run's config",
    )
    parser.add_argument("--out", metavar="DIR", required=True, help="where plots and tables go")
    parser.add_argument(
        "--what",
        default=",".join(WHAT),
        help=f"comma-separated analyses to run (default: all of {','.join(WHAT)})",
    )
    parser.add_argument(
        "--compare",
        metavar="RUN_DIR|EXPORT",
        help="a second model (e.g. a ViT baseline or another checkpoint) for distance and rank",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=2048,
        metavar="N",
        help="eval images to analyse, class-balanced (default 2048; 0 = the whole eval split)",
    )
    parser.add_argument(
        "--rollout-images",
        type=int,
        default=6,
        metavar="K",
        help="tail-class images shown with their attention rollout (default 6)",
    )
    parser.add_argument(
        "--checkpoint",
        metavar="TAG",
        help="checkpoint of RUN_DIR to load: a step tag, latest or best (default: latest)",
    )
    parser.add_argument(
        "--compare-checkpoint", metavar="TAG", help="checkpoint of the --compare run directory"
    )
    parser.add_argument("--name", help="label of the model in plots (default: its directory name)")
    parser.add_argument("--compare-name", help="label of the --compare model in plots")
    parser.add_argument(
        "--teacher",
        metavar="DIR",
        help="teacher directory for the entropy plot (default: teacher.path of the run's config)",
    )
    parser.add_argument(
        "--groups",
        choices=("paper", "count"),
        default="paper",
        help="Head/Mid/Tail convention: the paper's index boundaries or >100/20-100/<20 images",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, metavar="B", help="eval batch size (default 64)"
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the models run (default: cuda when available)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the augmentation and mixing of the OOD images (entropy plot)",
    )
    parser.add_argument(
        "--no-mlflow",
        action="store_true",
        help="do not log the outputs to the run's MLflow run",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from deitlt_scale.analysis.loading import load_subject, load_teacher_model, teacher_path
    from deitlt_scale.analysis.run import (
        Options,
        analyze,
        output_files,
        parse_what,
        summary_metrics,
    )
    from deitlt_scale.analysis.tracked import COSINE_METRIC, open_tracker
    from deitlt_scale.data import meta as meta_io
    from deitlt_scale.data.loader import EvalLoader
    from deitlt_scale.errors import UserError

    what = parse_what(args.what)
    for flag, value, low in (("--images", args.images, 0), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")

    subject = load_subject(args.target, device, args.checkpoint, args.name)
    compare = None
    if args.compare:
        compare = load_subject(args.compare, device, args.compare_checkpoint, args.compare_name)
        if compare.name == subject.name:
            compare.name = f"{compare.name} (compare)"
    cfg = subject.config
    data_dir = args.data or (cfg.data.shards if cfg is not None else None)
    if not data_dir:
        raise UserError(f"{args.target} does not name its dataset: pass --data DIR")
    meta = meta_io.load(data_dir)

    teacher = None
    if "entropy" in what:
        path = teacher_path(subject, args.teacher)
        if path is not None:
            teacher = load_teacher_model(path, device, subject.mean, subject.std)
    tracker = None
    if not args.no_mlflow and subject.run_dir is not None:
        tracker = open_tracker(subject.run_id, cfg.tracking if cfg else None, subject.run_dir)
    history = tracker.history(COSINE_METRIC) if tracker and "divergence" in what else None

    data = _data_config(subject, Path(data_dir))
    loader = EvalLoader(meta, data, args.batch_size, rank=0, world_size=1, device=device)
    options = Options(
        what=what, images=args.images, rollout_images=args.rollout_images, groups=args.groups
    )
    wanted = min(args.images or meta.num_samples("eval"), meta.num_samples("eval"))
    ood = _ood_images(subject, meta, data, wanted, args.batch_size, args.seed, device)
    summary = analyze(
        subject,
        meta,
        loader,
        args.out,
        options,
        compare=compare,
        teacher=teacher,
        ood_images=ood if teacher is not None else None,
        history=history,
        total_batches=len(loader),
    )

    if tracker is not None:
        tracker.log_files(output_files(args.out, summary))
        tracker.log_metrics(summary_metrics(summary))
    for name, entry in summary["outputs"].items():
        print(f"{name}: {Path(args.out) / entry['png']}")
    for name, reason in summary["skipped"].items():
        print(f"{name}: skipped ({reason})", file=sys.stderr)
    if tracker is not None:
        print(f"logged to MLflow run {tracker.run_id}")
    return 0


def _data_config(subject, data_dir: Path):
    """The run's data config pointed at ``data_dir``, with ``subject``'s input size and
    normalisation (an export without its run gets the defaults and the export's crop)."""
    import dataclasses

    from deitlt_scale.config import AugmentConfig, DataConfig

    if subject.config is not None:
        data = dataclasses.replace(subject.config.data, shards=str(data_dir))
    else:
        crop = subject.eval_crop_pct or AugmentConfig().eval_crop_pct
        data = DataConfig(shards=str(data_dir), augment=AugmentConfig(eval_crop_pct=crop))
    return dataclasses.replace(
        data, image_size=subject.image_size, mean=tuple(subject.mean), std=tuple(subject.std)
    )


def _ood_images(subject, meta, data, wanted: int, batch_size: int, seed: int, device):
    """Lazily, about ``wanted`` training images as the teacher sees them while distilling: the
    train loader's strong augmentation, then the trainer's Mixup/CutMix."""
    import dataclasses

    from deitlt_scale.analysis.teacher import mixed
    from deitlt_scale.config import MixupConfig
    from deitlt_scale.data.loader import TrainLoader
    from deitlt_scale.data.mixing import Mixer

    train = meta.num_samples("train")
    micro = max(2, min(batch_size, train) // 2 * 2)  # mixing pairs images: an even batch
    batches = max(1, min(math.ceil(wanted / micro), train // micro))
    mixup = subject.config.data.mixup if subject.config is not None else MixupConfig()

    def generate():
        once = dataclasses.replace(data, repeated_aug=1, epoch_multiple=1)  # every image once
        loader = TrainLoader(meta, once, micro, batches, 0, 1, seed, device)
        yield from mixed(loader.epoch(0), Mixer(mixup, meta.num_classes), seed)

    return generate()
