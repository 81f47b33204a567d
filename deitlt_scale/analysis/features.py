"""Feature diagnostics: PCA rank of token features and the CLS/DIST cosine distance."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

RANK_VARIANCE = 0.99  # rank = principal components needed to explain this share of the variance


def explained_variance_ratio(features: Tensor | np.ndarray) -> np.ndarray:
    """Share of the total variance carried by each principal component, largest first.

    ``features`` is ``(N, D)`` (one row per image). Rows are centred first, as PCA does. An
    all-constant matrix has no variance and gives an empty array.
    """
    x = torch.as_tensor(features).double()
    if x.dim() != 2:
        raise ValueError(f"features must be (N, D), got {tuple(x.shape)}")
    x = x - x.mean(dim=0, keepdim=True)
    var = torch.linalg.svdvals(x).pow(2)
    total = var.sum()
    if total <= 0:
        return np.zeros(0)
    return (var / total).cpu().numpy()


def pca_rank(features: Tensor | np.ndarray, threshold: float = RANK_VARIANCE) -> int:
    """Number of principal components that together explain ``threshold`` of the variance.

    A matrix whose centred rows span ``r`` dimensions with comparable spread has rank ``r``;
    at most ``min(N - 1, D)`` since centring removes one degree of freedom.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    ratios = explained_variance_ratio(features)
    if ratios.size == 0:
        return 0
    cumulative = np.cumsum(ratios)
    # The small tolerance keeps threshold=1 from missing by a rounding error.
    return int(np.searchsorted(cumulative, threshold - 1e-9) + 1)


def cosine_distance(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-row ``1 - cos(a_i, b_i)`` of two ``(N, D)`` matrices, in ``[0, 2]``."""
    return 1.0 - torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=eps)


def group_means(
    values_by_class: Sequence[float], groups: Sequence[int], names: Sequence[str]
) -> dict[str, float]:
    """Unweighted mean over the classes of each group (NaN classes and empty groups skipped).

    ``groups[c]`` is the group index of class ``c`` (0 head, 1 mid, 2 tail); the result maps each
    of ``names`` to its mean, NaN when the group has no class with a value.
    """
    values = np.asarray(values_by_class, dtype=np.float64)
    group_of = np.asarray(groups)
    out: dict[str, float] = {}
    for g, name in enumerate(names):
        chosen = values[(group_of == g) & ~np.isnan(values)]
        out[name] = float(chosen.mean()) if chosen.size else float("nan")
    return out


class PerClassMean:
    """Running per-class mean of a per-image value (e.g. the CLS/DIST cosine distance)."""

    def __init__(self, num_classes: int) -> None:
        self.sum = np.zeros(num_classes, dtype=np.float64)
        self.count = np.zeros(num_classes, dtype=np.int64)

    def update(self, values: Tensor, labels: Tensor) -> None:
        v = values.detach().double().cpu().numpy()
        y = labels.detach().cpu().numpy().astype(np.int64)
        np.add.at(self.sum, y, v)
        np.add.at(self.count, y, 1)

    def compute(self) -> np.ndarray:
        """Per-class mean, NaN for classes without images."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.sum / np.maximum(self.count, 1), np.nan)


class BlockFeatures:
    """Collects one token's features per block for the images of chosen classes."""

    def __init__(self, token: int, classes: Sequence[int]) -> None:
        self.token = token
        self.classes = torch.as_tensor(sorted(set(classes)), dtype=torch.long)
        self._rows: list[list[Tensor]] = []  # per block, list of (n, D) float32 on CPU

    def update(self, tokens: list[Tensor], labels: Tensor) -> None:
        """``tokens[b]`` is block ``b``'s ``(B, T, D)`` output; ``labels`` are ``(B,)``."""
        keep = torch.isin(labels.cpu(), self.classes)
        if not bool(keep.any()):
            return
        if not self._rows:
            self._rows = [[] for _ in tokens]
        for rows, block in zip(self._rows, tokens):
            rows.append(block[keep.to(block.device), self.token].detach().float().cpu())

    @property
    def images(self) -> int:
        return sum(r.shape[0] for r in self._rows[0]) if self._rows else 0

    def ranks(self, threshold: float = RANK_VARIANCE) -> list[int]:
        """PCA rank per block (see :func:`pca_rank`); empty when no image was collected."""
        return [pca_rank(torch.cat(rows), threshold) for rows in self._rows]
