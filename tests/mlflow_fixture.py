"""Pytest fixtures for a real MLflow tracking server on 127.0.0.1.

Load with ``pytest_plugins = ["mlflow_fixture"]`` in a test module. The server runs
``mlflow server`` (SQLite backend, proxied artifact store, ``--workers 1``, job execution and
telemetry off) on a free port in its own process group and is stopped through that group's PID,
never by name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from deitlt_scale.tracking.server import SERVER_ENV, MlflowServer, start_server

# Clients started by the tests (the DeepSpeed launches, in-process trackers) send no telemetry.
os.environ.update(SERVER_ENV)


def launch_server(store: Path) -> MlflowServer:
    """A fresh server with its store in ``store``; the caller stops it (``server.stop()``)."""
    return start_server(store, host="127.0.0.1", port=None, workers=1)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One tracking server shared by the whole session; tests use their own experiment names."""
    server = launch_server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def disposable_mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A server of its own for a test that kills it; stopped (if still running) afterwards."""
    server = launch_server(tmp_path_factory.mktemp("mlflow-disposable"))
    try:
        yield server
    finally:
        server.stop()
