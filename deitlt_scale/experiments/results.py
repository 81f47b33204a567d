"""What a grid measured, gathered from its run directories into one JSON document.

The document is all :mod:`~deitlt_scale.experiments.report` needs to write the tables, claims,
plots and README summary, and it is what ``report --publish`` commits (``docs/data/NAME.json``),
so that a published page can be regenerated, and checked, without the runs. It holds per run
the final eval figures (``eval/latest.json``), the val split's (``eval/val/latest.json``), the
training summary (throughput, teacher agreement) and the attempts (wall and CPU seconds, load,
dates); for the grid's ``heads_row`` the fusion sweep and calibration of ``deitlt eval``; for its
``per_class_row`` the per-class accuracy; and the machine and package versions.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

from deitlt_scale.errors import UserError
from deitlt_scale.experiments.grid import as_tree
from deitlt_scale.experiments.plan import SUMMARY_FILE, Plan, Run, is_complete
from deitlt_scale.experiments.runner import cpu_model, deitlt_command, last_line
from deitlt_scale.experiments.state import RunState

FORMAT = "deitlt-experiment-results/1"
# The eval keys a report reads: every head's overall, mean per-class and paper groups, and a
# pre-training run's reconstruction loss.
KEPT = ("/overall", "/mean_class", "/paper/head", "/paper/mid", "/paper/tail", "mae/loss")


def _kept(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.endswith(KEPT) and k.count("/") <= 2}


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def run_record(run: Run) -> dict[str, Any]:
    """One complete run's figures and cost."""
    latest = _json(run.run_dir / "eval" / "latest.json")
    val = _json(run.run_dir / "eval" / "val" / "latest.json")
    state = RunState.read(run)
    attempts = state.attempts if state else []
    return {
        "seed": run.seed,
        "step": latest["step"],
        "metrics": _kept(latest["metrics"]),
        "val": _kept(val["metrics"]) if val else {},
        "summary": _json(run.run_dir / SUMMARY_FILE) or {},
        "wall_s": round(sum(a["wall_s"] for a in attempts), 2),
        "cpu_s": round(sum(a["cpu_s"] for a in attempts), 2),
        "load_before": [a.get("load_before") for a in attempts],
        "cpus": [a.get("cpu") for a in attempts],
        "ended": attempts[-1]["ended"] if attempts else "",
        "reused_from": state.reused_from if state else "",
    }


def collect(plan: Plan, command: str, partial: bool = False) -> dict[str, Any]:
    """The results document of ``plan``; every run must be complete (runs the post-hoc
    evaluation of the heads row once per seed, cached in its run directory). ``partial``: the
    teachers and rows whose every run is complete, the others left out and named in
    ``doc["partial"]`` (a grid still running; never published)."""
    missing = [r.key for r in plan.runs if not is_complete(r)]
    if missing and not partial:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(
            f"{plan.out}: {missing[0]}{more} not complete; `deitlt experiment status "
            f"{plan.out}` says where each run stands (`report --partial` shows what is done)"
        )
    unfinished = {(r.stage, r.name) for r in plan.runs if not is_complete(r)}
    grid = plan.grid
    meta = json.loads((plan.data / "meta.json").read_text())
    doc: dict[str, Any] = {
        "format": FORMAT,
        "grid": as_tree(grid),
        "options": {
            k: list(v) if isinstance(v, tuple) else v for k, v in vars(plan.options).items()
        },
        "command": command,
        "seeds": list(plan.seeds()),
        "dataset": {
            "name": meta["dataset"],
            "train_counts": meta["train_counts"],
            "groups": meta["groups"]["paper"],
            "val": "val" in meta["splits"],
        },
        "machine": machine(),
        "teachers": {},
        "rows": {},
    }
    for stage, names in (("teachers", grid.teachers), ("rows", grid.rows)):
        for name in names:
            runs = plan.runs_of(stage, name)
            if runs and (stage, name) not in unfinished:
                doc[stage][name] = [run_record(r) for r in runs]
    if partial:
        doc["partial"] = {
            "complete": len(plan.runs) - len(missing),
            "runs": len(plan.runs),
            "left_out": [f"{stage}/{name}" for stage, name in sorted(unfinished)],
        }
    report = grid.report
    if report.heads_row and _trained(grid, report.heads_row) in doc["rows"]:
        doc["heads"] = heads_record(plan.runs_of("rows", _trained(grid, report.heads_row)))
    if report.checkpoints_row and _trained(grid, report.checkpoints_row) in doc["rows"]:
        runs = plan.runs_of("rows", _trained(grid, report.checkpoints_row))
        doc["checkpoints"] = [checkpoints_record(r) for r in runs]
    if report.per_class_row and _trained(grid, report.per_class_row) in doc["rows"]:
        runs = plan.runs_of("rows", _trained(grid, report.per_class_row))
        doc["per_class"] = [per_class_record(r) for r in runs]
    return doc


