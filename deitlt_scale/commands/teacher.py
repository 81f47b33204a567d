"""`deitlt teacher`: train a CNN teacher (LDAM-DRW or PaCo, optionally SAM) or import a published one."""

from __future__ import annotations

import argparse

from deitlt_scale.commands.train import add_world_size_argument

HELP = "train a CNN teacher (LDAM-DRW / PaCo, optionally SAM) or import a published one"


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="teacher_command", metavar="ACTION", required=True)

    train = sub.add_parser(
        "train",
        help="train a ResNet teacher from a recipe (train.task=teacher)",
        description="Train a CNN teacher (LDAM-DRW or CE; PaCo with paco.enabled; optionally "
        "SAM) from a YAML recipe; the "
        "result is a teacher directory under the run directory.",
    )
    train.add_argument("recipe", help="YAML recipe, e.g. recipes/teacher_digits.yaml")
    train.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted config overrides, e.g. optim.lr=0.05 train.epochs=10",
    )
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve and print the configuration and step counts, then exit without training",
    )
    add_world_size_argument(train)

    imp = sub.add_parser(
        "import",
        help="convert a published PaCo / LDAM-DRW / torchvision / timm checkpoint to a teacher file",
        description="Convert a public teacher checkpoint into a verified teacher directory "
        "(model.safetensors + teacher.json). See docs/teachers.md.",
    )
    imp.add_argument(
        "--format",
        required=True,
        choices=("paco", "ldam", "torchvision", "timm"),
        help="checkpoint layout: paco (MoCo wrapper), ldam (LDAM-DRW[-SAM]), torchvision, or "
        "timm (a state dict of the timm model --arch)",
    )
    imp.add_argument("--checkpoint", required=True, help="the .pth/.pth.tar file to convert")
    imp.add_argument(
        "--arch",
        required=True,
        help="teacher network: resnet32 (CIFAR) or resnet50 (ImageNet-LT, iNaturalist) for "
        "paco/ldam/torchvision; a timm model name (e.g. regnety_160) for --format timm",
    )
    imp.add_argument(
        "--num-classes", type=int, required=True, help="number of classes K of the classifier"
    )
    imp.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="side in pixels of the teacher's input (32 for CIFAR teachers, 224 otherwise); "
        "required except for --format timm, where it defaults to timm's config of --arch",
    )
    imp.add_argument("--out", required=True, help="teacher directory to write")
    imp.add_argument(
        "--label-space",
        choices=("original", "model"),
        default="original",
        help="labels the logits index: original dataset labels (public checkpoints, the "
        "default) or frequency-ranked model labels",
    )
    imp.add_argument(
        "--mean",
        type=float,
        nargs=3,
        metavar=("R", "G", "B"),
        default=None,
        help="input normalisation mean recorded in teacher.json (default: ImageNet's; for "
        "--format timm, timm's config of --arch)",
    )
    imp.add_argument(
        "--std",
        type=float,
        nargs=3,
        metavar=("R", "G", "B"),
        default=None,
        help="input normalisation std recorded in teacher.json (default: ImageNet's; for "
        "--format timm, timm's config of --arch)",
    )
    imp.add_argument(
        "--overwrite", action="store_true", help="replace a teacher already present in --out"
    )


def run(args: argparse.Namespace) -> int:
    if args.teacher_command == "train":
        from deitlt_scale.commands.train import train_or_plan

        return train_or_plan(args, "teacher train")
    return _import(args)


def _import(args: argparse.Namespace) -> int:
    from deitlt_scale.models.importers import import_checkpoint

    report = import_checkpoint(
        args.format,
        args.checkpoint,
        args.arch,
        args.num_classes,
        args.input_size,
        args.out,
        label_space=args.label_space,
        mean=tuple(args.mean) if args.mean else None,
        std=tuple(args.std) if args.std else None,
        overwrite=args.overwrite,
    )
    info = report.info
    dropped = f", dropped {', '.join(report.dropped)}" if report.dropped else ""
    print(
        f"wrote {report.out}: {info.arch}, {info.num_classes} classes, {info.input_size} px, "
        f"{'cosine' if info.normed else 'linear'} classifier, labels {info.label_space}; "
        f"mean {list(info.mean)}, std {list(info.std)}; {report.kept} tensors{dropped}; "
        "logits verified"
    )
    return 0
