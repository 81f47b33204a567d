"""`deitlt data`: prepare long-tailed WebDataset shards (prepare), inspect them (inspect), list
the order the train loader reads them in (order), and draw what a recipe trains on (preview)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from deitlt_scale.data import source_table

HELP = "prepare long-tailed WebDataset shards, inspect them, list the train order, preview"
PLOT_FILE = "class_counts.png"
SOURCES = tuple(source_table.SOURCES)  # the source table imports only the standard library

_PREPARE_EPILOG = f"""\
sources and what they read:
{source_table.help_rows()}
examples:
  deitlt data prepare digits-lt --out data/digits-lt
  deitlt data prepare cifar10-lt --root raw/ --imbalance 100 --out data/cifar10lt_r100
  deitlt data prepare imagenet-lt --root /data/imagenet --train-list ImageNet_LT_train.txt \\
      --eval-list ImageNet_LT_test.txt --out data/imagenet-lt --workers 16
A killed run resumes when rerun with the same arguments."""


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    prep = sub.add_parser(
        "prepare",
        help="write the long-tailed train/eval shards, DALI indexes and meta.json",
        description="Prepare a raw dataset as shuffled WebDataset tar shards (key.jpg + key.cls),"
        " one DALI index per shard, and meta.json (counts, class map, Head/Mid/Tail groups).",
        epilog=_PREPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prep.add_argument("source", choices=SOURCES, help="raw dataset kind (see below)")
    prep.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="output directory for the shards"
    )
    prep.add_argument(
        "--root", type=Path, metavar="RAW", help="where the raw dataset is (all but digits-lt)"
    )
    prep.add_argument(
        "--train-list", type=Path, metavar="FILE", help="training list: '<path> <label>' per line"
    )
    prep.add_argument(
        "--eval-list", type=Path, metavar="FILE", help="eval list: '<path> <label>' per line"
    )
    prep.add_argument(
        "--eval-root", type=Path, metavar="DIR", help="folder: class folders of the eval split"
    )
    prep.add_argument(
        "--eval-fraction",
        metavar="F",
        type=float,
        help="folder: hold out this fraction of the smallest class, from every class, for eval",
    )
    prep.add_argument(
        "--imbalance",
        metavar="RHO",
        type=float,
        help="N_max/N_min of the long-tailed split (cifar: 100, digits-lt: 20; e.g. 50)",
    )
    prep.add_argument(
        "--profile", choices=("exp", "step"), default="exp", help="long-tail profile (exp)"
    )
    prep.add_argument(
        "--num-classes",
        metavar="K",
        type=int,
        help="list sources: number of classes (imagenet-lt 1000, inat2018 8142, list: max label+1)",
    )
    prep.add_argument(
        "--name", metavar="NAME", help="folder/list: dataset name in meta.json (default: root name)"
    )
    prep.add_argument(
        "--val-per-class",
        metavar="K",
        type=_val_per_class,
        help="cifar/digits: hold out K images per class as a val split for model selection, from "
        "the training images the long tail leaves unused (never the test split); 'all': every "
        "unused image (class-imbalanced: choose on its mean per-class accuracy)",
    )
    prep.add_argument(
        "--val-list",
        type=Path,
        metavar="FILE",
        help="list sources: val list, e.g. the official ImageNet_LT_val.txt / Places_LT_val.txt",
    )
    prep.add_argument(
        "--shard-size",
        metavar="SIZE",
        default="256MB",
        help="target shard size, e.g. 256MB, 64MiB (256MB)",
    )
    prep.add_argument(
        "--workers",
        metavar="N",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="encoding processes (default: the CPUs available)",
    )
    prep.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed of the order across shards (0)"
    )
    prep.add_argument(
        "--max-skip-fraction",
        metavar="F",
        type=float,
        default=0.01,
        help="fail when more than this fraction of entries is skipped (0.01)",
    )
    prep.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip and count bad list lines (missing file, bad label, duplicate) instead of failing",
    )
    prep.add_argument(
        "--overwrite", action="store_true", help="replace a different dataset already in --out"
    )
    prep.add_argument("--no-progress", action="store_true", help="no progress bar or messages")
    prep.set_defaults(_data=_run_prepare)

    insp = sub.add_parser(
        "inspect",
        help="print class counts and shards, plot counts, verify checksums and indexes",
        description="Print the class-count histogram, Head/Mid/Tail groups and shard list of a "
        "prepared directory, write a PNG of the counts, and verify every shard's sha256 and "
        "DALI index against its tar. Exits 1 when anything does not match.",
    )
    insp.add_argument("directory", type=Path, help="a directory written by `deitlt data prepare`")
    insp.add_argument(
        "--plot",
        type=Path,
        metavar="PNG",
        help=f"where to write the PNG (default: DIRECTORY/{PLOT_FILE})",
    )
    insp.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    insp.set_defaults(_data=_run_inspect)

    order = sub.add_parser(
        "order",
        help="write which sample each rank trains on at every position of the first epochs",
        description="Run the recipe's train loader (no model) for each simulated rank and write "
        "one CSV row per trained image: epoch, optimizer step, micro-batch, rank, position, "
        "sample key. Prints per epoch the distinct images, copies per image, optimizer steps "
        "and the Spearman correlation of sample positions with the previous epoch.",
    )
    order.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny_digits.yaml")
    order.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. data.shards=data/digits-lt"
    )
    order.add_argument(
        "--world-size", type=int, default=1, metavar="W", help="ranks to simulate (default 1)"
    )
    order.add_argument("--epochs", type=int, default=2, metavar="E", help="epochs (default 2)")
    order.add_argument("--out", required=True, type=Path, metavar="FILE.csv", help="CSV to write")
    order.add_argument(
        "--no-decode",
        action="store_true",
        help="read the loader's plan (what it feeds DALI) instead of decoding every image",
    )
    order.set_defaults(_data=_run_order)

    preview = sub.add_parser(
        "preview",
        help="draw what the student trains on (augmented, mixed, the teacher's label on each) "
        "and what its teacher trained on",
        description="Draw the first micro-batch of the recipe as the trainer builds it (DALI "
        "augmentation, Mixup/CutMix, the frozen teacher's label on each mixed image, green when "
        "it names one of the image's labels, red when neither) above the first micro-batch of "
        "the teacher's own recipe. Prints how often the teacher agreed.",
    )
    preview.add_argument("recipe", help="student recipe, e.g. recipes/tiny_digits.yaml")
    preview.add_argument("overrides", nargs="*", help="dotted overrides, as for deitlt train")
    preview.add_argument("--out", required=True, type=Path, metavar="PNG", help="PNG to write")
    preview.add_argument(
        "--images", type=int, default=24, metavar="N", help="student images (even; default 24)"
    )
    preview.add_argument(
        "--teacher-recipe",
        metavar="YAML",
        help="the teacher's recipe (default: the config.yaml of the run that wrote teacher.path)",
    )
    preview.set_defaults(_data=_run_preview)


def run(args: argparse.Namespace) -> int:
    return int(args._data(args) or 0)


def _run_prepare(args: argparse.Namespace) -> int:
    from deitlt_scale.data.prepare import prepare_dataset

    meta = prepare_dataset(
        args.source,
        args.out,
        root=args.root,
        train_list=args.train_list,
        eval_list=args.eval_list,
        eval_root=args.eval_root,
        eval_fraction=args.eval_fraction,
        imbalance=args.imbalance,
        profile=args.profile,
        num_classes=args.num_classes,
        name=args.name,
        val_per_class=args.val_per_class,
        val_list=args.val_list,
        shard_size=args.shard_size,
        workers=args.workers,
        seed=args.seed,
        max_skip_fraction=args.max_skip_fraction,
        skip_bad=args.skip_bad,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    counts = meta.train_counts
    print(f"prepared {meta.dataset} in {args.out}")
    print(
        f"  train: {meta.num_samples('train')} images, {meta.num_classes} classes, "
        f"{counts[0]}..{counts[-1]} per class (imbalance {meta.imbalance_factor:g}), "
        f"{len(meta.splits['train']['shards'])} shard(s)"
    )
    print(
        f"  eval:  {meta.num_samples('eval')} images, {len(meta.splits['eval']['shards'])} shard(s)"
    )
    if "val" in meta.splits:
        print(
            f"  val:   {meta.num_samples('val')} images, "
            f"{len(meta.splits['val']['shards'])} shard(s) (held out for model selection)"
        )
    print(f"  skipped: {len(meta.skipped)}" + (" (listed in meta.json)" if meta.skipped else ""))
    return 0


# --------------------------------------------------------------------------- inspect


def histogram_lines(train_counts: list[int], class_names: list[str], width: int = 40) -> list[str]:
    """The class-count histogram as text, bars on a log scale; one row per class up to 100
    classes, otherwise 50 rows of consecutive classes (their mean count)."""
    k = len(train_counts)
    top = math.log10(max(max(train_counts), 1) + 1)
    per_row = 1 if k <= 100 else math.ceil(k / 50)
    lines = [f"training images per class (bars: log scale, {per_row} class(es) per row)"]
    for start in range(0, k, per_row):
        block = train_counts[start : start + per_row]
        value = sum(block) / len(block)
        bar = "#" * max(1, round(width * math.log10(value + 1) / top)) if value else ""
        if per_row == 1:
            label = f"{start:>5} {class_names[start][:16]:<16}"
            shown = f"{block[0]:>7}"
        else:
            label = f"{start:>5}-{start + len(block) - 1:<5}" + " " * 11
            shown = f"{value:>7.0f}"
        lines.append(f"{label} {shown} {bar}")
    return lines


def group_lines(meta) -> list[str]:
    """Head/Mid/Tail class and image counts under both conventions."""
    from deitlt_scale.data.longtail import GROUP_NAMES

    lines = []
    for convention, title in (
        ("paper", f"paper index boundaries {list(meta.boundaries)}"),
        ("count", "count thresholds >100 / 20-100 / <20"),
    ):
        groups = meta.groups[convention]
        parts = []
        for g, name in enumerate(GROUP_NAMES):
            members = [c for c, gc in enumerate(groups) if gc == g]
            train = sum(meta.train_counts[c] for c in members)
            evals = sum(meta.eval_counts[c] for c in members)
            parts.append(f"{name} {len(members)} classes ({train} train / {evals} eval)")
        lines.append(f"{title}: " + ", ".join(parts))
    return lines


def plot_counts(meta, path: Path) -> Path:
    """PNG: training images per class (log y), Head/Mid/Tail bands of the paper convention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deitlt_scale.data.longtail import GROUP_NAMES

    k = meta.num_classes
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    groups = meta.groups["paper"]
    colours = ("#4c72b0", "#dd8452", "#c44e52")
    for g, name in enumerate(GROUP_NAMES):
        members = [c for c in range(k) if groups[c] == g]
        if members:
            ax.axvspan(
                min(members) - 0.5,
                max(members) + 0.5,
                color=colours[g],
                alpha=0.12,
                label=f"{name.capitalize()} ({len(members)} classes)",
            )
    ax.bar(range(k), meta.train_counts, width=1.0 if k > 50 else 0.8, color="#333333")
    if any(meta.eval_counts):
        ax.step(range(k), meta.eval_counts, where="mid", color="#55a868", label="eval images")
    ax.set_yscale("log")
    ax.set_xlim(-0.5, k - 0.5)
    ax.set_xlabel("class (model label: rank by descending training count)")
    ax.set_ylabel("images per class (log scale)")
    ax.set_title(
        f"{meta.dataset}: {meta.num_samples('train')} training images, "
        f"imbalance {meta.imbalance_factor:g}, bands = paper Head/Mid/Tail {list(meta.boundaries)}"
    )
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def verify(meta) -> tuple[list[str], list[str]]:
    """(shard table rows, problems): every shard's sha256, size, sample count and index against
    its tar, and per-class label counts against meta.json."""
    import numpy as np

    from deitlt_scale.data.shards import ShardInfo, verify_shard

    rows, problems = [], []
    for split in [s for s in ("train", "eval", "val") if s in meta.splits]:
        tally = np.zeros(meta.num_classes, dtype=np.int64)
        samples = 0
        for shard in meta.splits[split]["shards"]:
            info = ShardInfo(**shard)
            check = verify_shard(meta.root / info.name, meta.root / info.index, info)
            status = "ok" if not check.problems else "MISMATCH"
            rows.append(
                f"{info.name:<20} {info.num_samples:>8} samples {info.bytes / 1e6:>10.2f} MB  "
                f"{info.sha256[:12]}  {status}"
            )
            problems.extend(check.problems)
            labels = np.asarray(check.labels, dtype=np.int64)
            if labels.size and (labels.min() < 0 or labels.max() >= meta.num_classes):
                problems.append(f"{info.name}: labels outside 0..{meta.num_classes - 1}")
                continue
            tally += np.bincount(labels, minlength=meta.num_classes)
            samples += check.num_samples
        expected = {"train": meta.train_counts, "eval": meta.eval_counts}.get(
            split, meta.val_counts or []
        )
        if samples != meta.num_samples(split):
            problems.append(f"{split}: shards hold {samples} samples, meta.json says "
                            f"{meta.num_samples(split)}")  # fmt: skip
        if tally.tolist() != list(expected):
            bad = next(c for c in range(meta.num_classes) if tally[c] != expected[c])
            problems.append(
                f"{split}: class {bad} has {tally[bad]} samples in the shards, "
                f"meta.json says {expected[bad]}"
            )
    return rows, problems


