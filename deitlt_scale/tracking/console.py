"""A :class:`~deitlt_scale.tracking.writer.MetricWriter` that prints to stdout and keeps the last
values, for runs with no metrics store (``tracking.enabled: false``, quick local checks)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ConsoleWriter:
    """One compact line per :meth:`log_metrics` call on rank 0; the last values on every rank.

    The line is ``[step STEP/TOTAL] name=value ...`` (``/TOTAL`` only when ``total_steps`` is
    given), each name shortened to its last ``/`` component and each value to 4 significant
    digits, the trainer's own log-line format. Params, tags and artifact paths are kept in memory,
    never printed. After :meth:`close` every call does nothing.
    """

    def __init__(
        self, rank: int = 0, total_steps: int | None = None, only: tuple[str, ...] = ()
    ) -> None:
        """``only``: name prefixes to print (e.g. ``("train/",)``); all are kept regardless."""
        self.run_id: str | None = None  # a console has no run to name
        self.rank = rank
        self.total_steps = total_steps
        self.only = only
        self.last: dict[str, float] = {}  # metric name -> last value logged
        self.last_step: int | None = None
        self.params: dict[str, Any] = {}
        self.tags: dict[str, str] = {}
        self.artifacts: list[tuple[Path, str | None]] = []
        self.status: str | None = None  # set by close()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Keep and (rank 0) print ``metrics`` at optimizer ``step``; non-numbers are skipped."""
        if self.status is not None:
            return
        numbers: dict[str, float] = {}
        for key, value in metrics.items():
            try:
                numbers[key] = float(value)
            except (TypeError, ValueError):
                log.debug("console: metric %s=%r is not a number; skipped", key, value)
        self.last.update(numbers)
        self.last_step = int(step)
        if self.only:
            numbers = {k: v for k, v in numbers.items() if k.startswith(self.only)}
        if self.rank != 0 or not numbers:
            return
        where = f"{step}/{self.total_steps}" if self.total_steps is not None else f"{step}"
        shown = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in numbers.items())
        print(f"[step {where}] {shown}", file=sys.stdout, flush=True)

    def log_params(self, params: dict[str, Any]) -> None:
        """Keep params; an already kept key keeps its first value, as in MLflow."""
        if self.status is None:
            self.params.update({k: v for k, v in params.items() if k not in self.params})

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Keep tags as strings; a tag set twice keeps the last value."""
        if self.status is None:
            self.tags.update({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Remember the path (the file stays where it is; nothing is copied)."""
        if self.status is None:
            self.artifacts.append((Path(path), artifact_path))

    def close(self, status: str = "FINISHED") -> None:
        """Record ``status``; later calls do nothing."""
        if self.status is None:
            self.status = status
