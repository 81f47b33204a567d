"""Long-tail arithmetic shared by preparation, training and evaluation. Pure functions only.

Label spaces: *original* labels are those of the raw dataset; *model* labels are ranks by
descending training frequency (0 = most frequent), so that index ranges are frequency groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HEAD, MID, TAIL = 0, 1, 2
GROUP_NAMES = ("head", "mid", "tail")

# The paper's class-index boundaries [b1, b2] on frequency-sorted ids (METHOD.md 1.5):
# head = [0, b1), mid = [b1, b2), tail = [b2, K).
PAPER_BOUNDARIES: dict[str, tuple[int, int]] = {
    "cifar10-lt": (3, 7),
    "cifar100-lt": (36, 71),
    "imagenet-lt": (390, 835),
    "inat2018": (842, 4543),
    "digits-lt": (3, 7),  # ten classes, as CIFAR-10-LT
}

# The standard count thresholds: many-shot > 100, medium 20..100, few-shot < 20 training images.
MANY_SHOT_MIN = 101
FEW_SHOT_MAX = 19


def lt_counts(n_max: int, num_classes: int, imbalance: float, profile: str = "exp") -> list[int]:
    """Per-class image counts of a long-tailed split (class 0 largest), METHOD.md 1.1.

    ``imbalance`` is rho = N_max / N_min (>= 1; 100 means IF=100). ``exp`` gives
    ``floor(n_max * (1/rho) ** (c / (K - 1)))`` (truncation, as the reference); ``step`` gives
    ``n_max`` to the first K/2 classes and ``floor(n_max / rho)`` to the rest.
    """
    if imbalance < 1:
        raise ValueError(f"imbalance must be N_max/N_min >= 1 (e.g. 100), got {imbalance}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    factor = 1.0 / imbalance
    if profile == "exp":
        if num_classes == 1:
            return [int(n_max)]
        return [int(n_max * factor ** (c / (num_classes - 1.0))) for c in range(num_classes)]
    if profile == "step":
        half = num_classes // 2
        return [int(n_max)] * half + [int(n_max * factor)] * (num_classes - half)
    raise ValueError(f"unknown imbalance profile {profile!r}; use exp or step")


def class_map_by_frequency(counts_by_original: Sequence[int]) -> list[int]:
    """``class_map[original] = model label``: rank by descending count, ties by ascending label.

    The tie-break is stable and documented, unlike the reference's ``np.argsort(-counts)``
    whose tie order depends on the NumPy version (METHOD.md 1.4).
    """
    counts = np.asarray(counts_by_original, dtype=np.int64)
    order = np.argsort(-counts, kind="stable")
    class_map = np.empty_like(order)
    class_map[order] = np.arange(len(order))
    return class_map.tolist()


def groups_by_index(num_classes: int, boundaries: tuple[int, int]) -> list[int]:
    """Group per model label from index boundaries ``[b1, b2]`` (the paper's convention)."""
    b1, b2 = boundaries
    if not 0 <= b1 <= b2 <= num_classes:
        raise ValueError(f"boundaries {boundaries} must satisfy 0 <= b1 <= b2 <= {num_classes}")
    return [HEAD if c < b1 else MID if c < b2 else TAIL for c in range(num_classes)]


def groups_by_count(train_counts: Sequence[int]) -> list[int]:
    """Group per class from training counts: > 100 head, 20..100 mid, < 20 tail."""
    return [
        HEAD if n >= MANY_SHOT_MIN else TAIL if n <= FEW_SHOT_MAX else MID for n in train_counts
    ]


def paper_boundaries(dataset: str, train_counts: Sequence[int]) -> tuple[int, int]:
    """The paper's index boundaries for a known dataset; otherwise the boundaries that the
    count thresholds give on the frequency-sorted counts (so both conventions coincide)."""
    if dataset in PAPER_BOUNDARIES:
        return PAPER_BOUNDARIES[dataset]
    counts = list(train_counts)
    b1 = sum(1 for n in counts if n >= MANY_SHOT_MIN)
    b2 = b1 + sum(1 for n in counts if FEW_SHOT_MAX < n < MANY_SHOT_MIN)
    return b1, b2


def drw_weights(train_counts: Sequence[int], beta: float = 0.9999) -> np.ndarray:
    """Class-balanced weights from the effective number of samples (Cui et al.), METHOD.md 5.2.

    ``w_c = (1 - beta) / (1 - beta ** n_c)``, normalised so that ``sum(w) = K`` (mean 1).
    """
    counts = np.asarray(train_counts, dtype=np.float64)
    if np.any(counts <= 0):
        raise ValueError("every class needs at least one training image for DRW weights")
    effective = 1.0 - np.power(beta, counts)
    weights = (1.0 - beta) / effective
    return weights / weights.sum() * len(counts)
