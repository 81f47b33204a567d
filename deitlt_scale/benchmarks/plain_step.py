"""The plain torch loop of `deitlt bench step --overhead`: the framework's step without the
framework.

It does the work of :class:`~deitlt_scale.engine.trainer.Trainer`'s step and nothing else: the same
student (built by :func:`~deitlt_scale.models.student.create_student` under the same seed), the
same frozen teacher forward (:func:`~deitlt_scale.tasks.load_frozen_teacher`, run in place), the
same targets rule (the project's :class:`~deitlt_scale.data.mixing.Mixer` with the trainer's
per-micro-step seeds, torch re-seeded per micro-step for drop path), the same objective
(:class:`~deitlt_scale.losses.DeiTLTObjective`), torch AdamW over the same parameter groups with
the same scheduled lr, the same micro-batches per step and the same gradient scaling (``1 /
micro-batches``). What it leaves out is what the framework adds around that work: the DeepSpeed
engine's forward/backward/step wrappers and its ZeRO optimizer, the per-step flag exchange, the
running loss sums of ``StepWindow`` and the task's logging-only parts (``cls_dist_cosine``).

Because both sides compute the same thing from the same weights and batches, their weights after
the same steps agree to fp32 rounding, which :func:`compare_weights` checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deitlt_scale.engine.trainer import mix_seed

# How far apart the two sides' weights may end, as a fraction of how far training moved them
# (L2 over all parameters): both run the same float operations except that DeepSpeed's optimizer
# steps on flattened buffers, so they can differ at most by fp32 rounding (~1e-7 of the update);
# different work (another lr by 1%, another batch, seed, loss or parameter group) moves them
# apart by 1e-2 of the update or more.
WEIGHT_TOLERANCE = 1e-3


class PlainStep:
    """One optimizer step per :meth:`run` iteration, as the trainer steps (see the module doc).

    ``cfg``/``meta`` are the framework side's; ``batches`` yields what the trainer reads from a
    batch (``.images`` (B, 3, H, W) normalised fp32 and ``.labels`` (B,)); ``rank`` is 0 (the
    benchmark runs as one process)."""

    name = "plain"

    def __init__(self, cfg, meta, device: torch.device, batches: Iterator[Any]) -> None:
        from deitlt_scale.data.mixing import Mixer
        from deitlt_scale.losses import DeiTLTObjective
        from deitlt_scale.models.student import create_student
        from deitlt_scale.optim import param_groups, peak_lr
        from deitlt_scale.steps import resolve_steps
        from deitlt_scale.tasks import load_frozen_teacher

        self.cfg, self.device, self.batches = cfg, device, batches
        num_classes = meta.num_classes
        torch.manual_seed(cfg.train.seed)  # the trainer's initial weights
        self.student = create_student(cfg.model, num_classes, cfg.data.image_size).to(device)
        self.student.train()
        self.teacher = None
        if cfg.distill.type != "none":
            self.teacher, _ = load_frozen_teacher(cfg, meta, device)
        self.mixer = Mixer(cfg.data.mixup, num_classes)
        class_map = meta.class_map if cfg.teacher.map_targets else None
        self.objective = DeiTLTObjective(cfg.distill, meta.train_counts, class_map=class_map)
        self.steps = resolve_steps(cfg, meta.num_samples("train"), 1)
        self.peak_lr = peak_lr(cfg.optim, cfg.train.micro_batch, 1)
        fused = {"fused": True} if cfg.optim.fused and device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(
            param_groups(self.student, cfg.optim.weight_decay),
            lr=self.peak_lr,
            betas=cfg.optim.betas,
            eps=cfg.optim.eps,
            **fused,
        )
        self.images_per_step = cfg.train.micro_batch * cfg.train.grad_accum
        self.step = 0
        self.loss_sum = torch.zeros((), device=device)
        self.micro_steps = 0

    def run(self, steps: int) -> None:
        s = self.steps
        for _ in range(steps):
            step = self.step
            self._set_lr(step)
            drw = s.drw_start is not None and step >= s.drw_start
            count = s.micro_batches_in_step(step)
            for micro in range(count):
                batch = next(self.batches)
                seed = mix_seed(self.cfg.train.seed, 0, step, micro)
                torch.manual_seed(seed)  # drop path, as the trainer seeds it
                images, targets = self._targets(batch.images, batch.labels, seed, drw)
                teacher_logits = self.teacher(images) if self.teacher is not None else None
                out = self.student(images)
                loss = self.objective(out, targets, batch.labels, teacher_logits, drw)["loss"]
                self._backward(loss, count)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step = step + 1

    # The parts are methods so that `--breakdown` can time each one (benchmarks/overhead.py).
    def _set_lr(self, step: int) -> None:
        from deitlt_scale.optim import scheduled_lr

        lr = scheduled_lr(
            step,
            self.cfg.schedule,
            peak=self.peak_lr,
            steps_per_epoch=self.steps.steps_per_epoch,
            total_steps=self.steps.scheduled,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _backward(self, loss: Tensor, count: int) -> None:
        """The mean gradient over the step's ``count`` micro-batches, as DeepSpeed scales it."""
        (loss / count).backward()
        self.loss_sum += loss.detach()
        self.micro_steps += 1

    def _targets(
        self, images: Tensor, labels: Tensor, seed: int, drw: bool
    ) -> tuple[Tensor, Tensor | None]:
        """The students' targets rule (``tasks._StudentTask.inputs``): mixed, smoothed targets;
        hard labels in the DRW phase of ``no_mixup_drw`` recipes."""
        if drw and self.cfg.distill.no_mixup_drw:
            return images, None
        if self.mixer.enabled:
            return self.mixer(images, labels, seed)
        if self.cfg.data.mixup.label_smoothing > 0:
            return images, self.mixer.smooth_only(labels)
        return images, None

    def mean_loss(self) -> float:
        """Mean loss of the micro-steps run (reads the device: call after timing)."""
        return float(self.loss_sum) / max(self.micro_steps, 1)

    def weights(self) -> dict[str, Tensor]:
        """The student's parameters by name, detached copies on the CPU."""
        return {n: p.detach().float().cpu().clone() for n, p in self.student.named_parameters()}


