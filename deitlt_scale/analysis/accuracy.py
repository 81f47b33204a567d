"""Per-class accuracy of the CLS, DIST and averaged predictors, against training counts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from deitlt_scale.engine.evaluate import ClassCounts
from deitlt_scale.models.student import StudentOutput, head_logits

PREDICTORS = ("cls", "dist", "mean")  # "mean" predicts from (cls_logits + dist_logits) / 2


class PerClassAccuracy:
    """Per-class top-1 accuracy of the CLS, DIST and averaged predictors (the trainer's
    :class:`~deitlt_scale.engine.evaluate.ClassCounts`, read on the host).

    Accuracy of class ``c`` = correct predictions on eval images of class ``c`` / eval images of
    class ``c``, so group means are unweighted means over classes, as the paper reports them.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.counts = ClassCounts(num_classes)

    @property
    def total(self) -> np.ndarray:
        return self.counts.totals.long().numpy()

    def update(self, cls_logits: Tensor, dist_logits: Tensor | None, labels: Tensor) -> None:
        """Add one batch; a model without a DIST head predicts with CLS for all three."""
        y = labels.detach().cpu().long()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got {y.min()}..{y.max()}")
        dist = cls_logits if dist_logits is None else dist_logits
        logits = head_logits(StudentOutput(cls_logits, dist, cls_logits, cls_logits))
        self.counts.add({k: v.detach().cpu() for k, v in logits.items()}, y)

    def compute(self) -> dict[str, np.ndarray]:
        """Per-class accuracy in ``[0, 1]`` for each predictor, NaN for classes without images."""
        return {name: acc.numpy() for name, acc in self.counts.accuracy().items()}


def group_bands(
    train_counts: Sequence[int], groups: Sequence[int], num_groups: int = 3
) -> list[tuple[float, float] | None]:
    """Training-count interval ``(lo, hi)`` covered by each group, for shading a log-count axis.

    Neighbouring groups meet at the geometric mean of their closest counts so that bands never
    overlap on a log scale; a group without classes gets ``None``.
    """
    counts = np.asarray(train_counts, dtype=np.float64)
    group_of = np.asarray(groups)
    spans: list[tuple[float, float] | None] = []
    for g in range(num_groups):
        members = counts[group_of == g]
        spans.append((float(members.min()), float(members.max())) if members.size else None)
    bands: list[tuple[float, float] | None] = [None] * num_groups
    present = [g for g in range(num_groups) if spans[g] is not None]
    for i, g in enumerate(present):
        lo, hi = spans[g]  # type: ignore[misc]
        # Groups run from many (head) to few (tail) images: the next group sits below.
        if i + 1 < len(present):
            below = spans[present[i + 1]][1]  # type: ignore[index]
            lo = float(np.sqrt(max(below, 0.5) * max(lo, 0.5)))
        else:
            lo = max(lo / 1.5, 0.5)
        if i > 0:
            above = spans[present[i - 1]][0]  # type: ignore[index]
            hi = float(np.sqrt(max(above, 0.5) * max(hi, 0.5)))
        else:
            hi = hi * 1.5
        bands[g] = (lo, hi)
    return bands
