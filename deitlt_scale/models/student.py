"""DeiT students: timm's distilled ViT (CLS + DIST tokens) and the plain ViT baseline, any size.

A student *is* the timm model: :class:`DistilledStudent` subclasses timm's
``VisionTransformerDistilled`` and :class:`PlainStudent` subclasses ``VisionTransformer``, so
``state_dict()`` keys are exactly timm's and ``timm.create_model(*student_spec(...))`` loads an
exported student strictly. The subclasses only add DeiT-LT views of the same computation:

* ``forward`` returns a :class:`StudentOutput` (both heads and their final-norm features) in
  training mode, and in eval mode what timm returns (the mean of the two heads' logits).
* ``attention_maps`` runs an explicit-softmax attention path (for analysis) that reproduces the
  fused ``scaled_dot_product_attention`` path used for training.

Sizes: the DeiT Tiny/Small/Base names of timm, with optional ``patch_size``/``embed_dim``/
``depth``/``num_heads`` overrides (e.g. patch 4 at 32 px) and ``img_size`` from the data config.
Unlike the reference code, whose patch embedding is hard-wired to 768 channels, every size builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import Tensor, nn

from deitlt_scale.config import ModelConfig
from deitlt_scale.errors import UserError


class StudentOutput(NamedTuple):
    """Per-head logits (B, K) and the final-norm token features (B, D) they are computed from."""

    cls_logits: Tensor
    dist_logits: Tensor | None  # None for the plain ViT
    cls_feat: Tensor
    dist_feat: Tensor | None


def mean_logits(cls_logits: Tensor, dist_logits: Tensor) -> Tensor:
    """The paper's prediction: the mean of the CLS and DIST logits (METHOD.md 2, 7)."""
    return (cls_logits + dist_logits) / 2


def head_logits(out: StudentOutput) -> dict[str, Tensor]:
    """The predictors a student is scored on: ``cls``, and with a DIST head ``dist`` and their
    ``mean``."""
    if out.dist_logits is None:
        return {"cls": out.cls_logits}
    return {
        "cls": out.cls_logits,
        "dist": out.dist_logits,
        "mean": mean_logits(out.cls_logits, out.dist_logits),
    }


@dataclass(frozen=True)
class _Arch:
    distilled: bool
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    img_size: int
    plain: str  # the non-distilled arch of the same size (the ViT baseline)


_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}


def _arch_table() -> dict[str, _Arch]:
    table: dict[str, _Arch] = {}
    for size, (dim, depth, heads) in _SIZES.items():
        resolutions = (224, 384) if size == "base" else (224,)
        for res in resolutions:
            # deit_*_patch16_* are built by timm as a plain VisionTransformer on every install
            # (vit_* may be swapped for NaFlexVit by an environment flag), so they name the baseline.
            plain = f"deit_{size}_patch16_{res}"
            table[f"deit_{size}_distilled_patch16_{res}"] = _Arch(
                True, 16, dim, depth, heads, res, plain
            )
            table[plain] = _Arch(False, 16, dim, depth, heads, res, plain)
            table[f"vit_{size}_patch16_{res}"] = _Arch(
                False, 16, dim, depth, heads, res, f"vit_{size}_patch16_{res}"
            )
    return table


ARCHS: dict[str, _Arch] = _arch_table()


def student_spec(cfg: ModelConfig, num_classes: int, img_size: int) -> tuple[str, dict[str, Any]]:
    """``(timm architecture name, kwargs)`` such that ``timm.create_model(name, **kwargs)`` builds
    the same network as :func:`create_student` (same modules, same state_dict keys and shapes).

    ``img_size`` is in pixels and must be a multiple of the patch size; ``num_classes`` is K.
    """
    arch = ARCHS.get(cfg.arch)
    if arch is None:
        raise UserError(
            f"model.arch={cfg.arch!r} is not a known student; use one of {', '.join(sorted(ARCHS))}"
        )
    if cfg.distilled and not arch.distilled:
        raise UserError(
            f"model.arch={cfg.arch} is a plain ViT but model.distilled is true; "
            f"use deit_<size>_distilled_patch16_<res> or set model.distilled=false"
        )
    name = cfg.arch if cfg.distilled else arch.plain
    sizes = {}
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise UserError(f"model.{key} must be >= 1 (or null for the arch's value), got {value}")
        sizes[key] = getattr(arch, key) if value is None else value
    patch, dim, depth, heads = (
        sizes["patch_size"],
        sizes["embed_dim"],
        sizes["depth"],
        sizes["num_heads"],
    )
    if dim % heads:
        raise UserError(
            f"model.embed_dim={dim} must be a multiple of model.num_heads={heads}; change one of them"
        )
    if img_size % patch:
        raise UserError(
            f"data.image_size={img_size} must be a multiple of model.patch_size={patch} "
            "(pixels beyond the last whole patch would be dropped)"
        )
    if num_classes < 1:
        raise UserError(f"the dataset must have at least one class, got num_classes={num_classes}")
    if not 0.0 <= cfg.drop_path < 1.0:
        raise UserError(f"model.drop_path must be in [0, 1), got {cfg.drop_path}")
    kwargs: dict[str, Any] = {
        "img_size": img_size,
        "patch_size": patch,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": heads,
        "num_classes": num_classes,
        "drop_path_rate": cfg.drop_path,
    }
    return name, kwargs


