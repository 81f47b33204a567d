"""The MLflow writer (a :class:`~deitlt_scale.tracking.writer.MetricWriter`): one MLflow run per
run directory, written by rank 0 only.

* Rank 0 creates the run (or, when ``RUN_DIR/mlflow-run-id`` exists, continues it) and returns its
  id; the trainer shares that id with the other ranks, whose trackers are no-ops.
* Default store: SQLite in the run directory (``sqlite:///RUN_DIR/mlflow.db``, artifacts in
  ``RUN_DIR/mlartifacts``). ``TrackingConfig.uri`` or ``$MLFLOW_TRACKING_URI`` name a server.
* Tracking never stops training: when the store cannot be reached the tracker warns once, keeps
  what was not sent (metric points up to a bound, oldest dropped first), retries on later calls
  (at most once per ``retry_interval_s``) and, at :meth:`Tracker.close`, reports what was lost.
* Config values whose key looks like a secret (token, password, secret, key) are redacted before
  they are logged, both as params and in the logged ``config.yaml``
  (:mod:`deitlt_scale.tracking.redact`).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from deitlt_scale.config import TrackingConfig
from deitlt_scale.tracking.redact import mask_url, redact

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow-run-id"
# Fail fast on an unreachable server (MLflow's defaults retry for minutes); the tracker's own
# buffer-and-retry covers longer outages. A user's explicit setting wins.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
_METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
_PARAMS_PER_REQUEST = 100
_PARAM_VALUE_MAX = 6000  # MLflow's limit on a param value (characters)
_REJECTION_CODES = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE"})


# --------------------------------------------------------------------------------------------
# Pure helpers


def resolve_uri(cfg: TrackingConfig, run_dir: str | Path) -> str:
    """The tracking URI: ``cfg.uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite in ``run_dir``."""
    if cfg.uri:
        return cfg.uri
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{(Path(run_dir).resolve() / 'mlflow.db').as_posix()}"


def read_run_id(run_dir: str | Path) -> str | None:
    """The MLflow run id recorded in ``RUN_DIR/mlflow-run-id``, or None."""
    path = Path(run_dir) / RUN_ID_FILE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    return text or None


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (inverse of :func:`deitlt_scale.config.flatten`)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):  # "a" and "a.b" both given: keep the leaf
                child = node[part] = {"": child}
            node = child
        node[parts[-1]] = value
    return tree


# --------------------------------------------------------------------------------------------
# The tracker


@dataclass
class _Pending:
    """What has not reached the store yet, in logging order per kind."""

    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: deque[Any] = field(default_factory=deque)  # mlflow.entities.Metric
    artifacts: deque[tuple[Path, str | None]] = field(default_factory=deque)
    dropped_metrics: int = 0
    dropped_artifacts: list[str] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)  # "kind key" the store refused -> count

    def empty(self) -> bool:
        return not (self.params or self.tags or self.metrics or self.artifacts)

    def describe(self) -> str:
        parts = []
        if self.metrics:
            parts.append(f"{len(self.metrics)} metric points")
        if self.params:
            parts.append(f"{len(self.params)} params")
        if self.tags:
            parts.append(f"{len(self.tags)} tags")
        if self.artifacts:
            parts.append(f"{len(self.artifacts)} artifacts")
        return ", ".join(parts) or "nothing"


class Tracker:
    """One MLflow run per run directory. Only rank 0's tracker talks to MLflow.

    Use :meth:`start` to build one; every method is safe to call on every rank and never raises
    because of the tracking store.
    """

    def __init__(
        self,
        *,
        active: bool,
        run_id: str | None = None,
        uri: str | None = None,
        run_dir: Path | None = None,
        experiment: str = "deitlt",
        run_name: str | None = None,
        system_metrics: bool = True,
        retry_interval_s: float = 30.0,
        max_buffered_metrics: int = 100_000,
    ) -> None:
        self.run_id = run_id
        self.active = active
        self.uri = uri
        self._run_dir = run_dir
        self._experiment = experiment
        self._run_name = run_name
        self._system_metrics = system_metrics
        self._retry_interval_s = retry_interval_s
        self._max_buffered_metrics = max_buffered_metrics
        self._pending = _Pending()
        self._client: MlflowClient | None = None
        self._connected = False
        self._resumed = False
        self._next_try = 0.0  # time.monotonic() before which no retry is attempted
        self._failing = False
        self._warned = False
        self._monitor: Any = None
        self._closed = False

    # ---- construction

    @classmethod
    def start(
        cls,
        cfg: TrackingConfig,
        run_dir: str | Path,
        params: dict[str, Any],
        tags: dict[str, str],
        rank: int,
        run_id: str | None = None,
        *,
        system_metrics: bool = True,
        retry_interval_s: float = 30.0,
        max_buffered_metrics: int = 100_000,
    ) -> Tracker:
        """Open (rank 0) or continue the run of ``run_dir``; other ranks get a no-op tracker.

        Args:
            cfg: the ``tracking`` section; ``enabled=False`` gives a no-op tracker.
            run_dir: the job's run directory (holds ``mlflow-run-id`` and the default store).
            params: flat config (``deitlt_scale.config.flatten``); secrets are redacted here.
            tags: run tags (see :func:`standard_tags`).
            rank: global rank; only rank 0 logs.
            run_id: on rank 0, a run to continue (default: the id in ``RUN_DIR/mlflow-run-id``);
                on other ranks, the id rank 0 returned, kept for reference.
            system_metrics: sample CPU/memory/GPU/disk/network into ``system/*`` metrics.
            retry_interval_s: after a failure, seconds before the next attempt to reach the store.
            max_buffered_metrics: metric points kept while the store is unreachable.
        """
        run_dir = Path(run_dir)
        if rank != 0 or not cfg.enabled:
            return cls(active=False, run_id=run_id)
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        tracker = cls(
            active=True,
            run_id=run_id or read_run_id(run_dir),
            uri=resolve_uri(cfg, run_dir),
            run_dir=run_dir,
            experiment=cfg.experiment,
            run_name=cfg.run_name,
            system_metrics=system_metrics,
            retry_interval_s=retry_interval_s,
            max_buffered_metrics=max_buffered_metrics,
        )
        safe = redact(params)
        tracker._pending.params = {k: _param_value(v) for k, v in safe.items()}
        tracker._pending.tags = {k: str(v) for k, v in tags.items()}
        config_file = run_dir / ".tracking" / "config.yaml"  # the redacted copy that is logged
        try:
            _write_atomic(config_file, yaml.safe_dump(unflatten(safe), sort_keys=False))
            tracker._pending.artifacts.append((config_file, None))
        except OSError as err:
            log.warning(
                "tracking: could not write %s (%s); config.yaml not logged", config_file, err
            )
        tracker._flush(force=True)
        return tracker

    # ---- public API

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` (name -> number) at optimizer ``step`` and send what is queued.

        Values that are not numbers are skipped; tensors with one element are converted.
        """
        if not self.active or self._closed:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                log.debug("tracking: metric %s=%r is not a number; skipped", key, value)
                continue
            self._pending.metrics.append(Metric(key, number, now, int(step)))
        overflow = len(self._pending.metrics) - self._max_buffered_metrics
        for _ in range(max(overflow, 0)):
            self._pending.metrics.popleft()
            self._pending.dropped_metrics += 1
        self._flush()

    def log_params(self, params: dict[str, Any]) -> None:
        """Queue extra params (redacted like the config); an already logged key keeps its value."""
        if not self.active or self._closed:
            return
        self._pending.params.update({k: _param_value(v) for k, v in redact(params).items()})
        self._flush()

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Queue run tags; a tag set twice keeps the last value."""
        if not self.active or self._closed:
            return
        self._pending.tags.update({k: str(v) for k, v in tags.items()})
        self._flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a file or a directory (uploaded recursively) under ``artifact_path``.

        The file is read when it is sent, which is later when the store is unreachable: keep it
        in place until :meth:`close`.
        """
        if not self.active or self._closed:
            return
        self._pending.artifacts.append((Path(path), artifact_path))
        self._flush()

    def flush(self) -> bool:
        """Try to send everything queued now, ignoring the retry interval; True when all went."""
        if not self.active:
            return True
        self._flush(force=True)
        return self._pending.empty()

    def close(self, status: str = "FINISHED") -> None:
        """Send what is queued, end the run with ``status`` and report anything lost.

        ``status`` is an MLflow run status: FINISHED, FAILED or KILLED.
        """
        if not self.active or self._closed:
            return
        self._flush(force=True)
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as err:  # the monitor's own failures must not end the job
                log.debug("tracking: stopping system metrics failed: %s", err)
            self._monitor = None
        if self._connected and self._client is not None and self.run_id:
            try:
                self._client.set_terminated(self.run_id, status=status)
            except Exception as err:
                log.warning(
                    "tracking: could not mark run %s %s: %s", self.run_id, status, _brief(err)
                )
        lost = []
        if not self._pending.empty():
            lost.append(f"unsent {self._pending.describe()}")
        if self._pending.dropped_metrics:
            lost.append(f"{self._pending.dropped_metrics} metric points dropped (buffer full)")
        if self._pending.rejected:
            refused = [f"{name} (x{n})" for name, n in list(self._pending.rejected.items())[:10]]
            lost.append(f"rejected by MLflow: {', '.join(refused)}")
        if self._pending.dropped_artifacts:
            lost.append(
                f"artifacts missing when sent: {', '.join(self._pending.dropped_artifacts)}"
            )
        if lost:
            log.warning(
                "tracking: run %s at %s closed with data lost: %s",
                self.run_id or "(never created)",
                mask_url(self.uri),
                "; ".join(lost),
            )
        self._closed = True

    @property
    def pending(self) -> str:
        """A short description of what is still queued (for logs)."""
        return self._pending.describe()

    @property
    def dropped_metrics(self) -> int:
        """Metric points dropped because the buffer was full."""
        return self._pending.dropped_metrics

    # ---- internals

    def _flush(self, force: bool = False) -> None:
        if not force and self._failing and time.monotonic() < self._next_try:
            return
        try:
            if not self._connected:
                self._connect()
            self._send()
        except Exception as err:  # any store failure: keep the data, warn once, go on training
            self._failing = True
            self._next_try = time.monotonic() + self._retry_interval_s
            if not self._warned:
                self._warned = True
                log.warning(
                    "tracking: MLflow at %s is unreachable (%s); training continues, metrics are "
                    "buffered (up to %d points) and sent when it is back",
                    mask_url(self.uri),
                    _brief(err),
                    self._max_buffered_metrics,
                )
            else:
                log.debug("tracking: still unreachable: %s", _brief(err))
            return
        if self._failing:
            self._failing = False
            log.warning(
                "tracking: MLflow at %s is reachable again; buffered data sent", mask_url(self.uri)
            )

    def _connect(self) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient(tracking_uri=self.uri)
        run = None
        if self.run_id:
            try:
                run = client.get_run(self.run_id)
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning(
                    "tracking: run %s (from %s) is not in %s; starting a new run",
                    self.run_id,
                    RUN_ID_FILE,
                    mask_url(self.uri),
                )
        if run is not None:
            client.update_run(run.info.run_id, status="RUNNING")
            existing = run.data.params
            changed = sorted(
                k for k, v in self._pending.params.items() if k in existing and existing[k] != v
            )
            if changed:
                log.warning(
                    "tracking: continuing run %s whose params differ for %s; MLflow keeps the "
                    "first values",
                    run.info.run_id,
                    ", ".join(changed),
                )
            self._pending.params = {
                k: v for k, v in self._pending.params.items() if k not in existing
            }
            self._resumed = True
        else:
            experiment_id = self._experiment_id(client)
            run = client.create_run(experiment_id, run_name=self._run_name)
        self.run_id = run.info.run_id
        self._client = client
        self._connected = True
        if self._run_dir is not None:
            _write_atomic(self._run_dir / RUN_ID_FILE, self.run_id + "\n")
        if self._system_metrics:
            self._start_monitor()

    def _experiment_id(self, client: MlflowClient) -> str:
        from mlflow.exceptions import MlflowException

        found = client.get_experiment_by_name(self._experiment)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(
                self._experiment, artifact_location=_local_artifact_root(self.uri)
            )
        except MlflowException as err:  # created by another job in between
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            again = client.get_experiment_by_name(self._experiment)
            if again is None:
                raise
            return again.experiment_id

    def _start_monitor(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=self._resumed, tracking_uri=self.uri
            )
            self._monitor.start()
        except Exception as err:  # psutil missing or similar: system metrics are optional
            log.info("tracking: system metrics unavailable: %s", _brief(err))
            self._monitor = None

    def _send(self) -> None:
        from mlflow.entities import Param, RunTag

        assert self._client is not None and self.run_id is not None
        client, run_id, pending = self._client, self.run_id, self._pending
        for kind, table, entity in (
            ("param", pending.params, Param),
            ("tag", pending.tags, RunTag),
        ):
            while table:
                chunk = list(table.items())[:_PARAMS_PER_REQUEST]
                self._deliver(
                    kind,
                    chunk,
                    lambda items, kind=kind, entity=entity: client.log_batch(
                        run_id, synchronous=True, **{kind + "s": [entity(k, v) for k, v in items]}
                    ),
                )
                for key, _ in chunk:
                    del table[key]
        while pending.metrics:
            chunk = [
                pending.metrics[i] for i in range(min(_METRICS_PER_REQUEST, len(pending.metrics)))
            ]
            self._deliver(
                "metric",
                chunk,
                lambda items: client.log_batch(run_id, metrics=items, synchronous=True),
            )
            for _ in chunk:
                pending.metrics.popleft()
        while pending.artifacts:
            path, artifact_path = pending.artifacts[0]
            if not path.exists():
                pending.dropped_artifacts.append(str(path))
            elif path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path)
            else:
                client.log_artifact(run_id, str(path), artifact_path)
            pending.artifacts.popleft()

    def _deliver(self, kind: str, items: list[Any], send: Callable[[list[Any]], None]) -> None:
        """Send ``items``; what the store refuses as invalid is dropped item by item, with a
        warning, so that one bad name never blocks everything queued behind it. Any other
        failure propagates (the caller keeps the items and retries later)."""
        try:
            send(items)
            return
        except Exception as err:
            if not _is_rejection(err):
                raise
            if len(items) == 1:
                self._reject(kind, items[0], err)
                return
        for item in items:
            try:
                send([item])
            except Exception as err:
                if not _is_rejection(err):
                    raise
                self._reject(kind, item, err)

    def _reject(self, kind: str, item: Any, err: BaseException) -> None:
        key = item[0] if isinstance(item, tuple) else getattr(item, "key", str(item))
        name = f"{kind} {key}"
        seen = self._pending.rejected.get(name, 0)
        self._pending.rejected[name] = seen + 1
        if not seen:  # once per name: a bad metric name comes back every log step
            log.warning("tracking: MLflow rejected %s %r, dropped: %s", kind, key, _brief(err))


def _is_rejection(err: BaseException) -> bool:
    """True for a store's refusal of the data itself (bad name, changed param), which a retry
    cannot fix; False for transport and server failures."""
    return getattr(err, "error_code", None) in _REJECTION_CODES


def _param_value(value: Any) -> str:
    """MLflow params are strings of bounded length; None becomes the empty string."""
    return ("" if value is None else str(value))[:_PARAM_VALUE_MAX]


def _local_artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts live next to the database (MLflow would use ./mlruns)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :])
    return (db.parent / "mlartifacts").resolve().as_uri()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _brief(err: BaseException) -> str:
    text = mask_url(" ".join(str(err).split()))  # client errors quote the URL, password included
    return f"{type(err).__name__}: {text[:300]}"
