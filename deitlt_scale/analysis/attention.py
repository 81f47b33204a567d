"""Attention diagnostics on softmax attention maps: mean attention distance and attention rollout.

Both take the per-block maps a student returns from its explicit-softmax path, each of shape
``(B, heads, T, T)`` with rows (queries) summing to 1 and tokens ordered ``[prefix..., patches...]``
(``prefix`` = 1 for a plain ViT's CLS, 2 for DeiT's CLS and DIST). Patches are in row-major order
over a square ``grid x grid`` layout.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def grid_side(num_tokens: int, num_prefix: int) -> int:
    """Side of the square patch grid behind ``num_tokens`` tokens (prefix tokens included)."""
    patches = num_tokens - num_prefix
    side = math.isqrt(max(patches, 0))
    if patches <= 0 or side * side != patches:
        raise ValueError(
            f"{num_tokens} tokens minus {num_prefix} prefix tokens is not a square patch grid"
        )
    return side


def patch_distances(side: int, patch_size: float = 1.0) -> Tensor:
    """``(N, N)`` Euclidean distance between patch centres, in pixels (``N = side**2``).

    Patch ``i`` sits at row ``i // side``, column ``i % side``; centres are ``patch_size`` apart,
    so the distance between neighbours is ``patch_size`` pixels.
    """
    idx = torch.arange(side * side, dtype=torch.float64)
    coords = torch.stack((idx // side, idx % side), dim=1) * float(patch_size)
    return torch.cdist(coords, coords)


def mean_attention_distance(attn: Tensor, num_prefix: int, patch_size: float) -> Tensor:
    """Attention-weighted mean distance per image and head, ``(B, heads)``, in pixels.

    Raghu et al.'s measure restricted to patch tokens: for every patch query, the attention it
    puts on patch keys is renormalised to sum to 1 (the prefix tokens have no position), the
    distances to the key centres are averaged with those weights, and the result is averaged over
    the query patches. Identity attention gives 0; uniform attention gives the mean distance
    between two patch centres drawn independently from the grid.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention must be (B, heads, T, T), got {tuple(attn.shape)}")
    side = grid_side(attn.shape[-1], num_prefix)
    patches = attn[:, :, num_prefix:, num_prefix:].double()
    # A query that puts all of its mass on prefix tokens has no spatial extent: it counts as 0.
    weights = patches / patches.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    dist = patch_distances(side, patch_size).to(weights.device)
    per_query = (weights * dist).sum(dim=-1)  # (B, heads, N)
    return per_query.mean(dim=-1).float()


class AttentionDistance:
    """Running mean of :func:`mean_attention_distance` over images, per block and head."""

    def __init__(self, num_prefix: int, patch_size: float) -> None:
        self.num_prefix = num_prefix
        self.patch_size = float(patch_size)
        self._sum: Tensor | None = None  # (blocks, heads), float64
        self.images = 0

    def update(self, attentions: list[Tensor]) -> None:
        """Add one batch: ``attentions[b]`` is block ``b``'s ``(B, heads, T, T)`` map."""
        per_block = torch.stack(
            [
                mean_attention_distance(a, self.num_prefix, self.patch_size).double().sum(0)
                for a in attentions
            ]
        ).cpu()
        self._sum = per_block if self._sum is None else self._sum + per_block
        self.images += attentions[0].shape[0]

    def compute(self) -> Tensor:
        """``(blocks, heads)`` mean distance in pixels over every image seen."""
        if self._sum is None or self.images == 0:
            raise ValueError("no attention maps were added")
        return (self._sum / self.images).float()


def attention_rollout(attentions: list[Tensor]) -> Tensor:
    """Abnar & Zuidema's rollout, ``(B, T, T)``: how much each token's output draws on each input.

    Per block: average the heads, add the identity (the residual stream), renormalise the rows to
    sum to 1, then compose the blocks in order, ``R = A_L @ ... @ A_2 @ A_1``. Rows of the result
    sum to 1; identity attention everywhere gives the identity.
    """
    if not attentions:
        raise ValueError("attention rollout needs at least one block")
    rollout: Tensor | None = None
    for attn in attentions:
        fused = attn.double().mean(dim=1)
        eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        fused = fused + eye
        fused = fused / fused.sum(dim=-1, keepdim=True)
        rollout = fused if rollout is None else fused @ rollout
    assert rollout is not None
    return rollout.float()


def rollout_maps(rollout: Tensor, token: int, num_prefix: int) -> Tensor:
    """Row ``token`` of a rollout over the patch columns, as ``(B, side, side)`` grids.

    ``token`` is 0 for CLS and 1 for DIST. The values are the shares of that token's output drawn
    from each patch (they sum to at most 1; the rest comes from the prefix tokens).
    """
    if not 0 <= token < num_prefix:
        raise ValueError(f"token {token} is not one of the {num_prefix} prefix tokens")
    side = grid_side(rollout.shape[-1], num_prefix)
    row = rollout[:, token, num_prefix:]
    return row.reshape(row.shape[0], side, side)
