"""Exact global per-class accuracy: per-class correct and total counts are all-reduced.

Unlike per-rank averages, this gives the same Head/Mid/Tail on any number of ranks, and a class
with no eval samples on one rank cannot produce NaN. A class with no eval samples at all is left
out of its group's mean (and reported as empty in the CSV).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

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


@torch.no_grad()
def evaluate(
    predict: Predictor,
    batches: Iterable,
    num_classes: int,
    groups: Mapping[str, list[int]],
    device: torch.device,
) -> EvalResult:
    """Top-1/top-5 and per-class accuracy of every head ``predict`` returns. Runs on all ranks."""
    correct: dict[str, torch.Tensor] = {}
    top5: dict[str, torch.Tensor] = {}
    totals = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for batch in batches:
        labels = batch.labels
        keep = labels >= 0  # -1 marks padding added to even out ranks
        labels = labels[keep]
        totals += torch.bincount(labels, minlength=num_classes).to(totals.dtype)
        for head, logits in predict(batch.images).items():
            logits = logits[keep].float()
            hit = logits.argmax(dim=1) == labels
            k = min(5, num_classes)
            hit5 = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
            correct.setdefault(head, torch.zeros_like(totals))
            top5.setdefault(head, torch.zeros_like(totals))
            correct[head] += torch.bincount(labels, weights=hit.double(), minlength=num_classes)
            top5[head] += torch.bincount(labels, weights=hit5.double(), minlength=num_classes)
    heads = sorted(correct)
    stacked = torch.stack([totals, *(correct[h] for h in heads), *(top5[h] for h in heads)])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(stacked)
    stacked = stacked.cpu()
    totals = stacked[0]
    metrics: dict[str, float] = {}
    per_class: dict[str, list[float]] = {}
    n = len(heads)
    for i, head in enumerate(heads):
        hits, hits5 = stacked[1 + i], stacked[1 + n + i]
        acc = torch.where(totals > 0, hits / totals.clamp(min=1), torch.nan)
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
