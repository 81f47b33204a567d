"""A run's state file, ``RUN_DIR/experiment.json``: its command, the configuration it trains,
``pending | running | done | failed | stopped``, where it runs and every attempt
(:mod:`.runner` writes the attempts)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deitlt_scale.experiments.plan import STATE_FILE, Run


@dataclass
class RunState:
    argv: list[str]
    config: dict | None  # what it trains: the resolved config's dotted keys (trained_config)
    state: str = "pending"  # running | done | failed | stopped
    host: str = ""
    pid: int = 0
    slurm_job: str = ""
    error: str = ""  # the last line of the log of a failed attempt
    reused_from: str = ""  # the run directory it was copied from (experiments/reuse.py)
    attempts: list[dict] = field(default_factory=list)

    @classmethod
    def read(cls, run: Run) -> RunState | None:
        path = run.run_dir / STATE_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        data.pop("config_hash", None)  # recorded before the config itself was: not compared
        data.setdefault("config", None)
        return cls(**data)

    def write(self, run: Run) -> None:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        path = run.run_dir / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.partial")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        tmp.replace(path)

    @property
    def wall_s(self) -> float:
        return sum(a["wall_s"] for a in self.attempts)


def origin(run_dir: Path) -> Path:
    """The run directory that trained what ``run_dir`` holds: itself, or where it was copied
    from, followed through copies of copies."""
    path = run_dir / STATE_FILE
    copied_from = json.loads(path.read_text()).get("reused_from") if path.is_file() else ""
    return origin(Path(copied_from)) if copied_from else run_dir
