"""`deitlt pretrain RECIPE [section.key=value ...]`: masked-autoencoder pre-training of the
student's encoder on a prepared train split (``train.task: pretrain``), with the trainer's data
pipeline, DeepSpeed engine, checkpoints, resume, MLflow and exit statuses. A student then starts
from it: ``deitlt train RECIPE train.init_from=RUN_DIR:latest``. See docs/pretraining.md.
"""

from __future__ import annotations

import argparse

from deitlt_scale.commands.train import add_world_size_argument, train_or_plan

HELP = "pre-train the student's encoder as a masked autoencoder (MAE) on the long-tailed data"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "recipe", help="YAML recipe with train.task: pretrain, e.g. recipes/mae_digits.yaml"
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. mae.mask_ratio=0.6 train.epochs=2"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build everything, print the resolved config, world layout and batch, then exit",
    )
    add_world_size_argument(parser)
    parser.epilog = (
        "Resumes automatically from the newest complete checkpoint in runtime.run_dir. "
        "Exit status 75 means: stopped by a signal after a checkpoint; run again to resume. "
        "Start a student from it with train.init_from=RUN_DIR:latest."
    )


def run(args: argparse.Namespace) -> int:
    return train_or_plan(args, "pretrain")
