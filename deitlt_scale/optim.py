"""Optimiser pieces: parameter groups, the lr rule and schedules, AdamW/SGD, SAM and its rho.

Schedules are pure functions of the optimizer step (:func:`scheduled_lr`, :func:`lr_at`,
:func:`step_lr_at`, :func:`rho_at`): the loop sets the lr (and SAM's rho) before each update,
so resuming needs only the step number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from deitlt_scale.config import OptimConfig, ScheduleConfig

# Token and position parameters are never decayed (DeiT, METHOD.md 6).
NO_DECAY_NAMES = frozenset({"pos_embed", "cls_token", "dist_token"})
# Wrappers that prefix parameter names: torch.compile and DeepSpeed/DDP.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def bare_name(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def param_groups(
    model: nn.Module, weight_decay: float, decay_all: bool = False, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """Two groups: decayed weights, and undecayed biases, norms / other 1-D parameters,
    ``pos_embed``, ``cls_token``, ``dist_token`` (plus the model's ``no_weight_decay()`` names).

    ``decay_all``: one group, every parameter decayed (``SGD(model.parameters(), weight_decay=wd)``
    of the CNN teacher recipes). ``layer_decay`` < 1 (ViT fine-tuning): the two groups are split
    per layer (:func:`vit_layer`), each with ``lr_scale = layer_decay ** (depth + 1 - layer)``,
    which the trainer multiplies into the scheduled lr. Frozen parameters are left out; empty
    groups are omitted.
    """
    if decay_all:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay}] if params else []
    skip = set(NO_DECAY_NAMES)
    inner = getattr(model, "_orig_mod", model)
    if hasattr(inner, "no_weight_decay"):
        skip |= set(inner.no_weight_decay())
    depth = None
    if layer_decay < 1.0:
        if not hasattr(inner, "blocks"):
            raise ValueError("optim.layer_decay needs a ViT (a model with .blocks)")
        depth = len(inner.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        bare = bare_name(name)
        decayed = not (p.ndim <= 1 or bare.endswith(".bias") or bare in skip)
        layer = 0 if depth is None else vit_layer(bare, depth)
        group = groups.setdefault(
            (layer, decayed), {"params": [], "weight_decay": weight_decay if decayed else 0.0}
        )
        if depth is not None:
            group["lr_scale"] = layer_decay ** (depth + 1 - layer)
        group["params"].append(p)
    # Decayed before undecayed, layer by layer: the two-group order of the plain case.
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


def vit_layer(name: str, depth: int) -> int:
    """BEiT's layer of a ViT parameter: 0 for the embeddings and tokens, ``i + 1`` for block
    ``i``, ``depth + 1`` for the final norm and the heads."""
    if name.startswith(("cls_token", "dist_token", "reg_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def peak_lr(cfg: OptimConfig, micro_batch: int, world: int) -> float:
    """``lr * micro_batch * world / lr_scale_batch`` (0 disables scaling).

    Gradient accumulation is deliberately not counted, as in the paper's runs (METHOD.md 6, 10.5):
    CIFAR 2 GPUs x 128 -> 2.5e-4, ImageNet-LT 4 x 128 -> 5e-4 from the base 5e-4.
    """
    if cfg.lr_scale_batch == 0:
        return cfg.lr
    return cfg.lr * micro_batch * world / cfg.lr_scale_batch


def lr_at(
    step: int | float,
    *,
    peak: float,
    total_steps: int,
    warmup_steps: int,
    warmup_lr: float,
    min_lr: float,
) -> float:
    """timm ``CosineLRScheduler`` (``warmup_prefix=False``, one cycle) measured in steps.

    * ``step < warmup_steps``: ``warmup_lr + step * (peak - warmup_lr) / warmup_steps``
    * otherwise: ``min_lr + 0.5 * (peak - min_lr) * (1 + cos(pi * step / total_steps))``; the
      cosine runs from step 0 (it is not shifted by the warm-up) and stays at ``min_lr`` from
      ``total_steps`` on.
    """
    if step < warmup_steps:
        return warmup_lr + step * (peak - warmup_lr) / warmup_steps
    if step >= total_steps:
        return min_lr
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * step / total_steps))


def step_lr_at(
    step: int | float,
    *,
    peak: float,
    milestones: tuple[int, ...],
    factors: tuple[float, ...],
    warmup_steps: int,
    warmup_lr: float,
) -> float:
    """Linear warm-up, then ``peak * factors[i]`` from step ``milestones[i]`` on (the last
    milestone reached wins; before the first, ``peak``). Milestones are optimizer steps,
    increasing; a milestone inside the warm-up takes effect once the warm-up ends.
    """
    if step < warmup_steps:
        return warmup_lr + step * (peak - warmup_lr) / warmup_steps
    lr = peak
    for milestone, factor in zip(milestones, factors):
        if step >= milestone:
            lr = peak * factor
    return lr


def scheduled_lr(
    step: int,
    sched: ScheduleConfig,
    *,
    peak: float,
    steps_per_epoch: int,
    total_steps: int,
) -> float:
    """The lr of optimizer step ``step`` under ``sched`` (see :class:`ScheduleConfig`).

    Args:
        step: 0-indexed optimizer step.
        peak: the peak lr (:func:`peak_lr`).
        steps_per_epoch: optimizer steps per epoch; converts the epoch-denominated warm-up and
            milestones (``round(epochs * steps_per_epoch)``, as ``steps.resolve_steps``).
        total_steps: steps the schedule spans (``Steps.scheduled``: epochs x steps_per_epoch).

    With ``per_epoch`` the lr is constant within an epoch ``e = step // steps_per_epoch``: the
    warm-up gives ``warmup_lr + (e + 1) * (peak - warmup_lr) / warmup_epochs`` (the ramp at the
    epoch's end, as the reference CNN trainers), everything else is evaluated at the epoch's
    first step.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    warmup_steps = round(sched.warmup_epochs * steps_per_epoch)
    if sched.per_epoch:
        epoch = step // steps_per_epoch
        if epoch < sched.warmup_epochs:
            frac = (epoch + 1) / sched.warmup_epochs
            return sched.warmup_lr + frac * (peak - sched.warmup_lr)
        step = epoch * steps_per_epoch
    if sched.kind == "step":
        return step_lr_at(
            step,
            peak=peak,
            milestones=tuple(round(m * steps_per_epoch) for m in sched.milestones),
            factors=tuple(sched.factors),
            warmup_steps=warmup_steps,
            warmup_lr=sched.warmup_lr,
        )
    if sched.warmup_prefix:
        if step < warmup_steps:
            return sched.warmup_lr + step * (peak - sched.warmup_lr) / warmup_steps
        # The cosine over the steps after the warm-up, from the peak down to min_lr.
        return lr_at(
            step - warmup_steps,
            peak=peak,
            total_steps=total_steps - warmup_steps,
            warmup_steps=0,
            warmup_lr=sched.warmup_lr,
            min_lr=sched.min_lr,
        )
    return lr_at(
        step,
        peak=peak,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        warmup_lr=sched.warmup_lr,
        min_lr=sched.min_lr,
    )


def rho_at(step: int, cfg: OptimConfig, steps_per_epoch: int) -> float:
    """SAM's rho at optimizer step ``step``: ``cfg.sam_rho``, replaced by
    ``cfg.sam_rho_values[i]`` from epoch ``cfg.sam_rho_milestones[i]`` on.

    Milestones are 0-indexed epochs converted with ``round(epoch * steps_per_epoch)``, so the
    value changes at an epoch boundary exactly as the reference's per-epoch ``adjust_rho``.
    Returns 0.0 when SAM is off (``sam_rho <= 0``).
    """
    if cfg.sam_rho <= 0:
        return 0.0
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    rho = cfg.sam_rho
    for milestone, value in zip(cfg.sam_rho_milestones, cfg.sam_rho_values):
        if step >= round(milestone * steps_per_epoch):
            rho = value
    return rho


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, lr: float, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum, no Nesterov) over :func:`param_groups` (``cfg.decay_all``: every
    parameter decayed); ``fused`` (CUDA only) uses torch's single-kernel AdamW.

    SAM (``cfg.sam_rho > 0``) is not applied here: the trainer calls :func:`sam_perturb` /
    :func:`sam_restore` around its second backward pass, since DeepSpeed owns the optimizer step.
    """
    groups = param_groups(model, cfg.weight_decay, cfg.decay_all, cfg.layer_decay)
    if cfg.name == "adamw":
        extra = {"fused": True} if fused else {}
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, **extra)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=False)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


# --------------------------------------------------------------------------------------------
# SAM (Foret et al. 2021; adaptive: ASAM, Kwon et al. 2021)

SamState = list[Tensor | None]


@torch.no_grad()
def sam_perturb(params: Iterable[Tensor], rho: float, adaptive: bool = False) -> SamState:
    """Move every parameter with a gradient to ``w + e(w)``, the ascent point of SAM.

    ``e(w) = rho * g / ||g||`` (adaptive: ``rho * w^2 g / ||w g||``), with the norm taken over all
    given parameters together. Returns the original values, which :func:`sam_restore` copies
    back exactly (``None`` for parameters without a gradient, which are not moved). The caller
    then recomputes the gradient at the perturbed point, restores, and steps.
    """
    params = list(params)
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return [None] * len(params)
    norms = [((p.abs() * p.grad) if adaptive else p.grad).float().norm(2) for p in with_grad]
    grad_norm = torch.stack([n.to(with_grad[0].device) for n in norms]).norm(2)
    scale = rho / (grad_norm + 1e-12)
    saved: SamState = []
    for p in params:
        if p.grad is None:
            saved.append(None)
            continue
        saved.append(p.detach().clone())
        e = p.grad.float() * scale.to(p.device)
        if adaptive:
            e = e * p.float().square()
        p.add_(e.to(p.dtype))
    return saved


@torch.no_grad()
def sam_restore(params: Iterable[Tensor], state: SamState) -> None:
    """Undo :func:`sam_perturb`: copy the saved values back (same parameter order)."""
    params = list(params)
    if len(params) != len(state):
        raise ValueError(f"sam_restore got {len(params)} params for a state of {len(state)}")
    for p, saved in zip(params, state):
        if saved is not None:
            p.copy_(saved)
