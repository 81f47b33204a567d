"""Model FLOPs per image, computed from the architecture (what MFU is counted in).

Convention (the usual one for model FLOPs utilisation): a FLOP is half a multiply-accumulate of a
matrix product or convolution, i.e. ``2 * M * N * K`` for an ``(M, K) @ (K, N)`` product. Bias
additions, norms, activations, softmax, residual adds and optimizer arithmetic are not counted;
they are a few per cent of a ViT's work and none of it runs on the matrix units.

* Student (timm ViT, CLS (+ DIST) tokens, MLP ratio 4): with ``N = (S / P)^2`` patches,
  ``T = N + prefix`` tokens (prefix 2 for distilled, 1 for plain), width ``D``, ``L`` blocks and
  ``K`` classes, one forward is::

      2 * N * (3 * P * P) * D            patch embedding (a P x P stride-P convolution)
    + L * (24 * T * D^2 + 4 * T^2 * D)   qkv 6TD^2, q k^T 2T^2D, attn v 2T^2D, proj 2TD^2, MLP 16TD^2
    + prefix * 2 * D * K                 the CLS (and DIST) heads

  DeiT-B/16 distilled at 224 px with 1000 classes: 35.3 GFLOPs (17.7 GMACs, timm/fvcore's "17.6").
* Teacher: the convolutions and linear layers of the actual network, walked on the meta device
  (no memory, no compute) at the given input size. ResNet-50 at 224 px with 1000 classes:
  8.2 GFLOPs (4.1 GMACs).
* Training counts the student's forward and backward as 3x its forward (backward = gradients with
  respect to activations and to weights, each costing about one forward) and the frozen teacher's
  forward once.
"""

from __future__ import annotations

from dataclasses import dataclass

MLP_RATIO = 4  # timm's DeiT/ViT default; every student of models/student.py uses it


@dataclass(frozen=True)
class TrainingFlops:
    """FLOPs per training image; all fields are in FLOPs (2 per multiply-accumulate)."""

    student_forward: int
    teacher_forward: int  # 0 without a teacher

    @property
    def student_train(self) -> int:
        """Student forward + backward, counted as 3 forwards."""
        return 3 * self.student_forward

    @property
    def total(self) -> int:
        return self.student_train + self.teacher_forward


def vit_forward_flops(
    *,
    img_size: int,
    patch_size: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    num_classes: int,
    distilled: bool,
    mlp_ratio: int = MLP_RATIO,
) -> int:
    """FLOPs of one ViT forward for one image (see the module docstring for the formula).

    ``num_heads`` does not change the count (heads split ``D``); it is checked for consistency.
    """
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
    n = (img_size // patch_size) ** 2
    prefix = 2 if distilled else 1
    t, d = n + prefix, embed_dim
    patch_embed = 2 * n * (3 * patch_size * patch_size) * d
    attention = 2 * t * d * (3 * d) + 2 * t * t * d + 2 * t * t * d + 2 * t * d * d
    mlp = 2 * 2 * t * d * (mlp_ratio * d)
    heads = prefix * 2 * d * num_classes
    return patch_embed + depth * (attention + mlp) + heads


def student_forward_flops(model_cfg, num_classes: int, img_size: int) -> int:
    """FLOPs of one forward of the student a :class:`~deitlt_scale.config.ModelConfig` builds."""
    from deitlt_scale.models.student import student_spec

    _, kw = student_spec(model_cfg, num_classes, img_size)
    return vit_forward_flops(
        img_size=kw["img_size"],
        patch_size=kw["patch_size"],
        embed_dim=kw["embed_dim"],
        depth=kw["depth"],
        num_heads=kw["num_heads"],
        num_classes=num_classes,
        distilled=model_cfg.distilled,
    )


def module_forward_flops(model, img_size: int) -> int:
    """FLOPs of the ``Conv2d``, ``Linear`` and cosine-classifier layers of ``model`` for one
    ``img_size`` x ``img_size`` RGB image. ``model`` should live on the meta device (its shapes
    are all that is read); it is called once on a meta tensor."""
    import torch
    from torch import nn

    from deitlt_scale.models.teachers import NormedLinear

    total = 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            per_output = (module.in_channels // module.groups) * kh * kw
            total += 2 * output.numel() * per_output
        elif isinstance(module, nn.Linear):
            total += 2 * output.numel() * module.in_features
        elif isinstance(module, NormedLinear):
            total += 2 * output.numel() * module.weight.shape[0]

    handles = [
        m.register_forward_hook(count)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear | NormedLinear)
    ]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.empty(1, 3, img_size, img_size, device=device))
    finally:
        for h in handles:
            h.remove()
    return total


def teacher_forward_flops(arch: str, num_classes: int, img_size: int, normed: bool = False) -> int:
    """FLOPs of one forward of a teacher of ``arch`` (``resnet32`` | ``resnet50``) per image."""
    import torch

    from deitlt_scale.models.teachers import create_teacher_arch

    with torch.device("meta"):
        model = create_teacher_arch(arch, num_classes, normed=normed)
    return module_forward_flops(model.eval(), img_size)


def format_flops(value: float) -> str:
    """``35.31 GFLOP``-style text with a unit chosen for readability."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} FLOP"
