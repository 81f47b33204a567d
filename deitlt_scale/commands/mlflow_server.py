"""`deitlt mlflow-server`: start a local MLflow tracking server (SQLite store) bound to 127.0.0.1."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from types import FrameType

HELP = "start a local MLflow tracking server (SQLite store) bound to 127.0.0.1"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the "
        "unauthenticated server to the network)",
    )
    parser.add_argument("--port", type=int, default=5000, help="TCP port (default 5000)")
    parser.add_argument(
        "--store",
        default="runs/mlflow",
        help="directory for the SQLite database (mlflow.db) and the artifacts (default runs/mlflow)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="web worker processes (default 1; enough for training)",
    )


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from deitlt_scale.errors import UserError
    from deitlt_scale.tracking.server import start_server

    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"deitlt mlflow-server: warning: binding {args.host}; the server has no "
            "authentication, anyone who can reach this port can read and write runs",
            file=sys.stderr,
        )
    # SIGTERM (scancel, kill) stops the server as cleanly as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _terminate)
    print(
        f"starting MLflow server on {args.host}:{args.port} (store {args.store}) ...",
        file=sys.stderr,
    )
    server = None
    try:
        server = start_server(args.store, host=args.host, port=args.port, workers=args.workers)
        print(
            f"MLflow tracking server ready; store {server.store}, log {server.log_path}",
            file=sys.stderr,
        )
        print(f"export MLFLOW_TRACKING_URI={server.uri}", flush=True)
        print("Ctrl-C stops it.", file=sys.stderr, flush=True)
        while server.running():
            time.sleep(0.5)
        print(
            f"deitlt mlflow-server: the server exited with code {server.process.returncode}; "
            f"see {server.log_path}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("stopping MLflow server ...", file=sys.stderr, flush=True)
        return 0
    finally:
        if server is not None:
            server.stop()
        signal.signal(signal.SIGTERM, previous)