def _trained(grid: Any, row: str) -> str:
    return grid.rows[row].reuses or row


def heads_record(runs: list[Run]) -> dict[str, list]:
    """Per seed, the test-split rows of the fusion sweep and of the calibration table of
    ``deitlt eval --tag latest --fusion-weight --calibration`` (run once per run)."""
    fusion, calibration = [], []
    for run in runs:
        out = run.run_dir / "eval-heads"
        posthoc = out / "posthoc"
        if not (posthoc / "posthoc.json").is_file():
            argv = ["eval", str(run.run_dir), "--tag", "latest", "--fusion-weight",
                    "--calibration", "--out", str(out)]  # fmt: skip
            code = deitlt_command(argv, run.log)
            if code != 0:
                raise UserError(
                    f"deitlt eval of {run.run_dir} failed (exit {code}): {last_line(run.log)}"
                )
        fusion.append(_csv_rows(posthoc / "fusion.csv"))
        calibration.append(_csv_rows(posthoc / "calibration.csv"))
    return {"fusion": fusion, "calibration": calibration}


def _csv_rows(path: Path) -> list[dict[str, float | str]]:
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("split", "test") == "test"]
    return [{k: _number(v) for k, v in r.items() if k != "split"} for r in rows]


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def checkpoints_record(run: Run) -> dict[str, Any]:
    """The run's final figures, those of the checkpoint training chose (``eval/best.json``: on
    the val split when there is one) and every evaluation's test figures and val mean
    per-class accuracy, read back from the per-class CSVs training wrote at each eval."""
    best = _json(run.run_dir / "eval" / "best.json")
    if best is None:
        raise UserError(f"{run.run_dir} has no eval/best.json: it chose no checkpoint")
    test = _history(run.run_dir / "eval")
    val = _history(run.run_dir / "eval" / "val")
    return {
        "best": {"step": best["step"], "selected_on": best["selected_on"],
                 "metrics": _kept(best["metrics"])},
        "history": [{"step": step, "test": test[step],
                     "val_mean_class": {k: v for k, v in val.get(step, {}).items()
                                        if k.endswith("/mean_class")}}
                    for step in sorted(test)],
    }  # fmt: skip


def _history(eval_dir: Path) -> dict[int, dict[str, float]]:
    """Per eval step, from ``per_class_stepNNNNNNNN.csv``: every head's overall accuracy (image
    weighted), mean per-class accuracy and paper groups, as the trainer computes them."""
    out: dict[int, dict[str, float]] = {}
    for path in sorted(eval_dir.glob("per_class_step*.csv")):
        with open(path) as f:
            rows = list(csv.DictReader(f))
        counts = [int(r["eval_count"]) for r in rows]
        metrics: dict[str, float] = {}
        for head in [c.removeprefix("acc_") for c in rows[0] if c.startswith("acc_")]:
            acc = [float(r[f"acc_{head}"]) if r[f"acc_{head}"] else None for r in rows]
            present = [(a, n) for a, n in zip(acc, counts) if a is not None and n > 0]
            metrics[f"{head}/overall"] = sum(a * n for a, n in present) / sum(n for _, n in present)
            metrics[f"{head}/mean_class"] = sum(a for a, _ in present) / len(present)
            for group in ("head", "mid", "tail"):
                members = [
                    a for a, r in zip(acc, rows) if r["group_paper"] == group and a is not None
                ]
                if members:
                    metrics[f"{head}/paper/{group}"] = sum(members) / len(members)
        out[int(path.stem.removeprefix("per_class_step"))] = metrics
    return out


def per_class_record(run: Run) -> dict[str, list[float | None]]:
    """Per head, the accuracy of every class in the final evaluation (None: no eval images)."""
    with open(run.run_dir / "eval" / "per_class_latest.csv") as f:
        table = list(csv.DictReader(f))
    heads = [c.removeprefix("acc_") for c in table[0] if c.startswith("acc_")]
    return {h: [float(r[f"acc_{h}"]) if r[f"acc_{h}"] else None for r in table] for h in heads}


def machine() -> dict[str, Any]:
    """The CPU, core count, GPU and package versions of this machine."""
    cpu = cpu_model()
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    versions = {name: _version(name) for name in ("torch", "deepspeed", "timm")}
    dali = [d.version for d in importlib.metadata.distributions()
            if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")]  # fmt: skip
    versions["dali"] = dali[0] if dali else "not installed"
    return {"arch": platform.machine(), "cores": os.cpu_count(), "cpu": cpu, "gpu": gpu,
            "python": platform.python_version(), "versions": versions}  # fmt: skip


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def save(doc: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def load(path: Path) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != FORMAT:
        raise UserError(f"{path} is not a results file of `deitlt experiment report` ({FORMAT})")
    return doc
