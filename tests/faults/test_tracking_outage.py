"""Tracking outages: an MLflow server that is unreachable, or killed mid-run and started again.

Training must never wait for or die with the tracking server: it keeps going, buffers what it
could not send and delivers it when the server is back; a warning says what was lost.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from mlflow import MlflowClient

from deitlt_scale.tracking import read_run_id
from deitlt_scale.tracking.server import SERVER_ENV, free_port, start_server
from faults import TrainProcess, tiny_overrides

pytestmark = pytest.mark.slow

SECRET = "s3cr3t-in-uri"
OUTAGE_STEPS = 15  # killed after step 5, started again after step 10


def _listening_hosts(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (IPv4 and IPv6, from /proc)."""
    hosts = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                if width == 8:
                    hosts.add(".".join(str(b) for b in reversed(raw)))
                else:
                    hosts.add(raw.hex())
    return hosts


@pytest.fixture(scope="module")
def unreachable(digits_lt, random_teacher, tmp_path_factory):
    """Training against a URI (with credentials in it) where nothing listens."""
    root = tmp_path_factory.mktemp("unreachable")
    uri = f"http://alice:{SECRET}@127.0.0.1:{free_port()}"
    extra = {"tracking.enabled": "true", "tracking.uri": uri, "train.max_steps": 5}
    done = TrainProcess.start(
        tiny_overrides(digits_lt, random_teacher, root / "run", **extra),
        root / "logs",
        env=SERVER_ENV,
    ).finish()
    return {"done": done, "run_dir": root / "run"}


@pytest.fixture(scope="module")
def outage(digits_lt, random_teacher, tmp_path_factory):
    """A real server (started as `deitlt mlflow-server` starts it) is SIGKILLed after step 5 and
    started again on the same store and port after step 10. The trainer is paused (SIGSTOP)
    around each server change, so where the outage falls does not depend on timing."""
    root = tmp_path_factory.mktemp("outage")
    store, run_dir = root / "store", root / "run"
    server = start_server(store)  # the defaults: 127.0.0.1 and a free port
    record: dict[str, object] = {"hosts": _listening_hosts(server.port)}
    restarted = None
    try:
        extra = {
            "tracking.enabled": "true",
            "tracking.uri": server.uri,
            "tracking.experiment": "faults-outage",
            "train.max_steps": OUTAGE_STEPS,
        }
        run = TrainProcess.start(
            tiny_overrides(digits_lt, random_teacher, run_dir, **extra), root / "logs", SERVER_ENV
        )
        run.wait_for_step(5)
        run.signal(signal.SIGSTOP)
        server.kill()
        run.signal(signal.SIGCONT)
        run.wait_for_step(10)
        run.signal(signal.SIGSTOP)
        try:
            restarted = start_server(store, port=server.port)
        finally:
            run.signal(signal.SIGCONT)
        record["done"] = run.finish()
        run_id = read_run_id(run_dir)
        client = MlflowClient(tracking_uri=restarted.uri)
        record["loss_steps"] = sorted(
            m.step for m in client.get_metric_history(run_id, "train/loss")
        )
        record["status"] = client.get_run(run_id).info.status
    finally:
        server.stop()
        if restarted is not None:
            restarted.stop()
    return record


@pytest.mark.fault(
    "MLflow server unreachable from the start",
    "training runs to the end (exit 0)",
)
def test_training_finishes_when_the_tracking_server_is_unreachable(unreachable):
    done = unreachable["done"]
    assert done.returncode == 0, done.describe()
    assert "done: 5 steps" in done.stdout


@pytest.mark.fault(
    "MLflow server unreachable from the start",
    "one warning when it fails, one at the end saying what was not sent",
)
def test_an_unreachable_server_is_reported_once_with_what_was_lost(unreachable):
    stderr = unreachable["done"].stderr
    assert stderr.count("is unreachable") == 1, stderr
    lost = [line for line in stderr.splitlines() if "closed with data lost" in line]
    assert len(lost) == 1 and "unsent" in lost[0] and "metric points" in lost[0], stderr


@pytest.mark.fault(
    "credentials inside tracking.uri",
    "they appear in no log line and in no config logged to MLflow",
)
def test_credentials_in_the_tracking_uri_stay_out_of_logs_and_logged_config(unreachable):
    done = unreachable["done"]
    assert SECRET not in done.stdout and SECRET not in done.stderr
    assert SECRET not in (unreachable["run_dir"] / ".tracking" / "config.yaml").read_text()


@pytest.mark.fault(
    "bundled MLflow server started with its defaults",
    "it listens on 127.0.0.1 only",
)
def test_the_bundled_server_listens_on_loopback_only(outage):
    assert outage["hosts"] == {"127.0.0.1"}


@pytest.mark.fault(
    "MLflow server killed mid-run, started again later",
    "training runs to the end (exit 0) and the MLflow run is marked FINISHED",
)
def test_training_finishes_through_a_killed_and_restarted_server(outage):
    done = outage["done"]
    assert done.returncode == 0, done.describe()
    assert outage["status"] == "FINISHED"


@pytest.mark.fault(
    "MLflow server killed mid-run, started again later",
    "metrics logged during the outage are buffered and reach the server: none is lost",
)
def test_metrics_logged_during_the_outage_reach_the_restarted_server(outage):
    assert outage["loss_steps"] == list(range(1, OUTAGE_STEPS + 1))


@pytest.mark.fault(
    "MLflow server killed mid-run, started again later",
    "one warning for the outage, one for the recovery, no data reported lost",
)
def test_the_outage_and_the_recovery_are_each_reported_once(outage):
    stderr = outage["done"].stderr
    assert stderr.count("is unreachable") == 1, stderr
    assert stderr.count("reachable again") == 1, stderr
    assert "data lost" not in stderr
