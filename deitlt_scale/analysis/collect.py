"""One pass over eval batches that feeds every requested statistic of one model.

Images are chosen class-balanced (at most ``per_class`` per class, in loader order) so that a
capped pass still covers the tail whatever the shard order. Every model under comparison sees
exactly the same images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from deitlt_scale.analysis.accuracy import PerClassAccuracy
from deitlt_scale.analysis.attention import AttentionDistance, grid_side
from deitlt_scale.analysis.features import BlockFeatures, PerClassMean, cosine_distance
from deitlt_scale.analysis.probe import Probe, trace

WHAT = ("distance", "rollout", "divergence", "rank", "entropy", "per-class")
TOKEN_NAMES = ("CLS", "DIST")


class ClassQuota:
    """Keeps at most ``per_class`` images of each class (``None``: keep everything)."""

    def __init__(self, num_classes: int, per_class: int | None) -> None:
        self.per_class = per_class
        self.taken = np.zeros(num_classes, dtype=np.int64)

    def select(self, labels: Tensor) -> Tensor:
        """Boolean mask over ``labels`` of the images to keep; updates the quota.

        Negative labels (the eval loader's padding of the last batch) are never kept.
        """
        y = labels.detach().cpu().numpy().astype(np.int64)
        keep = np.zeros(len(y), dtype=bool)
        for i, c in enumerate(y):
            if c < 0:
                continue
            if self.per_class is None or self.taken[c] < self.per_class:
                keep[i] = True
                self.taken[c] += 1
        return torch.from_numpy(keep)

    def full(self) -> bool:
        return self.per_class is not None and bool(np.all(self.taken >= self.per_class))


class SampleImages:
    """Up to ``count`` images of the chosen classes, spread over as many classes as possible."""

    def __init__(self, classes: Sequence[int], count: int) -> None:
        self.classes = set(int(c) for c in classes)
        self.count = count
        self.cap = math.ceil(count / max(len(self.classes), 1))  # images per class
        self.per_class: dict[int, int] = {}
        self.images: list[Tensor] = []
        self.labels: list[int] = []

    def update(self, images: Tensor, labels: Tensor) -> None:
        for img, label in zip(images, labels.tolist()):
            if len(self.images) >= self.count:
                return
            if label in self.classes and self.per_class.get(label, 0) < self.cap:
                self.per_class[label] = self.per_class.get(label, 0) + 1
                self.images.append(img.detach().cpu())
                self.labels.append(int(label))


class ModelStats:
    """Accumulators of one model for the analyses in ``what``."""

    def __init__(
        self,
        probe: Probe,
        image_size: int,
        num_classes: int,
        what: Sequence[str],
        tail_classes: Sequence[int],
    ) -> None:
        self.probe = probe
        self.image_size = image_size
        self.what = set(what)
        self.tail_classes = list(tail_classes)
        self.accuracy = PerClassAccuracy(num_classes) if "per-class" in self.what else None
        self.divergence = PerClassMean(num_classes) if "divergence" in self.what else None
        self.distance: AttentionDistance | None = None
        self.rank: dict[str, BlockFeatures] = {}
        self.has_dist = False
        self._started = False

    def _start(self, num_prefix: int, num_tokens: int) -> None:
        """Set up what depends on the token layout, known from the first batch."""
        self.has_dist = num_prefix >= 2
        if "distance" in self.what:
            patch = self.image_size / grid_side(num_tokens, num_prefix)
            self.distance = AttentionDistance(num_prefix, patch)
        if "rank" in self.what:
            for token in range(min(num_prefix, 2)):
                self.rank[TOKEN_NAMES[token]] = BlockFeatures(token, self.tail_classes)
        self._started = True

    def update(self, images: Tensor, labels: Tensor) -> None:
        need_attn = "distance" in self.what
        need_tokens = "rank" in self.what
        out = trace(self.probe, images, attentions=need_attn, tokens=need_tokens)
        if not self._started:
            if out.attentions is not None:
                num_tokens = out.attentions[0].shape[-1]
            elif out.tokens is not None:
                num_tokens = out.tokens[0].shape[1]
            else:
                num_tokens = 0
            self._start(self.probe.num_prefix, num_tokens)
        if self.accuracy is not None:
            self.accuracy.update(out.cls_logits, out.dist_logits, labels)
        if self.divergence is not None and out.dist_feat is not None:
            self.divergence.update(cosine_distance(out.cls_feat, out.dist_feat), labels)
        if self.distance is not None and out.attentions is not None:
            self.distance.update(out.attentions)
        if out.tokens is not None:
            for feats in self.rank.values():
                feats.update(out.tokens, labels)
