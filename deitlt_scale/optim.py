"""Optimiser pieces: parameter groups, the lr rule and schedule, AdamW/SGD, and SAM.

The schedule is a pure function of the optimizer step (:func:`lr_at`): the loop sets the lr of
every param group before each update, so resuming needs only the step number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from deitlt_scale.config import OptimConfig

# Token and position parameters are never decayed (DeiT, METHOD.md 6).
NO_DECAY_NAMES = frozenset({"pos_embed", "cls_token", "dist_token"})
# Wrappers that prefix parameter names: torch.compile and DeepSpeed/DDP.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def _bare_name(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed weights, and undecayed biases, norms / other 1-D parameters,
    ``pos_embed``, ``cls_token``, ``dist_token`` (plus the model's ``no_weight_decay()`` names).

    Frozen parameters are left out; empty groups are omitted.
    """
    skip = set(NO_DECAY_NAMES)
    inner = getattr(model, "_orig_mod", model)
    if hasattr(inner, "no_weight_decay"):
        skip |= set(inner.no_weight_decay())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        bare = _bare_name(name)
        if p.ndim <= 1 or bare.endswith(".bias") or bare in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


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


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, lr: float, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum, no Nesterov) over :func:`param_groups`; ``fused`` (CUDA only)
    uses torch's single-kernel AdamW.

    SAM (``cfg.sam_rho > 0``) is not applied here: wrap the result in :class:`SAM`, or call
    :func:`sam_perturb` / :func:`sam_restore` around the backward passes (engines that own the
    optimizer step, e.g. DeepSpeed).
    """
    groups = param_groups(model, cfg.weight_decay)
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


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation around any base optimiser.

    Usage per step::

        loss(model(x)).backward(); sam.first_step(zero_grad=True)   # to w + e(w)
        loss(model(x)).backward(); sam.second_step(zero_grad=True)  # back to w, base step

    or ``sam.step(closure)`` with a closure that recomputes the loss and calls backward.
    ``param_groups`` and ``state_dict`` are the base optimiser's, so lr schedules and
    checkpoints see the base optimiser.
    """

    def __init__(
        self, base_optimizer: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False
    ) -> None:
        if rho <= 0:
            raise ValueError(f"SAM needs rho > 0, got {rho}")
        self.base_optimizer = base_optimizer
        self.rho, self.adaptive = rho, adaptive
        super().__init__(base_optimizer.param_groups, {"rho": rho, "adaptive": adaptive})
        # Share the base optimiser's groups (not copies), so lr updates reach it.
        self.param_groups = base_optimizer.param_groups
        self._saved: SamState | None = None

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        self._saved = sam_perturb(self._params(), self.rho, self.adaptive)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        if self._saved is None:
            raise RuntimeError("SAM.second_step called without first_step")
        sam_restore(self._params(), self._saved)
        self._saved = None
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Both SAM steps; ``closure`` must recompute the loss and call backward."""
        if closure is None:
            raise RuntimeError("SAM.step needs a closure; or call first_step and second_step")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
