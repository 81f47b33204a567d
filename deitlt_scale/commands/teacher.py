"""`deitlt teacher`: train an LDAM-DRW+SAM CNN teacher (train) or import a published one (import)."""

from __future__ import annotations

import argparse
import sys

HELP = "train an LDAM-DRW+SAM CNN teacher (train) or import a published one (import)"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    print("deitlt teacher: not available yet (planned in issue 5)", file=sys.stderr)
    return 2
