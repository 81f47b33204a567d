"""Teacher output entropy on in-distribution vs out-of-distribution (OOD) images (paper Fig. 3).

In-distribution: eval images under the eval transform (resize, centre crop). OOD: training images
as the teacher sees them during distillation, i.e. the train loader's strong augmentation
(random-resized crop, flip, RandAugment, random erasing; METHOD.md 4.2) followed by the trainer's
Mixup/CutMix (:class:`deitlt_scale.data.mixing.Mixer`, METHOD.md 4.3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

VIEWS = ("in_distribution", "ood")


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy of ``softmax(logits)`` per row, in nats, in ``[0, log K]``."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).float()


def max_entropy(num_classes: int) -> float:
    """Entropy of the uniform distribution over ``num_classes`` classes, in nats."""
    return math.log(num_classes)


def mixed(batches: Iterable[Any], mixer: Any, seed: int) -> Iterator[Tensor]:
    """The images of ``batches`` mixed as the trainer mixes them (one draw per batch).

    ``mixer`` is a :class:`~deitlt_scale.data.mixing.Mixer`; batch ``i`` uses seed ``seed + i``.
    A batch of odd size loses its last image (mixing pairs image ``j`` with ``B - 1 - j``).
    """
    for i, batch in enumerate(batches):
        images, labels = (batch.images, batch.labels) if hasattr(batch, "images") else batch
        even = images.shape[0] - images.shape[0] % 2
        if even == 0:
            continue
        if not mixer.enabled:
            yield images[:even]
            continue
        out, _ = mixer(images[:even], labels[:even], seed + i)
        yield out


class TeacherEntropy:
    """Per-image teacher entropies, collected separately for each kind of view."""

    def __init__(self, teacher: Callable[[Tensor], Tensor]) -> None:
        self.teacher = teacher
        self.values: dict[str, list[Tensor]] = {view: [] for view in VIEWS}

    @torch.no_grad()
    def update(self, view: str, images: Tensor) -> None:
        self.values[view].append(entropy(self.teacher(images)).cpu())

    def count(self, view: str) -> int:
        return sum(v.shape[0] for v in self.values[view])

    def compute(self) -> dict[str, np.ndarray]:
        """Per-image entropies (nats) for each kind of view."""
        return {
            view: torch.cat(v).numpy() if v else np.zeros(0, dtype=np.float32)
            for view, v in self.values.items()
        }
