"""`deitlt analyze`: plot the paper's diagnostics: attention distance, rollout, CLS/DIST divergence, rank."""

from __future__ import annotations

import argparse
import sys

HELP = "plot the paper's diagnostics: attention distance, rollout, CLS/DIST divergence, rank"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    print("deitlt analyze: not available yet (planned in issue 9)", file=sys.stderr)
    return 2
