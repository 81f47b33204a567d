"""Runs taken from other grids' output directories instead of trained again.

Grids share runs: every grid of experiments/ trains the embedded teacher recipe on seeds 0-4,
and the MAE grid's scratch student is the paper grid's DeiT-LT row. ``deitlt experiment run GRID
--out OUT --reuse OTHER`` copies such a run from ``OTHER`` into ``OUT`` when it trained exactly
what ``OUT``'s run would train:

* it is the same command (``teacher train``, ``train``, ``pretrain``, ``bench control``);
* both grids prepare the same data (the grid's ``data`` arguments and ``meta.json`` are equal);
* the recorded configuration of the complete run in ``OTHER``, with ``OTHER``'s directory written
  as ``OUT``'s, equals the run's configuration now (:func:`~.plan.config_difference`: paths to
  the data and to the teacher included);
* every run it needs (its teacher, the run it starts from) is a copy of the run the source
  needed, or of the run that one was copied from; a teacher trained again is another teacher,
  even with the same configuration. Paths to those runs compare as equal whatever their rows
  are called (the MAE grid's ``mae`` row is the choice grid's ``pt_m90_e200``).

The copy keeps the source's attempts (what the result cost) and records where it came from
(``RunState.reused_from``). A run that has any state of its own is never replaced.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import yaml

from deitlt_scale.errors import UserError
from deitlt_scale.experiments.plan import (
    Plan,
    Run,
    config_difference,
    is_complete,
    read,
    trained_keys,
)
from deitlt_scale.experiments.plan import trained_config as current_config
from deitlt_scale.experiments.state import RunState, origin
from deitlt_scale.strict import ConfigError


class Reuse:
    """The complete runs of ``sources`` that runs of ``plan`` may take (:meth:`take`)."""

    def __init__(self, plan: Plan, sources: list[Path]) -> None:
        self.plan, self.runs = plan, plan.by_key()
        self.sources = [read(source) for source in sources]
        self.source_runs = {other.out: other.by_key() for other in self.sources}
        for other in self.sources:
            _check_same_data(plan, other)

    def take(self, run: Run) -> Path | None:
        """Copy into ``run`` the first source run that trained what it trains; its directory,
        or None (then ``run`` is trained here)."""
        if RunState.read(run) is not None or is_complete(run):
            return None
        current = None
        for other in self.sources:
            for candidate in other.runs:
                if candidate.verb != run.verb or not is_complete(candidate):
                    continue
                recorded = RunState.read(candidate)
                if recorded is None or recorded.state != "done":
                    continue
                if not self._needs_taken_from(run, candidate, other):
                    continue
                trained = recorded.config or _written_config(candidate)
                current = current_config(run) if current is None else current
                # Paths to the runs it needed read as this run's (a copy of the same run may sit
                # under another row's name), then the rest of the other grid's as this one's.
                moves = [
                    (theirs.run_dir, self.runs[mine].run_dir)
                    for mine, theirs in zip(
                        run.needs,
                        map(self.source_runs[other.out].get, candidate.needs),
                        strict=True,
                    )
                ] + [(other.out, self.plan.out)]
                if trained is None or config_difference(_moved(trained, moves), current):
                    continue
                _copy(candidate, run, recorded, current)
                return candidate.run_dir
        return None

    def _needs_taken_from(self, run: Run, candidate: Run, other: Plan) -> bool:
        """Whether each run ``run`` needs is a copy of the one ``candidate`` needed (both
        traced back through their copies to the run that trained it)."""
        if len(run.needs) != len(candidate.needs):
            return False
        theirs = self.source_runs[other.out]
        return all(
            origin(self.runs[a].run_dir) == origin(theirs[b].run_dir)
            for a, b in zip(run.needs, candidate.needs, strict=True)
        )


def _check_same_data(plan: Plan, other: Plan) -> None:
    mine, theirs = plan.data / "meta.json", other.data / "meta.json"
    if not mine.is_file():
        raise UserError(
            f"--reuse needs {plan.data} prepared first: deitlt data prepare "
            f"{' '.join(plan.grid.data)} --out {plan.data}"
        )
    if (
        list(plan.grid.data) != list(other.grid.data)
        or not theirs.is_file()
        or json.loads(mine.read_text()) != json.loads(theirs.read_text())
    ):
        raise UserError(
            f"--reuse {other.out}: its data is not {plan.out}'s (prepared with "
            f"{' '.join(other.grid.data)}, here {' '.join(plan.grid.data)}, or another "
            "meta.json); its runs learned from other images"
        )


def _written_config(run: Run) -> dict | None:
    """What ``run`` trained as its trainer wrote it (``RUN_DIR/config.yaml``), for a state file
    from before the runner recorded configurations; None when it cannot be read as one now."""
    from deitlt_scale import config as config_mod

    path = run.run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        return trained_keys(config_mod.from_dict(yaml.safe_load(path.read_text())))
    except (ConfigError, TypeError, ValueError):
        return None


def _moved(config: dict, moves: list[tuple[Path, Path]]) -> dict:
    """``config`` with each path that is, or lies under, the first ``old`` of ``moves`` it
    matches written under its ``new`` (``DIR``, ``DIR/...`` and ``DIR:latest`` all move)."""

    def move(value: object) -> object:
        if isinstance(value, str):
            for old, new in moves:
                old = str(old)
                if value == old or value.startswith((f"{old}/", f"{old}:")):
                    return f"{new}{value[len(old) :]}"
        return value

    return {key: move(value) for key, value in config.items()}


def _copy(source: Run, run: Run, recorded: RunState, config: dict) -> None:
    """``source``'s directory and log as ``run``'s; the directory appears whole or not at all."""
    partial = run.run_dir.with_name(f".{run.run_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source.run_dir, partial, symlinks=True)
    recorded.argv, recorded.config = list(run.argv), config
    recorded.reused_from = str(source.run_dir)
    recorded.write(replace(run, run_dir=partial))
    partial.replace(run.run_dir)
    log = source.log.read_text() if source.log.is_file() else ""
    run.log.write_text(f"{log}\n# copied from {source.run_dir} (deitlt experiment run --reuse)\n")
