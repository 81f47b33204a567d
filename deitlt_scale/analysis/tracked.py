"""The analysed run's MLflow run: read the tracked CLS/DIST cosine, attach plots and tables.

A run is linked by ``mlflow-run-id`` in its directory. Without that file nothing is read or
written; a linked run that cannot be reached is reported on stderr and skipped, never fatal.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from deitlt_scale.config import TrackingConfig

COSINE_METRIC = "train/cls_dist_cosine"  # per-step mean cos(CLS, DIST), logged by the trainer
ARTIFACT_DIR = "analysis"


def tracking_uri(tracking: TrackingConfig | None, run_dir: Path) -> str:
    """Where the run was tracked: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the
    SQLite store in the run directory (the trainer's precedence)."""
    from deitlt_scale.tracking import resolve_uri

    return resolve_uri(tracking or TrackingConfig(), run_dir)


class Tracker:
    """An existing MLflow run, addressed through the client API (no active-run global state)."""

    def __init__(self, uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        self.client.get_run(run_id)  # fails early when the run is not there

    def history(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of a metric, by step; empty when the run never logged it."""
        points = self.client.get_metric_history(self.run_id, key)
        return sorted((int(p.step), float(p.value)) for p in points)

    def log_files(self, files: Iterable[Path], artifact_path: str = ARTIFACT_DIR) -> None:
        for f in files:
            self.client.log_artifact(self.run_id, str(f), artifact_path)

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            if value is not None and math.isfinite(value):
                self.client.log_metric(self.run_id, key, float(value))


def open_tracker(
    run_id: str | None, tracking: TrackingConfig | None, run_dir: Path
) -> Tracker | None:
    """The run's tracker, or None when the run has no linked MLflow run or it is unreachable."""
    if not run_id:
        return None
    uri = tracking_uri(tracking, run_dir)
    store = uri.removeprefix("sqlite:///")
    if store != uri and not Path(store).is_file():
        # Opening a missing SQLite store would create an empty one in the run directory.
        print(
            f"deitlt analyze: {run_dir} names MLflow run {run_id} but {store} does not exist; "
            "not logging to MLflow (set tracking.uri or MLFLOW_TRACKING_URI)",
            file=sys.stderr,
        )
        return None
    try:
        return Tracker(uri, run_id)
    except Exception as err:  # any MLflow/store failure: analysis output stays on disk
        print(
            f"deitlt analyze: MLflow run {run_id} at {uri} is not reachable "
            f"({' '.join(str(err).split())[:200]}); not logging to it",
            file=sys.stderr,
        )
        return None