def _run_inspect(args: argparse.Namespace) -> int:
    from deitlt_scale.data import meta as meta_io

    meta = meta_io.load(args.directory)
    print(f"{meta.dataset} in {args.directory}: {meta.num_classes} classes")
    for split in [s for s in ("train", "eval", "val") if s in meta.splits]:
        shards = meta.splits[split]["shards"]
        size = sum(s["bytes"] for s in shards) / 1e6
        print(
            f"  {split}: {meta.num_samples(split)} images in {len(shards)} shard(s), {size:.2f} MB"
        )
    print(
        f"  imbalance factor {meta.imbalance_factor:g}, {len(meta.skipped)} skipped at preparation"
    )
    print()
    print("\n".join(histogram_lines(meta.train_counts, meta.class_names)))
    print()
    print("\n".join(group_lines(meta)))
    if not args.no_plot:
        path = plot_counts(meta, args.plot or args.directory / PLOT_FILE)
        print(f"plot: {path}")
    print()
    rows, problems = verify(meta)
    print("\n".join(rows))
    total = sum(s["bytes"] for sp in meta.splits.values() for s in sp["shards"])
    print(f"total: {meta.num_samples('train') + meta.num_samples('eval')} images, "
          f"{len(rows)} shards, {total / 1e6:.2f} MB")  # fmt: skip
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(problems)} problem(s) found in {args.directory}", file=sys.stderr)
        return 1
    print("all shards verified: checksums, sizes, indexes and class counts match meta.json")
    return 0


