"""`deitlt mlflow-server`: start a local MLflow tracking server (SQLite store) bound to 127.0.0.1."""

from __future__ import annotations

import argparse
import sys

HELP = "start a local MLflow tracking server (SQLite store) bound to 127.0.0.1"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    print("deitlt mlflow-server: not available yet (planned in issue 8)", file=sys.stderr)
    return 2
