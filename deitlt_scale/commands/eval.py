"""`deitlt eval`: evaluate a checkpoint: Overall/Head/Mid/Tail for the CLS, DIST and averaged heads."""

from __future__ import annotations

import argparse
import sys

HELP = "evaluate a checkpoint: Overall/Head/Mid/Tail for the CLS, DIST and averaged heads"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    print("deitlt eval: not available yet (planned in issue 6)", file=sys.stderr)
    return 2
