"""`deitlt demo`: run the whole pipeline on the embedded long-tailed digits dataset, on CPU."""

from __future__ import annotations

import argparse
import sys

HELP = "run the whole pipeline on the embedded long-tailed digits dataset, on CPU"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    print("deitlt demo: not available yet (planned in issue 6)", file=sys.stderr)
    return 2
