"""MLflow tracking: one run per run directory, rank 0 writes, resume appends, outages never stop
training. The acceptance tests drive a real 2-process DeepSpeed job against a real tracking server
and read everything back through MlflowClient."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from deitlt_scale import cli
from deitlt_scale.config import Config, TrackingConfig, flatten
from deitlt_scale.tracking import (
    REDACTED,
    ConsoleWriter,
    MetricWriter,
    Tracker,
    is_secret_key,
    read_run_id,
    redact,
    resolve_uri,
)
from deitlt_scale.tracking.server import MlflowServer, free_port, port_in_use

pytest_plugins = ["mlflow_fixture"]

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ds_tiny_run", REPO / "tests/scripts/ds_tiny_run.py")
ds_tiny_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ds_tiny_run)


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def _runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# --------------------------------------------------------------------------------------------
# Pure behaviour


def test_secret_like_keys_are_recognised():
    for key in ("tracking.api_key", "hub.token", "db.PASSWORD", "s3.secret_access_key", "hfToken"):
        assert is_secret_key(key), key
    for key in ("checkpoint.keep_last", "data.shards", "model.arch", "teacher.path", "optim.betas"):
        assert not is_secret_key(key), key


def test_redact_replaces_only_secret_values():
    params = {"hub.token": "hf_abc", "optim.lr": 0.001, "db.password": "", "x.secret": None}
    assert redact(params) == {
        "hub.token": REDACTED,
        "optim.lr": 0.001,
        "db.password": "",
        "x.secret": None,
    }


def test_default_uri_is_sqlite_in_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(TrackingConfig(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_environment_uri_is_used_unless_the_config_names_one(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_uri(TrackingConfig(), tmp_path) == "http://127.0.0.1:5999"
    assert resolve_uri(TrackingConfig(uri="http://h:1"), tmp_path) == "http://h:1"


def test_other_ranks_get_a_no_op_tracker_that_keeps_the_shared_run_id(tmp_path):
    tracker = Tracker.start(TrackingConfig(), tmp_path, {"a": 1}, {}, rank=1, run_id="abc123")
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_artifact(tmp_path)
    tracker.close()
    assert tracker.run_id == "abc123"
    assert list(tmp_path.iterdir()) == []


def test_disabled_tracking_writes_nothing(tmp_path):
    tracker = Tracker.start(TrackingConfig(enabled=False), tmp_path, {"a": 1}, {}, rank=0)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.close()
    assert tracker.run_id is None and list(tmp_path.iterdir()) == []


def test_both_writers_satisfy_the_metric_writer_protocol(tmp_path):
    assert isinstance(
        Tracker.start(TrackingConfig(enabled=False), tmp_path, {}, {}, rank=0), MetricWriter
    )
    assert isinstance(ConsoleWriter(), MetricWriter)


def test_console_writer_prints_one_compact_line_per_call_on_rank_0(capsys):
    writer = ConsoleWriter(rank=0, total_steps=100)
    writer.log_metrics({"train/loss": 2.345678, "train/lr": 0.0005}, step=10)
    writer.log_metrics({"eval/acc1": 41.25}, step=20)
    assert capsys.readouterr().out.splitlines() == [
        "[step 10/100] loss=2.346 lr=0.0005",
        "[step 20/100] acc1=41.25",
    ]


def test_console_writer_keeps_the_last_values_and_skips_non_numbers(capsys):
    writer = ConsoleWriter(rank=0)
    writer.log_metrics({"train/loss": 3.0, "note": "text"}, step=1)
    writer.log_metrics({"train/loss": 2.0}, step=2)
    assert writer.last == {"train/loss": 2.0} and writer.last_step == 2
    assert capsys.readouterr().out.splitlines() == ["[step 1] loss=3", "[step 2] loss=2"]


def test_console_writer_on_other_ranks_keeps_values_but_prints_nothing(capsys):
    writer = ConsoleWriter(rank=1)
    writer.log_metrics({"train/loss": 1.5}, step=3)
    assert writer.last == {"train/loss": 1.5}
    assert capsys.readouterr().out == ""


def test_console_writer_ignores_calls_after_close(capsys):
    writer = ConsoleWriter()
    writer.close("KILLED")
    writer.log_metrics({"train/loss": 1.0}, step=1)
    writer.set_tags({"dataset": "d"})
    writer.close()
    assert writer.status == "KILLED" and writer.last == {} and writer.tags == {}
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------------------------
# The local SQLite store (in process)


@pytest.mark.slow
def test_local_store_keeps_run_and_artifacts_inside_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = {**flatten(Config()), "hub.token": "hf_secret_value"}
    tracker = Tracker.start(
        TrackingConfig(experiment="local"),
        tmp_path,
        params,
        {"dataset": "d"},
        rank=0,
        system_metrics=False,
    )
    tracker.log_metrics({"train/loss": 2.5, "train/lr": 1e-3}, step=10)
    (tmp_path / "per_class.csv").write_text("class,accuracy\n0,1.0\n")
    tracker.log_artifact(tmp_path / "per_class.csv", "eval")
    tracker.close()

    client = _client(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(read_run_id(tmp_path))
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.0005"
    assert run.data.params["hub.token"] == REDACTED
    assert run.data.metrics == {"train/loss": 2.5, "train/lr": 1e-3}
    assert run.data.tags["dataset"] == "d"
    artifact_dir = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifact_dir.is_relative_to(tmp_path / "mlartifacts")
    assert (artifact_dir / "eval" / "per_class.csv").is_file()
    logged_config = (artifact_dir / "config.yaml").read_text()
    assert "hf_secret_value" not in logged_config and REDACTED in logged_config


@pytest.mark.slow
def test_unreachable_store_buffers_metrics_and_delivers_them_later(tmp_path, caplog):
    blocker = tmp_path / "store"
    blocker.write_text("a file where the store's directory should be")
    cfg = TrackingConfig(uri=f"sqlite:///{blocker}/mlflow.db", experiment="later")
    with caplog.at_level(logging.WARNING, logger="deitlt_scale.tracking"):
        tracker = Tracker.start(
            cfg,
            tmp_path / "run",
            {"optim.lr": 0.1},
            {},
            rank=0,
            retry_interval_s=0.0,
            system_metrics=False,
        )
        tracker.log_metrics({"train/loss": 3.0}, step=1)
        tracker.log_metrics({"train/loss": 2.0}, step=2)
        assert tracker.run_id is None
        blocker.unlink()
        blocker.mkdir()
        tracker.log_metrics({"train/loss": 1.0}, step=3)
        tracker.close()
    unreachable = [r for r in caplog.records if "is unreachable" in r.getMessage()]
    assert len(unreachable) == 1
    client = _client(cfg.uri)
    assert _steps(client, tracker.run_id, "train/loss") == [1, 2, 3]
    assert client.get_run(tracker.run_id).data.params == {"optim.lr": "0.1"}


@pytest.mark.slow
def test_a_full_buffer_drops_the_oldest_points_and_close_reports_the_loss(tmp_path, caplog):
    blocker = tmp_path / "store"
    blocker.write_text("not a directory")
    cfg = TrackingConfig(uri=f"sqlite:///{blocker}/mlflow.db")
    with caplog.at_level(logging.WARNING, logger="deitlt_scale.tracking"):
        tracker = Tracker.start(
            cfg,
            tmp_path / "run",
            {},
            {},
            rank=0,
            max_buffered_metrics=3,
            system_metrics=False,
        )
        for step in range(5):
            tracker.log_metrics({"train/loss": float(step)}, step=step)
        assert tracker.dropped_metrics == 2
        tracker.close()
    lost = [r.getMessage() for r in caplog.records if "data lost" in r.getMessage()]
    assert len(lost) == 1
    assert "3 metric points" in lost[0] and "2 metric points dropped" in lost[0]


@pytest.mark.slow
def test_data_the_store_refuses_is_dropped_without_blocking_the_rest(tmp_path, caplog):
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db")
    with caplog.at_level(logging.WARNING, logger="deitlt_scale.tracking"):
        tracker = Tracker.start(cfg, tmp_path, {"a": 1}, {}, rank=0, system_metrics=False)
        for step in (1, 2):
            tracker.log_metrics({"bad#name?": 1.0, "train/loss": float(step)}, step=step)
        tracker.log_params({"a": 2, "b": 3})
        tracker.close()
    run = _client(cfg.uri).get_run(tracker.run_id)
    assert run.data.metrics == {"train/loss": 2.0}
    assert run.data.params == {"a": "1", "b": "3"}
    refused = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(refused) == 3  # one per refused name, then the summary at close
    assert "metric bad#name? (x2)" in refused[-1] and "param a (x1)" in refused[-1]


# --------------------------------------------------------------------------------------------
# A real 2-process DeepSpeed job against a real tracking server


def _launch(jobs: list[str], uri: str, experiment: str, *extra: str, wait: bool = True):
    env = {**os.environ, "DEITLT_TEST_TRACKING_URI": uri}
    env.pop("MLFLOW_TRACKING_URI", None)
    return ds_tiny_run.launch(jobs, env, "--experiment", experiment, *extra, wait=wait)


@pytest.fixture(scope="module")
def tracked_job(tmp_path_factory, mlflow_server: MlflowServer):
    """A first 2-step ZeRO-1 launch, then a second launch on the same run directory."""
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    experiment = "tiny-tracked"
    first = _launch([f"{run_dir}:1:track"], mlflow_server.uri, experiment)
    assert first.returncode == 0, first.stderr[-3000:]
    client = _client(mlflow_server.uri)
    after_first = {
        "runs": _runs(client, experiment),
        "loss_steps": _steps(client, read_run_id(run_dir), "train/loss"),
    }
    second = _launch([f"{run_dir}:1:track"], mlflow_server.uri, experiment)
    assert second.returncode == 0, second.stderr[-3000:]
    return {
        "run_dir": run_dir,
        "experiment": experiment,
        "after_first": after_first,
        "client": client,
    }


@pytest.mark.slow
def test_two_process_job_logs_exactly_one_run_with_config_metrics_and_artifacts(tracked_job):
    runs = tracked_job["after_first"]["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == read_run_id(tracked_job["run_dir"])
    params = run.data.params
    assert params["deepspeed.zero_stage"] == "1"
    assert params["model.arch"] == "deit_tiny_distilled_patch16_224"
    assert params["train.micro_batch"] == str(ds_tiny_run.MICRO_BATCH)
    assert len(params) == len(flatten(Config()))
    tags = run.data.tags
    assert tags["dataset"] == "tiny-random"
    assert tags["world_size"] == "2" and tags["device"] == "cpu"
    assert tags["model"] == "deit_tiny_distilled_patch16_224"
    assert tags["teacher"] == "runs/teacher_digits/teacher"
    assert len(tags["git_commit"]) == 40
    assert tracked_job["after_first"]["loss_steps"] == [1, 2]
    assert {"train/loss", "train/lr", "train/img_per_s", "eval/mean/overall"} <= set(
        run.data.metrics
    )
    client = tracked_job["client"]
    top = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in top
    assert [f.path for f in client.list_artifacts(run.info.run_id, "eval")] == [
        "eval/per_class.csv"
    ]


@pytest.mark.slow
def test_resumed_job_appends_to_the_same_run(tracked_job):
    client = tracked_job["client"]
    runs = _runs(client, tracked_job["experiment"])
    assert [r.info.run_id for r in runs] == [read_run_id(tracked_job["run_dir"])]
    run_id = runs[0].info.run_id
    assert _steps(client, run_id, "train/loss") == [1, 2, 3, 4]
    assert _steps(client, run_id, "eval/mean/overall") == [2, 4]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert (tracked_job["run_dir"] / "checkpoints" / "step_00000004" / "COMPLETE").is_file()


@pytest.mark.slow
def test_killing_the_server_mid_run_does_not_stop_training(tmp_path, disposable_mlflow_server):
    run_dir = tmp_path / "run"
    go = tmp_path / "go"
    job = _launch(
        [f"{run_dir}:1:track"],
        disposable_mlflow_server.uri,
        "tiny-killed",
        "--pause-after",
        "1",
        "--go-file",
        str(go),
        wait=False,
    )
    try:
        deadline = time.monotonic() + 300  # a bound on the wait, not an assertion on speed
        while (
            not (run_dir / "paused").exists() and job.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        assert (run_dir / "paused").exists(), "the job never reached step 1"
        disposable_mlflow_server.kill()
        go.write_text("go")
        _, stderr = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 0, stderr[-3000:]
    assert (run_dir / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    assert "unreachable" in stderr and "training continues" in stderr
    assert "closed with data lost" in stderr
    assert read_run_id(run_dir) is not None


# --------------------------------------------------------------------------------------------
# `deitlt mlflow-server`


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_mlflow_server_command_serves_on_localhost_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deitlt_scale.cli", "mlflow-server", "--port", str(port),
         "--store", str(tmp_path / "store")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # A foreground command's Ctrl-C, whatever the test session inherited: a shell's
        # background job (`pytest &`) ignores SIGINT, and its children would inherit that.
        preexec_fn=_sigint_default,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()  # blocks until the server is ready (or the command died)
        assert line.strip() == f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{port}"
        client = _client(f"http://127.0.0.1:{port}")
        client.create_experiment("served")
        assert client.get_experiment_by_name("served") is not None
        proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground command
        assert proc.wait(timeout=120) == 0
        assert not port_in_use("127.0.0.1", port)
        assert (tmp_path / "store" / "mlflow.db").is_file()
    finally:
        if proc.poll() is None:  # SIGTERM lets the command stop its server's process group
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_mlflow_server_command_refuses_a_busy_port(tmp_path, capsys):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        code = cli.main(["mlflow-server", "--port", str(port), "--store", str(tmp_path)])
    assert code == 2
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
