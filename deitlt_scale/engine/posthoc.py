"""Post-hoc evaluation of collected logits: logit adjustment, head fusion and calibration.

Everything here is a pure function of per-sample logits ``(N, K)`` and labels ``(N,)`` on the
CPU (see :func:`collect_logits`); accuracies are fractions in [0, 1]. Additions beyond the
DeiT-LT paper (docs/method.md lists them with their references):

* **logit adjustment** (Menon et al., ICLR 2021, post-hoc form): ``z - tau * log pi`` with
  ``pi`` the training class prior; ``tau = 1`` is the Bayes-optimal correction of a
  prior-matching classifier for the balanced error.
* **head fusion**: ``w * z_cls + (1 - w) * z_dist``; ``w = 0.5`` is the paper's mean head.
* **calibration**: expected calibration error over equal-width confidence bins (Guo et al.,
  ICML 2017; 15 bins), negative log-likelihood, and the bins of a reliability diagram.

A hyper-parameter (tau, w) is *chosen* only on a held-out validation split, by
:func:`choose`; the test split is only ever reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from deitlt_scale.data.longtail import GROUP_NAMES
from deitlt_scale.engine.evaluate import ClassCounts

ECE_BINS = 15
DEFAULT_TAUS = tuple(round(0.1 * i, 1) for i in range(21))  # 0.0, 0.1, ..., 2.0
DEFAULT_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))  # 0.0, 0.1, ..., 1.0
SELECTION_METRIC = "mean_class"  # balanced accuracy: the long-tail target, on any val split


@dataclass
class Logits:
    """Per-sample logits of every head on one split, and the labels (padding removed)."""

    heads: dict[str, Tensor]  # head -> (N, K) float32
    labels: Tensor  # (N,) int64 model labels

    @property
    def num_samples(self) -> int:
        return int(self.labels.numel())


@torch.no_grad()
def collect_logits(predict: Callable[[Tensor], Mapping[str, Tensor]], batches: Iterable) -> Logits:
    """Run ``predict`` (the task's predict path, as evaluation runs it) over ``batches``.

    With several ranks every rank must call it: the per-rank tensors (equal shapes, since the
    eval loader pads every rank to the same number of batches) are all-gathered, then the
    padding (label -1) is dropped, so every rank returns the whole split.
    """
    parts: dict[str, list[Tensor]] = {}
    labels: list[Tensor] = []
    for batch in batches:
        for head, logits in predict(batch.images).items():
            parts.setdefault(head, []).append(logits.float())
        labels.append(batch.labels)
    return _finish({h: torch.cat(v) for h, v in parts.items()}, torch.cat(labels))


def _finish(heads: dict[str, Tensor], all_labels: Tensor) -> Logits:
    """Gather over ranks (a collective where the world has several), drop padding, to CPU."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        heads = {h: _gather(v) for h, v in sorted(heads.items())}
        all_labels = _gather(all_labels)
    keep = all_labels >= 0
    return Logits(
        {h: v[keep].cpu() for h, v in heads.items()}, all_labels[keep].cpu().to(torch.int64)
    )


def _gather(tensor: Tensor) -> Tensor:
    world = torch.distributed.get_world_size()
    out = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(out, tensor.contiguous())
    return torch.cat(out)


class LogitRecorder:
    """Keeps the per-sample logits of an evaluation pass (so the standard table and the post-hoc
    analyses come from one pass over the test split) and collects the val split's logits.

    :meth:`wrap` returns a predictor and batches to hand to ``evaluate_run`` in place of the
    originals; afterwards :meth:`logits` gathers what they saw.
    """

    def __init__(self) -> None:
        self._parts: dict[str, list[Tensor]] = {}
        self._labels: list[Tensor] = []
        self.val: Logits | None = None
        self.meta = None

    def wrap(self, predict: Callable[[Tensor], Mapping[str, Tensor]], batches: Iterable):
        def recording_predict(images: Tensor) -> Mapping[str, Tensor]:
            out = predict(images)
            for head, logits in out.items():
                self._parts.setdefault(head, []).append(logits.detach().float())
            return out

        def recording_batches():
            for batch in batches:
                self._labels.append(batch.labels)
                yield batch

        return recording_predict, recording_batches()

    def logits(self) -> Logits:
        heads = {h: torch.cat(v) for h, v in self._parts.items()}
        return _finish(heads, torch.cat(self._labels))

    def collect_val(self, predict, cfg, meta, world) -> None:
        """The val split's logits through ``predict``, when ``meta`` lists a val split."""
        from deitlt_scale.data.loader import EvalLoader

        self.meta = meta
        if "val" not in meta.splits:
            return
        loader = EvalLoader(
            meta, cfg.data, cfg.eval.micro_batch, world.rank, world.world_size, world.device,
            split="val",
        )  # fmt: skip
        self.val = collect_logits(predict, loader)


# --------------------------------------------------------------------------------------------
# Accuracy by group


def log_prior(train_counts: Sequence[int]) -> Tensor:
    """``log(n_c / N)`` per model label, float64; every count must be positive."""
    counts = torch.as_tensor(list(train_counts), dtype=torch.float64)
    if (counts <= 0).any():
        raise ValueError("every class needs a positive training count for its log prior")
    return torch.log(counts / counts.sum())


def group_accuracy(logits: Tensor, labels: Tensor, groups: Sequence[int]) -> dict[str, float]:
    """Overall, mean per-class, Head/Mid/Tail (mean per-class accuracy within each group of
    ``groups``: 0 head, 1 mid, 2 tail per model label) of one head's logits.

    Counted by :class:`~deitlt_scale.engine.evaluate.ClassCounts`, the project's one per-class
    accuracy; a class without samples is left out of its group (NaN for an empty group).
    """
    k = logits.shape[1]
    counts = ClassCounts(k)
    counts.add({"h": logits}, labels)
    acc = counts.accuracy()["h"]
    totals = counts.totals
    out = {
        "overall": float(counts.correct["h"].sum() / totals.sum().clamp(min=1)),
        "mean_class": float(acc.nanmean()),
    }
    group_of = torch.as_tensor(list(groups))
    for g, name in enumerate(GROUP_NAMES):
        members = acc[(group_of == g) & (totals > 0)]
        out[name] = float(members.mean()) if len(members) else math.nan
    return out


# --------------------------------------------------------------------------------------------
# Logit adjustment and fusion


def adjust(logits: Tensor, prior: Tensor, tau: float) -> Tensor:
    """Post-hoc logit adjustment: ``logits - tau * log_prior`` (``prior`` from :func:`log_prior`)."""
    return logits - tau * prior.to(logits.dtype)


def fuse(cls_logits: Tensor, dist_logits: Tensor, weight: float) -> Tensor:
    """``weight * cls + (1 - weight) * dist``; ``weight = 0.5`` is the paper's mean head."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
    return weight * cls_logits + (1.0 - weight) * dist_logits


def sweep_tau(
    logits: Tensor,
    labels: Tensor,
    prior: Tensor,
    groups: Sequence[int],
    taus: Sequence[float] = DEFAULT_TAUS,
) -> list[dict[str, float]]:
    """One row per tau: ``{"tau", "overall", "mean_class", "head", "mid", "tail"}``."""
    logits = logits.double()
    return [
        {"tau": float(t), **group_accuracy(adjust(logits, prior, t), labels, groups)} for t in taus
    ]


def sweep_fusion(
    cls_logits: Tensor,
    dist_logits: Tensor,
    labels: Tensor,
    groups: Sequence[int],
    weights: Sequence[float] = DEFAULT_WEIGHTS,
) -> list[dict[str, float]]:
    """One row per weight: ``{"weight", "overall", "mean_class", "head", "mid", "tail"}``."""
    cls_logits, dist_logits = cls_logits.double(), dist_logits.double()
    return [
        {"weight": float(w), **group_accuracy(fuse(cls_logits, dist_logits, w), labels, groups)}
        for w in weights
    ]


def choose(
    rows: Sequence[Mapping[str, float]],
    key: str,
    metric: str = SELECTION_METRIC,
    prefer: float = 0.0,
) -> float:
    """The ``key`` value (tau or weight) of the row with the highest ``metric``; among equal
    rows the one closest to ``prefer`` (0 for tau: no adjustment; 0.5 for the fusion weight:
    the paper's mean), so a flat sweep leaves the default in place."""
    if not rows:
        raise ValueError("nothing to choose from: the sweep is empty")
    best = max(rows, key=lambda r: (r[metric], -abs(r[key] - prefer)))
    return float(best[key])


# --------------------------------------------------------------------------------------------
# Calibration


@dataclass
class Reliability:
    """Equal-width confidence bins over (0, 1]: per bin the sample count, the mean confidence
    and the accuracy (NaN where empty)."""

    edges: list[float]  # bins + 1 edges, 0 to 1
    counts: list[int]
    confidence: list[float]
    accuracy: list[float]


def reliability(logits: Tensor, labels: Tensor, bins: int = ECE_BINS) -> Reliability:
    """Bin each sample by its top-1 softmax probability; bin ``b`` holds ``(b/B, (b+1)/B]``."""
    probs = F.softmax(logits.double(), dim=1)
    confidence, predicted = probs.max(dim=1)
    hit = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = (torch.bucketize(confidence, edges[1:-1], right=False)).clamp(0, bins - 1)
    counts = torch.bincount(index, minlength=bins)
    conf_sum = torch.bincount(index, weights=confidence, minlength=bins)
    hit_sum = torch.bincount(index, weights=hit, minlength=bins)
    safe = counts.clamp(min=1).double()
    empty = counts == 0
    return Reliability(
        edges=edges.tolist(),
        counts=counts.tolist(),
        confidence=torch.where(empty, torch.nan, conf_sum / safe).tolist(),
        accuracy=torch.where(empty, torch.nan, hit_sum / safe).tolist(),
    )


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = ECE_BINS) -> float:
    """``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` over equal-width bins (a fraction)."""
    rel = reliability(logits, labels, bins)
    n = sum(rel.counts)
    if n == 0:
        return math.nan
    return sum(
        c / n * abs(a - p) for c, a, p in zip(rel.counts, rel.accuracy, rel.confidence) if c > 0
    )


def nll(logits: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood of the labels under ``softmax(logits)``, in nats."""
    return float(F.cross_entropy(logits.double(), labels))


def calibration(logits: Tensor, labels: Tensor, bins: int = ECE_BINS) -> dict[str, float]:
    """``{"ece", "nll", "accuracy", "confidence"}`` of one head (mean top-1 confidence)."""
    probs = F.softmax(logits.double(), dim=1)
    return {
        "ece": expected_calibration_error(logits, labels, bins),
        "nll": nll(logits, labels),
        "accuracy": float((probs.argmax(dim=1) == labels).double().mean()),
        "confidence": float(probs.max(dim=1).values.mean()),
    }
