"""`deitlt analyze` end to end: one pass over eval images, then one PNG + its numbers per analysis.

:func:`analyze` works on any iterable of ``(images, labels)`` batches and already-loaded models,
so it runs the same on a prepared dataset (through the eval loader) and on tensors built in a
test. Output names (in ``out``): ``attention_distance``, ``rollout``, ``divergence``, ``rank``,
``entropy``, ``per_class``, each ``.png`` + ``.csv`` and/or ``.json``, and ``summary.json``.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from deitlt_scale.analysis import plots
from deitlt_scale.analysis.accuracy import PREDICTORS, group_bands
from deitlt_scale.analysis.attention import attention_rollout, rollout_maps
from deitlt_scale.analysis.collect import WHAT, ClassQuota, ModelStats, SampleImages
from deitlt_scale.analysis.features import RANK_VARIANCE, group_means
from deitlt_scale.analysis.loading import Subject
from deitlt_scale.analysis.probe import trace
from deitlt_scale.analysis.teacher import TeacherEntropy, max_entropy
from deitlt_scale.analysis.tracked import COSINE_METRIC
from deitlt_scale.data.longtail import GROUP_NAMES, TAIL
from deitlt_scale.data.meta import DatasetMeta
from deitlt_scale.errors import UserError

SUMMARY_FILE = "summary.json"


@dataclass
class Options:
    what: Sequence[str] = WHAT
    images: int = 2048  # eval images analysed, class-balanced; 0 = the whole eval split
    rollout_images: int = 6
    groups: str = "paper"  # meta.groups convention for Head/Mid/Tail: "paper" or "count"
    rank_threshold: float = RANK_VARIANCE
    progress: bool = True


def parse_what(text: str) -> tuple[str, ...]:
    """``"distance,rank"`` -> ``("distance", "rank")``, checked against :data:`WHAT`."""
    items = tuple(dict.fromkeys(w.strip() for w in text.split(",") if w.strip()))
    unknown = [w for w in items if w not in WHAT]
    if unknown or not items:
        raise UserError(
            f"--what {text!r}: unknown {unknown[0]!r}" if unknown else "--what is empty"
        )
    return items


def analyze(
    subject: Subject,
    meta: DatasetMeta,
    batches: Iterable[Any],
    out: str | Path,
    options: Options | None = None,
    compare: Subject | None = None,
    teacher: Callable[[Tensor], Tensor] | None = None,
    ood_images: Iterable[Tensor] | None = None,
    history: Sequence[tuple[int, float]] | None = None,
    total_batches: int | None = None,
) -> dict[str, Any]:
    """Run the analyses of ``options.what`` and write their files; returns the summary.

    ``batches`` yields ``(images, labels)`` (or objects with ``.images``/``.labels``) normalised
    for ``subject``; ``compare`` gets the same images, re-normalised and resized for it.
    ``teacher`` labels the eval images (in-distribution) and ``ood_images`` (strongly augmented,
    mixed training images, used up to as many as eval images were analysed). ``history`` is
    the tracked ``(step, cos(CLS, DIST))`` series, plotted as ``1 - cos``.
    """
    options = options or Options()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    what = [w for w in WHAT if w in set(options.what)]
    if options.groups not in meta.groups:
        raise UserError(f"--groups {options.groups}: meta.json has {sorted(meta.groups)}")
    groups = meta.groups[options.groups]
    k = meta.num_classes
    for s in (subject, compare):
        if s is not None and s.num_classes != k:
            raise UserError(
                f"{s.path} predicts {s.num_classes} classes but the dataset has {k}; "
                "analyse it on the dataset it was trained on"
            )
    tail = _tail_classes(groups)
    device = next(subject.probe.model.parameters()).device
    skipped: dict[str, str] = {}

    subjects = [subject] + ([compare] if compare is not None else [])
    stats = [ModelStats(s.probe, s.image_size, k, what, tail) for s in subjects]
    samples = SampleImages(tail, options.rollout_images) if "rollout" in what else None
    entropy = None
    if "entropy" in what:
        if teacher is None:
            skipped["entropy"] = "no teacher: the run's config has no teacher.path"
        else:
            entropy = TeacherEntropy(teacher)

    per_class = math.ceil(options.images / k) if options.images > 0 else None
    quota = ClassQuota(k, per_class)
    seen = 0
    bar = _progress(batches, total_batches, options.progress)
    for batch in bar:
        images, labels = _unpack(batch)
        keep = quota.select(labels)
        if bool(keep.any()):
            images = images[keep.to(images.device)].to(device, non_blocking=True)
            labels = labels[keep.to(labels.device)].to(device)
            for s, st in zip(subjects, stats):
                st.update(_adapt(images, subject, s), labels)
            if samples is not None:
                samples.update(images, labels)
            if entropy is not None:
                entropy.update("in_distribution", images)
            seen += int(labels.shape[0])
        if quota.full():
            break
    if hasattr(bar, "close"):
        bar.close()  # the pass may stop early, once every class has its images
    if seen == 0:
        raise UserError(f"the eval split of {meta.root or meta.dataset} yielded no images")
    if entropy is not None:
        for ood in ood_images or ():
            entropy.update("ood", ood.to(device)[: seen - entropy.count("ood")])
            if entropy.count("ood") >= seen:
                break

    summary: dict[str, Any] = {
        "subject": str(subject.path),
        "compare": str(compare.path) if compare is not None else None,
        "dataset": meta.dataset,
        "images": seen,
        "groups": options.groups,
        "outputs": {},
        "skipped": skipped,
    }
    writers = {
        "distance": lambda: _write_distance(out, subjects, stats),
        "rollout": lambda: _write_rollout(out, subject, samples, meta),
        "divergence": lambda: _write_divergence(out, stats[0], history, meta, groups),
        "rank": lambda: _write_rank(out, subjects, stats, options.rank_threshold),
        "entropy": lambda: _write_entropy(out, entropy, k),
        "per-class": lambda: _write_per_class(out, stats[0], meta, groups),
    }
    for name in what:
        if name in skipped:
            continue
        result = writers[name]()
        if isinstance(result, str):
            skipped[name] = result
        else:
            summary["outputs"][name] = result
    _write_json(out / SUMMARY_FILE, summary)
    return summary


def output_files(out: str | Path, summary: dict[str, Any]) -> list[Path]:
    """Every file the summary lists (plots and tables), then the summary itself."""
    out = Path(out)
    files = [out / f for entry in summary["outputs"].values() for f in entry["files"]]
    return [*files, out / SUMMARY_FILE]


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Scalars worth a metric in the tracked run (``analysis/...``)."""
    metrics: dict[str, float] = {}
    outs = summary["outputs"]
    if "divergence" in outs:
        for g, v in outs["divergence"]["per_group"].items():
            metrics[f"analysis/cls_dist_cosine_distance_{g}"] = v
    if "entropy" in outs:
        for kind, v in outs["entropy"]["mean"].items():
            metrics[f"analysis/teacher_entropy_{kind}"] = v
    if "per-class" in outs:
        for pred, by_group in outs["per-class"]["group_means"].items():
            for g, v in by_group.items():
                metrics[f"analysis/acc_{pred}_{g}"] = v
    return metrics


