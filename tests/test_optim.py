"""Parameter groups, the lr rule and schedule, optimisers, and SAM."""

from __future__ import annotations

import math

import pytest
import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from deitlt_scale.config import ModelConfig, OptimConfig
from deitlt_scale.models.student import create_student
from deitlt_scale.optim import (
    build_optimizer,
    lr_at,
    param_groups,
    peak_lr,
    sam_perturb,
    sam_restore,
)


def tiny_student():
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch="deit_tiny_distilled_patch16_224", patch_size=8, embed_dim=24, depth=1, num_heads=2
    )
    return create_student(cfg, 3, 16)


def names_in(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# --------------------------------------------------------------------------------------------
# Parameter groups


def test_param_groups_exempt_tokens_position_biases_and_norms_from_decay():
    model = tiny_student()
    decay, no_decay = param_groups(model, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert names_in(model, decay) == {
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.weight",
        "head.weight",
        "head_dist.weight",
    }
    skipped = names_in(model, no_decay)
    assert {"pos_embed", "cls_token", "dist_token", "norm.weight", "head.bias"} <= skipped
    assert len(skipped) + len(names_in(model, decay)) == len(list(model.parameters()))


def test_param_groups_see_through_wrapper_prefixes():
    wrapper = nn.Module()
    wrapper.module = tiny_student()
    _, no_decay = param_groups(wrapper, 0.05)
    assert {"module.pos_embed", "module.cls_token", "module.dist_token"} <= names_in(
        wrapper, no_decay
    )


def test_param_groups_leave_out_frozen_parameters():
    model = tiny_student()
    model.head.weight.requires_grad_(False)
    assert "head.weight" not in names_in(model, param_groups(model, 0.05)[0])


# --------------------------------------------------------------------------------------------
# Learning rate


@pytest.mark.parametrize(
    ("micro", "world", "expected"),
    [(128, 2, 2.5e-4), (128, 4, 5e-4), (64, 1, 6.25e-5)],
    ids=["cifar-2x128", "imagenet-4x128", "1x64"],
)
def test_peak_lr_scales_the_base_lr_by_micro_batch_times_world_over_512(micro, world, expected):
    assert peak_lr(OptimConfig(lr=5e-4), micro, world) == pytest.approx(expected)


def test_peak_lr_without_scaling_is_the_base_lr():
    assert peak_lr(OptimConfig(lr=0.1, lr_scale_batch=0), 128, 8) == 0.1


SCHED = dict(peak=2.5e-4, total_steps=14_400, warmup_steps=60, warmup_lr=1e-6, min_lr=1e-5)


def test_lr_warms_up_linearly_from_warmup_lr():
    assert lr_at(0, **SCHED) == pytest.approx(1e-6)
    assert lr_at(30, **SCHED) == pytest.approx(1e-6 + 30 * (2.5e-4 - 1e-6) / 60)
    assert lr_at(59, **SCHED) == pytest.approx(1e-6 + 59 * (2.5e-4 - 1e-6) / 60)


def test_lr_after_warm_up_is_a_cosine_measured_from_step_zero():
    def cosine(step):
        return 1e-5 + 0.5 * (2.5e-4 - 1e-5) * (1 + math.cos(math.pi * step / 14_400))

    # warmup_prefix=False: the first post-warm-up lr is already a little below the peak.
    assert lr_at(60, **SCHED) == pytest.approx(cosine(60))
    assert lr_at(60, **SCHED) < 2.5e-4
    assert lr_at(7_200, **SCHED) == pytest.approx(1e-5 + 0.5 * (2.5e-4 - 1e-5))
    assert lr_at(14_399, **SCHED) == pytest.approx(cosine(14_399))
    assert lr_at(14_400, **SCHED) == lr_at(20_000, **SCHED) == 1e-5


def test_lr_at_matches_timm_cosine_scheduler_at_every_epoch():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=5e-4)
    timm_sched = CosineLRScheduler(
        opt, t_initial=20, lr_min=1e-5, warmup_t=5, warmup_lr_init=1e-6, warmup_prefix=False
    )
    for epoch in range(25):
        ours = lr_at(epoch, peak=5e-4, total_steps=20, warmup_steps=5, warmup_lr=1e-6, min_lr=1e-5)
        assert ours == pytest.approx(timm_sched._get_lr(epoch)[0], rel=1e-12), epoch


# --------------------------------------------------------------------------------------------
# Optimisers


def test_build_optimizer_adamw_uses_the_configured_betas_eps_and_groups():
    opt = build_optimizer(tiny_student(), OptimConfig(betas=(0.8, 0.9), eps=1e-7), lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["lr"] == 1e-3 and g["betas"] == (0.8, 0.9) for g in opt.param_groups)
    assert opt.param_groups[0]["eps"] == 1e-7


def test_build_optimizer_sgd_has_momentum_without_nesterov():
    cfg = OptimConfig(name="sgd", momentum=0.9, weight_decay=2e-4)
    opt = build_optimizer(tiny_student(), cfg, lr=0.1)
    assert isinstance(opt, torch.optim.SGD)
    g = opt.param_groups[0]
    assert (g["momentum"], g["nesterov"], g["weight_decay"], g["lr"]) == (0.9, False, 2e-4, 0.1)


# --------------------------------------------------------------------------------------------
# SAM


def quadratic(w: torch.Tensor) -> torch.Tensor:
    """f(w) = 0.5 * w^T A w with A = diag(1, 10)."""
    return 0.5 * (w[0] ** 2 + 10 * w[1] ** 2)


def grad_quadratic(w: torch.Tensor) -> torch.Tensor:
    return torch.stack([w[0], 10 * w[1]])


def sam_step(params: list[nn.Parameter], loss_fn, base: torch.optim.Optimizer, rho: float):
    """One SAM step as the trainer takes it: gradient, perturb, gradient there, restore, step."""
    base.zero_grad()
    loss_fn().backward()
    undo = sam_perturb(params, rho)
    base.zero_grad()
    loss_fn().backward()
    sam_restore(params, undo)
    base.step()


def test_sam_gradient_is_the_gradient_at_w_plus_rho_g_over_norm_g():
    w0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    rho, lr = 0.1, 0.01
    w = nn.Parameter(w0.clone())
    sam_step([w], lambda: quadratic(w), torch.optim.SGD([w], lr=lr), rho)
    g = grad_quadratic(w0)
    ascent = w0 + rho * g / g.norm()
    assert torch.allclose(w.grad, grad_quadratic(ascent))
    assert torch.allclose(w.detach(), w0 - lr * grad_quadratic(ascent))


def valley(w: torch.Tensor) -> torch.Tensor:
    """f(x, y) = 0.5 (1 + x^2) y^2: every (x, 0) is a minimum, with sharpness 1 + x^2."""
    return 0.5 * (1 + w[0] ** 2) * w[1] ** 2


def descend(rho: float | None, steps: int = 300) -> torch.Tensor:
    w = nn.Parameter(torch.tensor([1.0, 0.1], dtype=torch.float64))
    base = torch.optim.SGD([w], lr=0.1)
    for _ in range(steps):
        if rho is None:
            base.zero_grad()
            valley(w).backward()
            base.step()
        else:
            sam_step([w], lambda: valley(w), base, rho)
    return w.detach()


def test_sam_moves_along_the_valley_of_minima_to_the_flattest_one_where_sgd_stays():
    sgd, sam = descend(None), descend(0.5)
    assert abs(sgd[1]) < 1e-6 and sgd[0] > 0.99  # settles at the sharper minimum next to it
    # SAM descends the worst case within rho, max f(w + e), which is lowest where 1 + x^2 is.
    assert abs(sam[0]) < 0.01 and abs(sam[1]) < 0.1


def test_sam_perturb_and_restore_give_back_the_exact_weights():
    torch.manual_seed(0)
    params = [
        nn.Parameter(torch.randn(4, 3)),
        nn.Parameter(torch.randn(3)),
        nn.Parameter(torch.randn(2)),
    ]
    originals = [p.detach().clone() for p in params]
    params[0].grad, params[1].grad = torch.randn(4, 3), torch.randn(3)  # params[2] has no grad
    g = torch.cat([params[0].grad.flatten(), params[1].grad])
    state = sam_perturb(params, rho=0.05, adaptive=False)
    assert torch.allclose(params[0].detach(), originals[0] + 0.05 * params[0].grad / g.norm())
    assert torch.equal(params[2].detach(), originals[2])
    sam_restore(params, state)
    assert all(torch.equal(p.detach(), o) for p, o in zip(params, originals))


def test_adaptive_sam_scales_the_perturbation_by_the_squared_weights():
    w = nn.Parameter(torch.tensor([2.0, -1.0, 0.5]))
    w.grad = torch.tensor([0.3, 0.4, -1.0])
    w0, g = w.detach().clone(), w.grad.clone()
    sam_perturb([w], rho=0.1, adaptive=True)
    expected = w0 + 0.1 * w0**2 * g / (w0.abs() * g).norm()
    assert torch.allclose(w.detach(), expected)
