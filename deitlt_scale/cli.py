"""The ``deitlt`` command: one subcommand per stage of the pipeline.

Each subcommand lives in ``deitlt_scale/commands/<name>.py`` with ``HELP`` (one line),
``register(parser)`` and ``run(args) -> int``; heavy imports happen inside ``run`` so that
``deitlt --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from deitlt_scale import __version__
from deitlt_scale.errors import UserError

COMMANDS = (
    "data",
    "teacher",
    "train",
    "pretrain",
    "eval",
    "export",
    "analyze",
    "bench",
    "experiment",
    "demo",
    "mlflow-server",
)


def _module(name: str):
    return importlib.import_module(f"deitlt_scale.commands.{name.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deitlt",
        description="DeiT-LT: train Vision Transformers from scratch on long-tailed data.",
    )
    parser.add_argument("--version", action="version", version=f"deitlt-scale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = _module(name)
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.register(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as err:
        print(f"deitlt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