class Student(nn.Module):
    """The DeiT-LT views shared by both student classes (a mixin over timm's ViT).

    Token layout: ``[CLS, (DIST), patches...]``; ``num_prefix_tokens`` is 2 for distilled students
    and 1 for the plain ViT. Features are the final LayerNorm outputs at tokens 0 and 1.
    """

    # Attributes provided by timm's VisionTransformer.
    head: nn.Module
    head_drop: nn.Module
    blocks: nn.Sequential
    norm: nn.Module
    patch_embed: nn.Module
    patch_drop: nn.Module
    norm_pre: nn.Module
    num_prefix_tokens: int

    @property
    def distilled(self) -> bool:
        return isinstance(self, VisionTransformerDistilled)

    @property
    def timm_model(self) -> nn.Module:
        """The timm module itself: a student is its own timm model (identical state_dict keys)."""
        return self

    def forward(self, x: Tensor, heads: bool = False) -> StudentOutput | Tensor:  # type: ignore[override]
        """Training (or ``heads=True``): :class:`StudentOutput`. Eval: the mean of the two heads'
        logits (CLS logits for the plain ViT), which is exactly what the timm model returns.

        Evaluation asks for ``heads=True`` through the module's own forward (not
        :meth:`forward_heads`) so that wrappers' hooks run, e.g. ZeRO-3's parameter gathering.
        """
        out = self.forward_heads(x)
        if self.training or heads:
            return out
        return head_logits(out)["mean" if out.dist_logits is not None else "cls"]

    def forward_heads(self, x: Tensor) -> StudentOutput:
        """Both heads and their features, in any mode (eval reports CLS, DIST and mean accuracy)."""
        return self._heads(self.forward_features(x))  # type: ignore[operator]

    def _heads(self, tokens: Tensor) -> StudentOutput:
        cls_feat = tokens[:, 0]
        cls_logits = self.head(self.head_drop(cls_feat))
        if not self.distilled:
            return StudentOutput(cls_logits, None, cls_feat, None)
        dist_feat = tokens[:, 1]
        dist_logits = self.head_dist(self.head_drop(dist_feat))
        return StudentOutput(cls_logits, dist_logits, cls_feat, dist_feat)

    def _embed(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)  # type: ignore[operator]
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def block_tokens(self, x: Tensor) -> list[Tensor]:
        """Output tokens (B, T, D) of every block, before the final norm (for feature rank)."""
        x = self._embed(x)
        out = []
        for blk in self.blocks:
            x = blk(x)
            out.append(x)
        return out

    def attention_maps(self, x: Tensor) -> list[Tensor]:
        """Softmax attention (B, heads, T, T) of every block; each row sums to 1.

        Runs the explicit-softmax path (:meth:`forward_explicit`), whose outputs equal the fused
        path's up to kernel rounding; training keeps the fused kernel.
        """
        return self.forward_explicit(x)[1]

    def forward_explicit(self, x: Tensor) -> tuple[StudentOutput, list[Tensor]]:
        """The forward pass with attention computed as ``softmax(q k^T * scale) v`` explicitly.

        Returns the heads (as :meth:`forward_heads`) and the per-block attention probabilities.
        """
        x = self._embed(x)
        maps = []
        for blk in self.blocks:
            attn_out, probs = _explicit_attention(blk.attn, blk.norm1(x))
            x = x + blk.drop_path1(blk.ls1(attn_out))
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
            maps.append(probs)
        return self._heads(self.norm(x)), maps

    def no_weight_decay(self) -> set[str]:
        """Parameters excluded from weight decay by name (1-D params and biases are excluded
        by :func:`deitlt_scale.optim.param_groups` anyway)."""
        names = {"pos_embed", "cls_token"}
        if self.distilled:
            names.add("dist_token")
        return names


def _qkv(attn: Attention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    b, t, _ = x.shape
    qkv = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _softmax_attention(attn: Attention, q: Tensor, k: Tensor) -> Tensor:
    # Softmax in fp32 so maps from bf16 models still sum to 1 within rounding.
    return F.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1, dtype=torch.float32)


def attention_probs(attn: Attention, x: Tensor) -> Tensor:
    """Softmax attention ``(B, heads, T, T)`` (fp32) of a timm ``Attention`` on its input ``x``."""
    q, k, _ = _qkv(attn, x)
    return _softmax_attention(attn, q, k)


def _explicit_attention(attn: Attention, x: Tensor) -> tuple[Tensor, Tensor]:
    """timm ``Attention`` with an explicit softmax: returns (output (B, T, D), probs (B, H, T, T))."""
    if getattr(attn, "gate", None) is not None:
        raise NotImplementedError("gated attention is not used by DeiT students")
    b, t, _ = x.shape
    q, k, v = _qkv(attn, x)
    probs = _softmax_attention(attn, q, k)
    out = attn.attn_drop(probs.to(v.dtype)) @ v
    out = out.transpose(1, 2).reshape(b, t, attn.attn_dim)
    out = attn.proj_drop(attn.proj(attn.norm(out)))
    return out, probs


class DistilledStudent(Student, VisionTransformerDistilled):
    """DeiT with CLS and DIST tokens; a ``VisionTransformerDistilled`` with DeiT-LT outputs."""


class PlainStudent(Student, VisionTransformer):
    """The ViT baseline (CLS token only); a ``VisionTransformer`` with DeiT-LT outputs."""


def create_student(cfg: ModelConfig, num_classes: int, img_size: int) -> Student:
    """Build a randomly initialised student as timm initialises it (trunc-normal 0.02 linears,
    drop path ``linspace(0, cfg.drop_path, depth)``). ``cfg.compile`` is applied by the trainer."""
    _, kwargs = student_spec(cfg, num_classes, img_size)
    cls = DistilledStudent if cfg.distilled else PlainStudent
    return cls(**kwargs)
