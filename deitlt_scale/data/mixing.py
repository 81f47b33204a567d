"""Mixup / CutMix in batch mode on device tensors, as timm ``Mixup`` (METHOD.md 4.3).

Per micro-batch: with probability ``prob`` the batch is mixed; CutMix is chosen with probability
``switch_prob`` (when both alphas are positive), lambda ~ Beta(alpha, alpha); sample ``i`` is mixed
with sample ``B-1-i``; CutMix pastes one box for the whole batch and lambda is corrected to the
pasted area; targets are ``lam * smooth(y) + (1 - lam) * smooth(flip(y))`` with label smoothing
(off = s/K, on = 1 - s + s/K).

Stateless: every draw comes from a numpy Generator seeded with the ``seed`` argument, so a
resumed run mixes exactly as an uninterrupted one. Only host scalars are drawn (lambda, mode,
box), so nothing waits on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from deitlt_scale.config import MixupConfig


@dataclass(frozen=True)
class MixParams:
    """One batch's draw. ``box`` is (y0, y1, x0, x1) in pixels for CutMix, else None."""

    lam: float
    box: tuple[int, int, int, int] | None


def cutmix_box(
    rng: np.random.Generator, height: int, width: int, lam: float
) -> tuple[tuple[int, int, int, int], float]:
    """timm ``rand_bbox`` + ``correct_lam``: a box of side ``sqrt(1 - lam)`` of the image, centred
    uniformly, clipped; returns the box and lambda corrected to ``1 - box area / image area``."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(rng.integers(0, height))
    cx = int(rng.integers(0, width))
    y0 = min(max(cy - cut_h // 2, 0), height)
    y1 = min(max(cy + (cut_h + 1) // 2, 0), height)
    x0 = min(max(cx - cut_w // 2, 0), width)
    x1 = min(max(cx + (cut_w + 1) // 2, 0), width)
    corrected = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    return (y0, y1, x0, x1), corrected


class Mixer:
    """``Mixer(cfg, K)(images, labels, seed) -> (mixed images, soft targets (B, K) float32)``."""

    def __init__(self, cfg: MixupConfig, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.enabled = cfg.prob > 0 and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0)

    def draw(self, seed: int, height: int, width: int) -> MixParams:
        """The batch's lambda and CutMix box, from ``seed`` alone (timm's draw order)."""
        cfg = self.cfg
        rng = np.random.default_rng(seed)
        if not self.enabled or rng.random() >= cfg.prob:
            return MixParams(1.0, None)
        if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < cfg.switch_prob)
        else:
            use_cutmix = cfg.cutmix_alpha > 0
        alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if not use_cutmix:
            return MixParams(lam, None)
        box, lam = cutmix_box(rng, height, width, lam)
        return MixParams(lam, box)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = images.shape[0]
        if batch % 2:
            raise ValueError(f"mixup/cutmix needs an even batch, got {batch}")
        params = self.draw(seed, images.shape[-2], images.shape[-1])
        flipped = images.flip(0)
        if params.box is not None:
            y0, y1, x0, x1 = params.box
            images = images.clone()
            images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        elif params.lam < 1.0:
            images = torch.lerp(flipped, images, params.lam)  # lam * x + (1 - lam) * flip(x)
        targets = self.smooth_only(labels)
        if params.lam < 1.0:
            targets = torch.lerp(targets.flip(0), targets, params.lam)
        return images, targets

    def smooth_only(self, labels: torch.Tensor) -> torch.Tensor:
        """Label-smoothed one-hot targets (B, K) float32 on ``labels``' device, no mixing."""
        smoothing = self.cfg.label_smoothing
        off = smoothing / self.num_classes
        on = 1.0 - smoothing + off
        targets = torch.full(
            (labels.shape[0], self.num_classes), off, dtype=torch.float32, device=labels.device
        )
        return targets.scatter_(1, labels.long().unsqueeze(1), on)