# --------------------------------------------------------------------------------------------
# Writers: each returns {"files": [...], "axes": [...], ...} or a reason string when skipped.


def _write_distance(out: Path, subjects: list[Subject], stats: list[ModelStats]) -> dict[str, Any]:
    distances = {
        s.name: st.distance.compute().numpy()  # type: ignore[union-attr]
        for s, st in zip(subjects, stats)
    }
    rows = [
        {"model": name, "block": b + 1, "head": h + 1, "distance_px": float(d[b, h])}
        for name, d in distances.items()
        for b in range(d.shape[0])
        for h in range(d.shape[1])
    ]
    _write_csv(out / "attention_distance.csv", rows)
    fig = plots.plot_attention_distance(distances, subjects[0].image_size)
    saved = plots.save_figure(fig, out / "attention_distance.png")
    info = {
        **saved,
        "files": ["attention_distance.png", "attention_distance.csv", "attention_distance.json"],
        "models": {
            s.name: {
                "image_size": s.image_size,
                "patch_size": st.distance.patch_size,  # type: ignore[union-attr]
                "images": st.distance.images,  # type: ignore[union-attr]
                "distance_px": distances[s.name].tolist(),
            }
            for s, st in zip(subjects, stats)
        },
    }
    _write_json(out / "attention_distance.json", info)
    return info


