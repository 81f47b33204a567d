"""The run tags every training job sets, whatever writer records them."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

from deitlt_scale.config import Config


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the git checkout holding ``path`` (default: this package), or None."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def standard_tags(
    cfg: Config, world_size: int, device: str, dataset: str | None = None
) -> dict[str, str]:
    """The run tags every training job sets: dataset, model, teacher, git commit, world, device.

    ``dataset`` defaults to the ``dataset`` field of the shards' meta.json, else the shards
    directory name.
    """
    if dataset is None:
        dataset = Path(cfg.data.shards).name
        meta = Path(cfg.data.shards) / "meta.json"
        if meta.is_file():
            with contextlib.suppress(json.JSONDecodeError, AttributeError):
                dataset = str(json.loads(meta.read_text()).get("dataset") or dataset)
    tags = {
        "dataset": dataset,
        "model": cfg.model.arch,
        "teacher": cfg.teacher.path or "none",
        "task": cfg.train.task,
        "world_size": str(world_size),
        "device": device,
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
    return tags
