"""`deitlt export`: export a trained student as safetensors + config.json that timm loads."""

from __future__ import annotations

import argparse
import sys

HELP = "export a trained student as safetensors + config.json that timm loads"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    print("deitlt export: not available yet (planned in issue 8)", file=sys.stderr)
    return 2
