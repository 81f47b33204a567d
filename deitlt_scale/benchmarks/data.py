"""`deitlt bench data`."""

from __future__ import annotations

import argparse
import sys

HELP = "not available yet"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    print("deitlt bench data: not available yet", file=sys.stderr)
    return 2
