"""The post-hoc report of ``deitlt eval``: logit adjustment, head fusion and calibration of one
checkpoint, from its collected test logits and, where the dataset has one, its validation logits.

tau and the fusion weight are chosen on the validation split only (balanced accuracy,
:data:`~deitlt_scale.engine.posthoc.SELECTION_METRIC`) and the test split is reported at the
chosen value; without a validation split the sweeps are reported on the test split and nothing
is chosen. Files written to ``out_dir``: ``logit_adjust.csv``, ``fusion.csv``,
``calibration.csv``, ``reliability_<head>.png`` and ``posthoc.json`` (choices and the flat
metrics also logged to MLflow).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deitlt_scale.engine import posthoc
from deitlt_scale.engine.posthoc import Logits
from deitlt_scale.errors import UserError

GROUP_COLUMNS = ("overall", "mean_class", "head", "mid", "tail")


@dataclass
class PosthocOptions:
    logit_adjust: bool = False
    calibration: bool = False
    fusion: bool = False
    taus: Sequence[float] = posthoc.DEFAULT_TAUS
    weights: Sequence[float] = posthoc.DEFAULT_WEIGHTS
    bins: int = posthoc.ECE_BINS

    @property
    def any(self) -> bool:
        return self.logit_adjust or self.calibration or self.fusion


@dataclass
class PosthocReport:
    metrics: dict[str, float] = field(default_factory=dict)  # flat, test split, fractions
    lines: list[str] = field(default_factory=list)  # the printed summary
    files: list[Path] = field(default_factory=list)


def run_posthoc(
    test: Logits,
    val: Logits | None,
    train_counts: Sequence[int],
    groups: Mapping[str, Sequence[int]],
    options: PosthocOptions,
    out_dir: Path,
) -> PosthocReport:
    """Every requested analysis of one checkpoint; writes its files to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = PosthocReport()
    splits = {"test": test, **({"val": val} if val is not None else {})}
    choices: dict[str, Any] = {
        "selected_on": "val" if val is not None else None,
        "selection_metric": posthoc.SELECTION_METRIC,
    }
    if val is None:
        report.lines.append(
            "no val split in this dataset: sweeps are reported on the test split and no value is "
            "chosen (prepare with --val-per-class K or --val-list to choose on held-out data)"
        )
    if options.logit_adjust:
        choices["logit_adjust"] = _logit_adjust(
            splits, train_counts, groups, options, out_dir, report
        )
    if options.fusion:
        choices["fusion"] = _fusion(splits, groups, options, out_dir, report)
    if options.calibration:
        _calibration(splits, options, out_dir, report)
    payload = {"choices": choices, "metrics": report.metrics}
    path = out_dir / "posthoc.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    report.files.append(path)
    return report


