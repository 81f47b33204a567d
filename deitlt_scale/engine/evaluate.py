"""Exact global per-class accuracy: per-class correct and total counts are all-reduced.

Unlike per-rank averages, this gives the same Head/Mid/Tail on any number of ranks, and a class
with no eval samples on one rank cannot produce NaN. A class with no eval samples at all is left
out of its group's mean (and reported as empty in the CSV).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deitlt_scale.data.longtail import GROUP_NAMES

Predictor = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]  # images -> {head: logits}


@dataclass
class EvalResult:
    metrics: dict[str, float]  # "mean/overall", "mean/paper/head", "cls/top5", ...
    per_class: dict[str, list[float]]  # head -> accuracy per class (nan when no samples)
    totals: list[int]  # eval samples per class

    def headline(self, head: str) -> float:
        return self.metrics[f"{head}/overall"]


class ClassCounts:
    """Per-class eval totals and top-1/top-5 hits of every head, kept on the device.

    The one per-class accuracy of the project: :func:`evaluate` and the analyses count with it.
    Labels below 0 (eval padding) are ignored.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.totals = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.correct: dict[str, torch.Tensor] = {}
        self.top5: dict[str, torch.Tensor] = {}

    @property
    def heads(self) -> list[str]:
        return sorted(self.correct)

    def add(self, logits_by_head: Mapping[str, torch.Tensor], labels: torch.Tensor) -> None:
        """Count one batch: ``{head: (B, K) logits}`` against ``(B,)`` labels."""
        keep = labels >= 0  # -1 marks padding added to even out ranks
        labels = labels[keep].to(self.totals.device)
        k = self.num_classes
        self.totals += torch.bincount(labels, minlength=k).to(self.totals.dtype)
        for head, logits in logits_by_head.items():
            logits = logits[keep.to(logits.device)].float().to(self.totals.device)
            hit = logits.argmax(dim=1) == labels
            hit5 = (logits.topk(min(5, k), dim=1).indices == labels[:, None]).any(dim=1)
            correct = self.correct.setdefault(head, torch.zeros_like(self.totals))
            top5 = self.top5.setdefault(head, torch.zeros_like(self.totals))
            correct += torch.bincount(labels, weights=hit.double(), minlength=k)
            top5 += torch.bincount(labels, weights=hit5.double(), minlength=k)

    def all_reduce(self) -> None:
        """Sum the counts over ranks (a collective: every rank must call it)."""
        if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            return
        heads = self.heads
        stacked = torch.stack(
            [self.totals, *(self.correct[h] for h in heads), *(self.top5[h] for h in heads)]
        )
        torch.distributed.all_reduce(stacked)
        n = len(heads)
        self.totals = stacked[0]
        self.correct = {h: stacked[1 + i] for i, h in enumerate(heads)}
        self.top5 = {h: stacked[1 + n + i] for i, h in enumerate(heads)}

    def accuracy(self) -> dict[str, torch.Tensor]:
        """Per-class top-1 accuracy in [0, 1] per head (CPU, float64), NaN without eval images."""
        totals = self.totals.cpu()
        return {
            h: torch.where(totals > 0, hits.cpu() / totals.clamp(min=1), torch.nan)
            for h, hits in self.correct.items()
        }


@torch.no_grad()
def evaluate(
    predict: Predictor,
    batches: Iterable,
    num_classes: int,
    groups: Mapping[str, list[int]],
    device: torch.device,
) -> EvalResult:
    """Top-1/top-5 and per-class accuracy of every head ``predict`` returns. Runs on all ranks."""
    counts = ClassCounts(num_classes, device)
    for batch in batches:
        counts.add(predict(batch.images), batch.labels)
    counts.all_reduce()
    totals = counts.totals.cpu()
    metrics: dict[str, float] = {}
    per_class: dict[str, list[float]] = {}
    for head, acc in counts.accuracy().items():
        hits, hits5 = counts.correct[head].cpu(), counts.top5[head].cpu()
        per_class[head] = acc.tolist()
        metrics[f"{head}/overall"] = float(hits.sum() / totals.sum().clamp(min=1))
        metrics[f"{head}/top5"] = float(hits5.sum() / totals.sum().clamp(min=1))
        metrics[f"{head}/mean_class"] = float(acc.nanmean())
        for convention, group_of in groups.items():
            group_of = torch.tensor(group_of)
            for g, name in enumerate(GROUP_NAMES):
                members = acc[(group_of == g) & (totals > 0)]
                value = float(members.mean()) if len(members) else float("nan")
                metrics[f"{head}/{convention}/{name}"] = value
    return EvalResult(metrics, per_class, totals.long().tolist())


def write_per_class_csv(
    result: EvalResult,
    path: str | Path,
    train_counts: list[int],
    class_names: list[str],
    groups: Mapping[str, list[int]],
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heads = sorted(result.per_class)
    conventions = sorted(groups)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["class", "name", "train_count", "eval_count"]
            + [f"group_{c}" for c in conventions]
            + [f"acc_{h}" for h in heads]
        )
        for c in range(len(result.totals)):
            writer.writerow(
                [c, class_names[c], train_counts[c], result.totals[c]]
                + [GROUP_NAMES[groups[conv][c]] for conv in conventions]
                + [_fmt(result.per_class[h][c]) for h in heads]
            )
    return path


def format_table(result: EvalResult, conventions: Iterable[str] = ("paper", "count")) -> str:
    """Overall/Head/Mid/Tail per head and group convention, in percent."""
    lines = [f"{'head':<8}{'groups':<8}{'overall':>9}{'head':>8}{'mid':>8}{'tail':>8}{'top5':>8}"]
    for head in sorted(result.per_class):
        m = result.metrics
        for conv in conventions:
            if f"{head}/{conv}/head" not in m:
                continue
            row = [m[f"{head}/overall"]] + [m[f"{head}/{conv}/{g}"] for g in GROUP_NAMES]
            row.append(m[f"{head}/top5"])
            lines.append(f"{head:<8}{conv:<8}" + "".join(f"{100 * v:>8.1f} " for v in row))
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "" if value != value else f"{value:.6f}"


def evaluate_run(
    predict: Predictor, batches: Iterable, meta: Any, world: Any, out_dir: Path, step: int
) -> EvalResult:
    """Evaluate on every rank; rank 0 writes the outputs of ``step`` to ``out_dir``.

    The one evaluation of a run: training calls it on its live engine, ``deitlt eval`` on the
    weights of a checkpoint, so both write the same files for the same weights.
    """
    result = evaluate(predict, batches, meta.num_classes, meta.groups, world.device)
    if world.is_main:
        write_eval_outputs(result, out_dir, meta, step)
    return result


def write_eval_outputs(result: EvalResult, out_dir: Path, meta: Any, step: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_per_class_csv(
        result,
        out_dir / f"per_class_step{step:08d}.csv",
        meta.train_counts,
        meta.class_names,
        meta.groups,
    )
    write_per_class_csv(
        result, out_dir / "per_class_latest.csv", meta.train_counts, meta.class_names, meta.groups
    )
    write_json_atomic(out_dir / "latest.json", {"step": step, "metrics": result.metrics})
    (out_dir / "table.txt").write_text(format_table(result) + "\n")


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON through a partial file, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
