"""`deitlt pretrain RECIPE [section.key=value ...]`: masked-autoencoder pre-training of the
student's encoder on a prepared train split (``train.task: pretrain``), with the trainer's data
pipeline, DeepSpeed engine, checkpoints, resume, MLflow and exit statuses. A student then starts
from it: ``deitlt train RECIPE train.init_from=RUN_DIR:latest``. See docs/pretraining.md.
"""

from __future__ import annotations

import argparse

from deitlt_scale.commands.train import add_training_arguments, train_or_plan

HELP = "pre-train the student's encoder as a masked autoencoder (MAE) on the long-tailed data"


def register(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(
        parser,
        "recipes/mae_digits.yaml (train.task: pretrain)",
        "mae.mask_ratio=0.6 train.epochs=2",
        "Start a student from it with train.init_from=RUN_DIR:latest.",
    )


def run(args: argparse.Namespace) -> int:
    return train_or_plan(args, "pretrain")