def _run_order(args: argparse.Namespace) -> int:
    from deitlt_scale import config as config_mod
    from deitlt_scale.data import meta as meta_mod
    from deitlt_scale.data.order import write_order
    from deitlt_scale.errors import UserError

    if args.world_size < 1:
        raise UserError(f"--world-size must be >= 1, got {args.world_size}")
    if args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    cfg = config_mod.load(args.recipe, args.overrides)
    meta = meta_mod.load(cfg.data.shards)
    stats = write_order(
        cfg, meta, args.world_size, args.epochs, args.out, decode=not args.no_decode
    )
    print(
        f"{meta.dataset}: {meta.num_samples('train')} train images, world {args.world_size}, "
        f"micro-batch {cfg.train.micro_batch} x accumulation {cfg.train.grad_accum}, repeated "
        f"aug {cfg.data.repeated_aug}; wrote {args.out}"
    )
    for epoch in stats:
        print(epoch.line())
    return 0


def _run_preview(args: argparse.Namespace) -> int:
    from deitlt_scale import config as config_mod
    from deitlt_scale.analysis import preview
    from deitlt_scale.analysis.plots import save_figure
    from deitlt_scale.data import meta as meta_mod
    from deitlt_scale.errors import UserError

    if args.images < 2 or args.images % 2:
        raise UserError(f"--images must be an even number >= 2, got {args.images}")
    cfg = config_mod.load(args.recipe, args.overrides)
    meta = meta_mod.load(cfg.data.shards)
    student = preview.student_batch(cfg, meta, args.images)
    teacher_cfg = preview.teacher_config(cfg, args.teacher_recipe)
    teacher = None
    if teacher_cfg is not None:
        teacher = preview.teacher_batch(teacher_cfg, cfg.data.shards, meta, min(8, args.images))
    line = preview.summary(student)
    fig = preview.draw(student, teacher, meta.class_names, f"{args.recipe}: {line}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, args.out)
    print(f"{line}\nwrote {args.out}")
    if teacher_cfg is None:
        print(
            "no teacher recipe found (teacher.path has no config.yaml beside it): only the "
            "student's images are drawn; pass --teacher-recipe to add the teacher's"
        )
    return 0


def _val_per_class(text: str) -> int | str:
    from deitlt_scale.data.sources import VAL_ALL

    if text == VAL_ALL:
        return VAL_ALL
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or {VAL_ALL!r}, got {text!r}"
        ) from None
