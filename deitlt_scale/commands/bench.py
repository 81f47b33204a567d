"""`deitlt bench`: throughput against a baseline measured in the same run, ratios printed last.

Each benchmark is a module of ``deitlt_scale/benchmarks`` with ``HELP``, ``register`` and ``run``.
"""

from __future__ import annotations

import argparse
import importlib

HELP = "measure against a baseline in the same run (prepare, data, step, control)"
BENCHMARKS = ("prepare", "data", "step", "control")


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name in BENCHMARKS:
        module = importlib.import_module(f"deitlt_scale.benchmarks.{name}")
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.register(cmd)
        cmd.set_defaults(_bench=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args._bench(args) or 0)
