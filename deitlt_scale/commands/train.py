"""`deitlt train`: train a DeiT-LT student from a recipe (DeepSpeed, DALI, co-located teacher)."""

from __future__ import annotations

import argparse
import sys

HELP = "train a DeiT-LT student from a recipe (DeepSpeed, DALI, co-located teacher)"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    print("deitlt train: not available yet (planned in issue 6)", file=sys.stderr)
    return 2
