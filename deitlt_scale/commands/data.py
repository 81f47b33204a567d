"""`deitlt data`: prepare long-tailed WebDataset shards (prepare) and inspect them (inspect)."""

from __future__ import annotations

import argparse
import sys

HELP = "prepare long-tailed WebDataset shards (prepare) and inspect them (inspect)"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    print("deitlt data: not available yet (planned in issue 3)", file=sys.stderr)
    return 2