def _write_rollout(
    out: Path, subject: Subject, samples: SampleImages | None, meta: DatasetMeta
) -> dict[str, Any] | str:
    if samples is None or not samples.images:
        return "no eval image of a tail class was found"
    images = torch.stack(samples.images).to(next(subject.probe.model.parameters()).device)
    result = trace(subject.probe, images, attentions=True)
    assert result.attentions is not None
    prefix = subject.probe.num_prefix
    rollout = attention_rollout(result.attentions)
    tokens = ["CLS", "DIST"][: min(prefix, 2)]
    grids = {t: rollout_maps(rollout, i, prefix).cpu() for i, t in enumerate(tokens)}
    size = images.shape[-2:]
    maps = {
        t: F.interpolate(g[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
        for t, g in grids.items()
    }
    mean = torch.tensor(subject.mean).view(1, 3, 1, 1)
    std = torch.tensor(subject.std).view(1, 3, 1, 1)
    shown = (images.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    captions = [_class_caption(meta, c) for c in samples.labels]
    fig = plots.plot_rollout(shown, maps, captions)
    saved = plots.save_figure(fig, out / "rollout.png")
    info = {
        **saved,
        "files": ["rollout.png", "rollout.json"],
        "images": [
            {
                "label": c,
                "class_name": _class_name(meta, c),
                "train_count": int(meta.train_counts[c]),
                **{t: grids[t][i].tolist() for t in tokens},
            }
            for i, c in enumerate(samples.labels)
        ],
    }
    _write_json(out / "rollout.json", info)
    return info


def _write_divergence(
    out: Path,
    stats: ModelStats,
    history: Sequence[tuple[int, float]] | None,
    meta: DatasetMeta,
    groups: Sequence[int],
) -> dict[str, Any] | str:
    if not stats.has_dist or stats.divergence is None:
        return "the model has no DIST token"
    per_class = stats.divergence.compute()
    per_group = group_means(per_class, groups, GROUP_NAMES)
    rows = [
        {
            "class": c,
            "class_name": _class_name(meta, c),
            "group": GROUP_NAMES[groups[c]],
            "train_count": int(meta.train_counts[c]),
            "images": int(stats.divergence.count[c]),
            "cosine_distance": float(per_class[c]),
        }
        for c in range(meta.num_classes)
    ]
    _write_csv(out / "divergence.csv", rows)
    over_training = [(step, 1.0 - value) for step, value in history or ()]
    fig = plots.plot_divergence(over_training, per_group, COSINE_METRIC)
    saved = plots.save_figure(fig, out / "divergence.png")
    info = {
        **saved,
        "files": ["divergence.png", "divergence.csv", "divergence.json"],
        "metric": COSINE_METRIC,
        "history": [list(p) for p in over_training],
        "per_group": per_group,
    }
    _write_json(out / "divergence.json", info)
    return info


def _write_rank(
    out: Path, subjects: list[Subject], stats: list[ModelStats], threshold: float
) -> dict[str, Any] | str:
    ranks: dict[str, list[int]] = {}
    rows = []
    images = 0
    for s, st in zip(subjects, stats):
        for token, feats in st.rank.items():
            if feats.images == 0:
                continue
            label = f"{s.name} {token}"
            ranks[label] = feats.ranks(threshold)
            images = max(images, feats.images)
            rows += [
                {"model": s.name, "token": token, "block": b + 1, "rank": r, "images": feats.images}
                for b, r in enumerate(ranks[label])
            ]
    if not ranks:
        return "no eval image of a tail class was found"
    _write_csv(out / "rank.csv", rows)
    fig = plots.plot_rank(ranks, threshold, images)
    saved = plots.save_figure(fig, out / "rank.png")
    info = {
        **saved,
        "files": ["rank.png", "rank.csv", "rank.json"],
        "threshold": threshold,
        "ranks": ranks,
    }
    _write_json(out / "rank.json", info)
    return info


def _write_entropy(out: Path, entropy: TeacherEntropy | None, k: int) -> dict[str, Any]:
    assert entropy is not None
    values = entropy.compute()
    rows = [{"view": kind, "entropy": float(e)} for kind, v in values.items() for e in v]
    _write_csv(out / "entropy.csv", rows)
    fig = plots.plot_entropy(values, k)
    saved = plots.save_figure(fig, out / "entropy.png")
    info = {
        **saved,
        "files": ["entropy.png", "entropy.csv", "entropy.json"],
        "max_entropy": max_entropy(k),
        "images": {kind: len(v) for kind, v in values.items()},
        "mean": {kind: float(np.mean(v)) if len(v) else float("nan") for kind, v in values.items()},
    }
    _write_json(out / "entropy.json", info)
    return info


def _write_per_class(
    out: Path, stats: ModelStats, meta: DatasetMeta, groups: Sequence[int]
) -> dict[str, Any]:
    assert stats.accuracy is not None
    acc = stats.accuracy.compute()
    shown = {p: acc[p] for p in PREDICTORS} if stats.has_dist else {"cls": acc["cls"]}
    rows = [
        {
            "class": c,
            "class_name": _class_name(meta, c),
            "group": GROUP_NAMES[groups[c]],
            "train_count": int(meta.train_counts[c]),
            "eval_images": int(stats.accuracy.total[c]),
            **{f"acc_{p}": float(a[c]) for p, a in shown.items()},
        }
        for c in range(meta.num_classes)
    ]
    _write_csv(out / "per_class.csv", rows)
    bands = group_bands(meta.train_counts, groups)
    fig = plots.plot_per_class(meta.train_counts, shown, bands, GROUP_NAMES)
    saved = plots.save_figure(fig, out / "per_class.png")
    info = {
        **saved,
        "files": ["per_class.png", "per_class.csv", "per_class.json"],
        "group_means": {p: group_means(a, groups, GROUP_NAMES) for p, a in shown.items()},
        "overall": {p: float(np.nanmean(a)) for p, a in shown.items()},
    }
    _write_json(out / "per_class.json", info)
    return info


# --------------------------------------------------------------------------------------------
# Helpers


def _tail_classes(groups: Sequence[int]) -> list[int]:
    """Classes of the tail group; when the convention leaves it empty, the rarest group present."""
    for g in range(TAIL, -1, -1):
        chosen = [c for c, x in enumerate(groups) if x == g]
        if chosen:
            if g != TAIL:
                print(
                    "deitlt analyze: no tail class under this convention; using the "
                    f"{GROUP_NAMES[g]} classes for rank and rollout",
                    file=sys.stderr,
                )
            return chosen
    return []


def _unpack(batch: Any) -> tuple[Tensor, Tensor]:
    if hasattr(batch, "images") and hasattr(batch, "labels"):
        return batch.images, batch.labels
    images, labels = batch
    return images, labels


def _adapt(images: Tensor, source: Subject, target: Subject) -> Tensor:
    """``images`` normalised for ``source`` made ready for ``target`` (mean/std, input size)."""
    if source is target or (
        source.mean == target.mean
        and source.std == target.std
        and source.image_size == target.image_size
    ):
        return images
    dev = images.device
    m0, s0 = (torch.tensor(v, device=dev).view(1, 3, 1, 1) for v in (source.mean, source.std))
    m1, s1 = (torch.tensor(v, device=dev).view(1, 3, 1, 1) for v in (target.mean, target.std))
    x = images * s0 + m0
    if target.image_size != images.shape[-1]:
        x = F.interpolate(x, size=target.image_size, mode="bicubic", align_corners=False)
    return (x - m1) / s1


def _progress(batches: Iterable[Any], total: int | None, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return batches
    from tqdm import tqdm

    return tqdm(batches, total=total, desc="analyze", unit="batch", file=sys.stderr)


def _class_name(meta: DatasetMeta, c: int) -> str:
    return meta.class_names[c] if c < len(meta.class_names) else ""


def _class_caption(meta: DatasetMeta, c: int) -> str:
    name = _class_name(meta, c)
    label = f"{name!r}, class {c}" if name else f"class {c}"
    return f"{label} ({meta.train_counts[c]} train)"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    def clean(x: Any) -> Any:
        # JSON has no NaN: write null so that every reader can parse the file.
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean(data), indent=1) + "\n")
