"""The reference recipe of `deitlt bench step`: the original code's training step in plain torch.

timm's eager distilled ViT, timm Mixup, ``torch.autocast`` fp16 + ``GradScaler`` around student,
teacher (fp32 weights, run in fp16 by autocast) and loss, ``loss.item()`` every step (the
finiteness check), torch AdamW. On a CPU fp16 autocast is used when it works, else bf16
(:func:`reference_amp_dtype` says which).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def reference_amp_dtype(request: str, device):
    """The autocast dtype of the reference recipe (None: off) and its description."""
    import torch

    if request == "off":
        return None, "no autocast (fp32)"
    if request == "bf16":
        return torch.bfloat16, "bf16 autocast"
    if request == "fp16" or device.type == "cuda" or _cpu_fp16_autocast_works():
        return torch.float16, "fp16 autocast + GradScaler"
    return torch.bfloat16, "bf16 autocast (fp16 autocast does not work on this CPU)"


def _cpu_fp16_autocast_works() -> bool:
    import torch

    try:
        layer = torch.nn.Linear(8, 8)
        scaler = torch.amp.GradScaler("cpu")
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        with torch.autocast("cpu", dtype=torch.float16):
            out = layer(torch.randn(4, 8)).float().sum()
        scaler.scale(out).backward()
        scaler.step(optimizer)
        scaler.update()
        return True
    except (RuntimeError, NotImplementedError):
        return False


def timm_mixup(mix, num_classes: int):
    """timm's ``Mixup`` in batch mode with a recipe's ``data.mixup`` settings."""
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=mix.mixup_alpha,
        cutmix_alpha=mix.cutmix_alpha,
        prob=mix.prob,
        switch_prob=mix.switch_prob,
        mode="batch",
        label_smoothing=mix.label_smoothing,
        num_classes=num_classes,
    )


class ReferenceRecipe:
    """The original code's training step in plain torch (see the module docstring): timm's eager
    distilled ViT, timm Mixup, autocast around student, teacher and loss, GradScaler, torch AdamW,
    and ``loss.item()`` every step for its finiteness check."""

    name = "reference"

    def __init__(
        self,
        cfg,
        num_classes: int,
        teacher_dir: Path | None,
        batches: Iterator[Any],
        device,
        amp_dtype,
    ) -> None:
        import timm
        import torch
        from timm.loss import SoftTargetCrossEntropy

        from deitlt_scale.models.student import student_spec
        from deitlt_scale.models.teacher_file import load_teacher
        from deitlt_scale.optim import param_groups, peak_lr

        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as the original code
        name, kwargs = student_spec(cfg.model, num_classes, cfg.data.image_size)
        torch.manual_seed(0)
        self.student = timm.create_model(name, **kwargs).to(device).train()
        self.distilled = cfg.model.distilled
        if self.distilled:
            self.student.set_distilled_training(True)  # training forward gives (cls, dist)
        self.teacher = None
        if teacher_dir is not None:
            self.teacher, _ = load_teacher(teacher_dir, device, torch.float32, channels_last=False)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.student, cfg.optim.weight_decay),
            lr=peak_lr(cfg.optim, cfg.train.micro_batch, 1),
            betas=cfg.optim.betas,
            eps=cfg.optim.eps,
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.mixup = timm_mixup(cfg.data.mixup, num_classes)
        self.soft_ce = SoftTargetCrossEntropy()
        self.alpha = cfg.distill.alpha
        self.device, self.amp_dtype, self.batches = device, amp_dtype, batches
        self.images_per_step = cfg.train.micro_batch
        self.losses: list[float] = []

    def run(self, steps: int) -> None:
        import torch
        import torch.nn.functional as F

        for _ in range(steps):
            batch = next(self.batches)
            images, targets = self.mixup(batch.images, batch.labels)
            with torch.autocast(
                self.device.type,
                dtype=self.amp_dtype or torch.float32,
                enabled=bool(self.amp_dtype),
            ):
                out = self.student(images)
                cls_logits, dist_logits = out if self.distilled else (out, None)
                loss = self.soft_ce(cls_logits, targets)
                if self.teacher is not None:
                    with torch.no_grad():
                        teacher_labels = self.teacher(images).argmax(dim=1)
                    dist = F.cross_entropy(dist_logits, teacher_labels)
                    loss = loss * (1 - self.alpha) + dist * self.alpha
            value = loss.item()  # the original's per-step finiteness check (a host sync)
            if not math.isfinite(value):
                raise RuntimeError("reference recipe: non-finite loss")
            self.losses.append(value)
            self.optimizer.zero_grad()
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def mean_loss(self) -> float:
        return sum(self.losses) / max(len(self.losses), 1)
