"""Experiment tracking: the :class:`MetricWriter` protocol the trainer writes to, its MLflow
(:class:`Tracker`) and console (:class:`ConsoleWriter`) implementations, the standard run tags,
secret redaction, and the local MLflow server (:mod:`deitlt_scale.tracking.server`).

Importing this package does not import MLflow; the MLflow writer imports it when it first
connects.
"""

from deitlt_scale.tracking.console import ConsoleWriter
from deitlt_scale.tracking.mlflow_writer import (
    RUN_ID_FILE,
    Tracker,
    read_run_id,
    resolve_uri,
    unflatten,
)
from deitlt_scale.tracking.redact import REDACTED, is_secret_key, mask_url, redact
from deitlt_scale.tracking.tags import git_commit, standard_tags
from deitlt_scale.tracking.writer import FanOut, MetricWriter

__all__ = [
    "REDACTED",
    "RUN_ID_FILE",
    "ConsoleWriter",
    "FanOut",
    "MetricWriter",
    "Tracker",
    "git_commit",
    "is_secret_key",
    "mask_url",
    "read_run_id",
    "redact",
    "resolve_uri",
    "standard_tags",
    "unflatten",
]
