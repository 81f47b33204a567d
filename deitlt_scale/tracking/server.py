"""Start and stop a local MLflow tracking server (SQLite backend, proxied artifact store).

The server runs in its own process group (a new session) and is stopped through that group,
so its web workers go with it and nothing is ever stopped by name. Used by
``deitlt mlflow-server`` and by the tests' server fixture.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from deitlt_scale.errors import UserError

# The job runner's worker pool and telemetry are not needed for experiment tracking; without
# them the server starts in ~10 s instead of ~20 s on two cores.
SERVER_ENV = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


class ServerError(UserError):
    """The tracking server could not be started; the message names the cause and its log."""


@dataclass
class MlflowServer:
    """A running ``mlflow server`` child process (group leader of its own session)."""

    host: str
    port: int
    store: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    _log_file: object = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        """The URI clients export as MLFLOW_TRACKING_URI."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the server's process group, SIGKILL it after ``timeout_s``; returns the exit code."""
        try:
            if self.running():
                _signal_group(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    _signal_group(self.process.pid, signal.SIGKILL)
                    self.process.wait(timeout=timeout_s)
            # Workers that outlived the leader still belong to its group.
            _signal_group(self.process.pid, signal.SIGKILL)
        finally:
            if self._log_file is not None:
                self._log_file.close()  # type: ignore[attr-defined]
                self._log_file = None
        return self.process.returncode

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL to its process group), as a crash would."""
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def __enter__(self) -> MlflowServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def server_command(store: Path, host: str, port: int, workers: int) -> list[str]:
    """The ``mlflow server`` command line for a store directory."""
    db = (store / "mlflow.db").resolve()
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{db.as_posix()}",
        "--serve-artifacts",
        "--artifacts-destination",
        str((store / "artifacts").resolve()),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def start_server(
    store: str | Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    workers: int = 1,
    ready_timeout_s: float = 180.0,
) -> MlflowServer:
    """Start ``mlflow server`` on ``host:port`` (a free port when None) and wait until it answers.

    The SQLite database is ``STORE/mlflow.db``, artifacts are served from ``STORE/artifacts``, and
    the server's output goes to ``STORE/server.log``.
    """
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    port = free_port(host) if port is None else port
    if port_in_use(host, port):
        raise ServerError(f"port {port} on {host} is in use; pass another --port")
    log_path = store / "server.log"
    log_file = open(log_path, "ab")  # noqa: SIM115 - closed by MlflowServer.stop
    env = {**os.environ, **SERVER_ENV}
    process = subprocess.Popen(
        server_command(store, host, port, workers),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group: stopped by PID, never by name
    )
    server = MlflowServer(host, port, store, process, log_path, log_file)
    try:
        wait_ready(server, ready_timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def wait_ready(server: MlflowServer, timeout_s: float) -> None:
    """Poll ``/health`` until the server answers; raise ServerError if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    url = f"{server.uri}/health"
    while time.monotonic() < deadline:
        if not server.running():
            raise ServerError(
                f"mlflow server exited with code {server.process.returncode} before it was "
                f"ready; see {server.log_path}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.25)
    raise ServerError(
        f"mlflow server did not answer at {url} within {timeout_s:.0f} s; see {server.log_path}"
    )