def _accuracy_rows(logits, labels, groups: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Overall, mean-class and paper Head/Mid/Tail, plus the count groups as ``count_*``."""
    row = posthoc.group_accuracy(logits, labels, groups["paper"])
    if "count" in groups:
        count = posthoc.group_accuracy(logits, labels, groups["count"])
        row.update({f"count_{g}": count[g] for g in ("head", "mid", "tail")})
    return row


def _logit_adjust(splits, train_counts, groups, options, out_dir, report) -> dict[str, Any]:
    prior = posthoc.log_prior(train_counts)
    rows: list[dict[str, Any]] = []
    chosen: dict[str, float] = {}
    for split, data in splits.items():
        for head, logits in sorted(data.heads.items()):
            for tau in options.taus:
                adjusted = posthoc.adjust(logits.double(), prior, tau)
                rows.append({"split": split, "predictor": head, "tau": float(tau),
                             **_accuracy_rows(adjusted, data.labels, groups)})  # fmt: skip
    test_rows = [r for r in rows if r["split"] == "test"]
    for head in sorted(splits["test"].heads):
        mine = [r for r in test_rows if r["predictor"] == head]
        at_zero = min(mine, key=lambda r: abs(r["tau"]))
        report.metrics[f"la/{head}/tau0/overall"] = at_zero["overall"]
        if "val" in splits:
            val_rows = [r for r in rows if r["split"] == "val" and r["predictor"] == head]
            tau = posthoc.choose(val_rows, "tau", prefer=0.0)
            chosen[head] = tau
            at = min(mine, key=lambda r: abs(r["tau"] - tau))
            report.metrics[f"la/{head}/tau"] = tau
            for g in GROUP_COLUMNS:
                report.metrics[f"la/{head}/{g}"] = at[g]
    path = _write_csv(out_dir / "logit_adjust.csv", rows)
    report.files.append(path)
    report.lines.append(f"logit adjustment, z - tau * log prior (test split; all taus: {path})")
    report.lines.append(_table_header("logits", "tau"))
    for head in sorted(splits["test"].heads):
        mine = [r for r in test_rows if r["predictor"] == head]
        shown = [min(mine, key=lambda r: abs(r["tau"]))]
        if head in chosen:
            shown.append(min(mine, key=lambda r: abs(r["tau"] - chosen[head])))
        else:
            shown.append(min(mine, key=lambda r: abs(r["tau"] - 1.0)))
        for r, note in zip(shown, ("", "chosen on val" if head in chosen else "")):
            report.lines.append(_table_row(head, r["tau"], r, note))
    return {"tau": chosen, "taus": [float(t) for t in options.taus]}


def _fusion(splits, groups, options, out_dir, report) -> dict[str, Any]:
    test = splits["test"]
    if "cls" not in test.heads or "dist" not in test.heads:
        raise UserError(
            "--fusion-weight needs a CLS and a DIST head; this checkpoint has "
            f"{', '.join(sorted(test.heads))} (a distilled DeiT-LT student has both)"
        )
    rows: list[dict[str, Any]] = []
    for split, data in splits.items():
        for w in options.weights:
            fused = posthoc.fuse(data.heads["cls"].double(), data.heads["dist"].double(), w)
            rows.append({"split": split, "weight": float(w),
                         **_accuracy_rows(fused, data.labels, groups)})  # fmt: skip
    test_rows = [r for r in rows if r["split"] == "test"]
    weight = None
    if "val" in splits:
        weight = posthoc.choose([r for r in rows if r["split"] == "val"], "weight", prefer=0.5)
        at = min(test_rows, key=lambda r: abs(r["weight"] - weight))
        report.metrics["fusion/weight"] = weight
        for g in GROUP_COLUMNS:
            report.metrics[f"fusion/{g}"] = at[g]
    path = _write_csv(out_dir / "fusion.csv", rows)
    report.files.append(path)
    report.lines.append(f"head fusion, w * CLS + (1 - w) * DIST (test split; all weights: {path})")
    report.lines.append(_table_header("fusion", "w"))
    for r in test_rows:
        note = "chosen on val" if weight is not None and r["weight"] == weight else ""
        note = note or ("paper mean" if r["weight"] == 0.5 else "")
        report.lines.append(_table_row("w", r["weight"], r, note))
    return {"weight": weight, "weights": [float(w) for w in options.weights]}


def _calibration(splits, options, out_dir, report) -> None:
    from deitlt_scale.analysis.plots import plot_reliability, save_figure

    rows: list[dict[str, Any]] = []
    for split, data in splits.items():
        for head, logits in sorted(data.heads.items()):
            cal = posthoc.calibration(logits, data.labels, options.bins)
            rows.append({"split": split, "predictor": head, **cal})
            if split == "test":
                report.metrics[f"calib/{head}/ece"] = cal["ece"]
                report.metrics[f"calib/{head}/nll"] = cal["nll"]
                rel = posthoc.reliability(logits, data.labels, options.bins)
                fig = plot_reliability(
                    rel.edges, rel.counts, rel.accuracy, rel.confidence,
                    f"{head} head, test split: ECE {100 * cal['ece']:.1f}% ({options.bins} bins), "
                    f"NLL {cal['nll']:.3f}",
                )  # fmt: skip
                png = out_dir / f"reliability_{head}.png"
                save_figure(fig, png)
                report.files.append(png)
    path = _write_csv(out_dir / "calibration.csv", rows)
    report.files.append(path)
    report.lines.append(f"calibration ({options.bins}-bin ECE, NLL in nats; {path})")
    report.lines.append(f"{'split':<6}{'head':<9}{'ECE %':>8}{'NLL':>8}{'acc %':>8}{'conf %':>8}")
    for r in rows:
        report.lines.append(
            f"{r['split']:<6}{r['predictor']:<9}{100 * r['ece']:>8.1f}{r['nll']:>8.3f}"
            f"{100 * r['accuracy']:>8.1f}{100 * r['confidence']:>8.1f}"
        )


def _table_header(first: str, knob: str) -> str:
    return f"{first:<8}{knob:>5}" + "".join(f"{c:>9}" for c in ("overall", "head", "mid", "tail"))


def _table_row(head: str, value: float, row: Mapping[str, float], note: str) -> str:
    cells = "".join(f"{100 * row[g]:>9.1f}" for g in ("overall", "head", "mid", "tail"))
    return f"{head:<8}{value:>5.1f}{cells}" + (f"   {note}" if note else "")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    columns = list(rows[0]) if rows else []
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
    return path


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6f}"
    return value