def engine_weights(engine) -> dict[str, Tensor]:
    """The DeepSpeed engine's module parameters by name (gathered under ZeRO 3), detached fp32
    copies on the CPU, named as the bare student names them."""
    from deitlt_scale.optim import bare_name

    params = dict(engine.module.named_parameters())
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {bare_name(n): p.detach().float().cpu().clone() for n, p in params.items()}
    return {bare_name(n): p.detach().float().cpu().clone() for n, p in params.items()}


@dataclass(frozen=True)
class WeightCheck:
    """How far two sides' weights ended apart: the largest absolute difference of any value,
    and ``relative`` = ||framework - plain|| / ||plain - initial|| (L2 over all parameters), the
    difference as a fraction of the distance training moved the weights."""

    tensors: int
    elements: int
    max_abs: float
    relative: float

    @property
    def ok(self) -> bool:
        return self.relative <= WEIGHT_TOLERANCE

    def describe(self) -> str:
        verdict = "agree" if self.ok else "DISAGREE"
        return (
            f"{verdict}: {self.tensors} tensors, {self.elements} values, max |difference| "
            f"{self.max_abs:.3g}, ||difference|| / ||update|| {self.relative:.3g} "
            f"(tolerance {WEIGHT_TOLERANCE:g})"
        )


def compare_weights(
    framework: dict[str, Tensor], plain: dict[str, Tensor], initial: dict[str, Tensor]
) -> WeightCheck:
    """Compare two named weight sets that both started at ``initial``; different names or
    shapes raise ``ValueError`` (the two sides did not build the same network)."""
    if framework.keys() != plain.keys() or plain.keys() != initial.keys():
        only = sorted((framework.keys() ^ plain.keys()) | (plain.keys() ^ initial.keys()))
        raise ValueError(f"the two sides have different parameters (first: {only[0]})")
    max_abs, diff_sq, update_sq, elements = 0.0, 0.0, 0.0, 0
    for name, a in framework.items():
        b, b0 = plain[name], initial[name]
        if a.shape != b.shape or b.shape != b0.shape:
            raise ValueError(f"parameter {name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        diff = (a.double() - b.double()).abs()
        max_abs = max(max_abs, float(diff.max()))
        diff_sq += float(diff.square().sum())
        update_sq += float((b.double() - b0.double()).square().sum())
        elements += a.numel()
    if update_sq == 0.0:
        relative = 0.0 if diff_sq == 0.0 else float("inf")
    else:
        relative = (diff_sq / update_sq) ** 0.5
    return WeightCheck(len(framework), elements, max_abs, relative)
