"""What the trainer needs from a metrics store: the :class:`MetricWriter` protocol.

Implementations: :class:`deitlt_scale.tracking.mlflow_writer.Tracker` (an MLflow run) and
:class:`deitlt_scale.tracking.console.ConsoleWriter` (compact lines on stdout). Every method is
safe to call on every rank and never raises because of the store behind it: tracking must never
stop training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class MetricWriter(Protocol):
    """Records one run's metrics, params, tags and files.

    ``run_id`` names the run in its store (None when the store has none, or before it is known).
    """

    run_id: str | None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` (name -> number) at optimizer ``step``."""
        ...

    def log_params(self, params: dict[str, Any]) -> None:
        """Record run parameters (flat ``section.key`` names)."""
        ...

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags; a tag set twice keeps the last value."""
        ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Record a file or a directory under ``artifact_path`` in the run."""
        ...

    def close(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED); later calls do nothing."""
        ...


class FanOut:
    """One :class:`MetricWriter` that forwards every call to several (e.g. console + MLflow)."""

    def __init__(self, *writers: MetricWriter) -> None:
        self.writers = writers

    @property
    def run_id(self) -> str | None:  # type: ignore[override]
        return next((w.run_id for w in self.writers if w.run_id is not None), None)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for w in self.writers:
            w.log_metrics(metrics, step)

    def log_params(self, params: dict[str, Any]) -> None:
        for w in self.writers:
            w.log_params(params)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for w in self.writers:
            w.set_tags(tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        for w in self.writers:
            w.log_artifact(path, artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        for w in self.writers:
            w.close(status)
