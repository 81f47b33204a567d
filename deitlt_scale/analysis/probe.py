"""One view of a model for the analyses: logits, final CLS/DIST features, per-block attention maps
and per-block tokens, whatever built the model.

A project student offers ``attention_maps``, ``block_tokens`` and ``forward_heads`` itself (its
explicit-softmax path) and is used as is. A timm ViT/DeiT, as loaded from an export directory, is
read by :class:`ViTProbe`, which recomputes each block's softmax attention explicitly from the
block's own ``qkv`` projection while the blocks run their default (fused) path unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from deitlt_scale.errors import UserError
from deitlt_scale.models.student import attention_probs


@dataclass
class Trace:
    """What one forward pass of a batch yields. Token order is ``[CLS, (DIST,) patches...]``."""

    cls_logits: Tensor  # (B, K)
    dist_logits: Tensor | None  # (B, K); None for a plain ViT
    cls_feat: Tensor  # (B, D) final-normed CLS token
    dist_feat: Tensor | None  # (B, D) final-normed DIST token
    attentions: list[Tensor] | None = None  # per block (B, heads, T, T), rows sum to 1
    tokens: list[Tensor] | None = None  # per block output (B, T, D)


class Probe(Protocol):
    model: nn.Module
    num_prefix: int  # 1 (CLS) or 2 (CLS, DIST)

    def trace(self, x: Tensor, attentions: bool = False, tokens: bool = False) -> Trace: ...


def explicit_attention(attn: nn.Module, x: Tensor) -> Tensor:
    """Softmax attention ``(B, heads, T, T)`` of a timm ``Attention`` module on its input ``x``."""
    needed = ("qkv", "num_heads", "head_dim", "scale")
    if not all(hasattr(attn, name) for name in needed):
        raise UserError(
            f"cannot read attention maps from {type(attn).__name__}: it lacks one of {needed}; "
            "analyse a timm ViT/DeiT or a deitlt student"
        )
    return attention_probs(attn, x)


class ViTProbe:
    """Explicit-softmax view of a timm ``VisionTransformer`` or ``VisionTransformerDistilled``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.distilled = hasattr(model, "head_dist")
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 2 if self.distilled else 1))

    def trace(self, x: Tensor, attentions: bool = False, tokens: bool = False) -> Trace:
        m = self.model
        maps: list[Tensor] = []
        outs: list[Tensor] = []
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        for block in m.blocks:
            hook = None
            if attentions:
                # The attention module's real input, whatever normalisation the block applies.
                hook = block.attn.register_forward_pre_hook(
                    lambda mod, args: maps.append(explicit_attention(mod, args[0]))
                )
            try:
                h = block(h)
            finally:
                if hook is not None:
                    hook.remove()
            if tokens:
                outs.append(h)
        h = m.norm(h)
        if self.distilled:
            cls_feat, dist_feat = h[:, 0], h[:, 1]
            cls_logits = m.head(m.head_drop(cls_feat))
            dist_logits = m.head_dist(m.head_drop(dist_feat))
        else:
            cls_feat, dist_feat = m.forward_head(h, pre_logits=True), None
            cls_logits, dist_logits = m.head(cls_feat), None
        return Trace(
            cls_logits,
            dist_logits,
            cls_feat,
            dist_feat,
            maps if attentions else None,
            outs if tokens else None,
        )


class StudentProbe:
    """A project student, through its own ``forward_heads``/``attention_maps``/``block_tokens``."""

    def __init__(self, student: nn.Module, num_prefix: int | None = None) -> None:
        self.model = student
        if num_prefix is None:
            num_prefix = getattr(student, "num_prefix_tokens", None)
        self._num_prefix = num_prefix

    @property
    def num_prefix(self) -> int:
        if self._num_prefix is None:
            raise RuntimeError("num_prefix is known after the first trace")
        return int(self._num_prefix)

    def trace(self, x: Tensor, attentions: bool = False, tokens: bool = False) -> Trace:
        s = self.model
        maps: list[Tensor] | None = None
        if attentions and hasattr(s, "forward_explicit"):
            out, maps = s.forward_explicit(x)  # heads and maps from one explicit-softmax pass
        else:
            out = s.forward_heads(x)
            if attentions:
                maps = s.attention_maps(x)
        if self._num_prefix is None:
            self._num_prefix = 1 if out.dist_logits is None else 2
        return Trace(
            out.cls_logits,
            out.dist_logits,
            out.cls_feat,
            out.dist_feat,
            list(maps) if maps is not None else None,
            list(s.block_tokens(x)) if tokens else None,
        )


def as_probe(model: nn.Module) -> Probe:
    """The probe for ``model``: its own analysis methods when it has them, else a timm ViT view."""
    if all(hasattr(model, n) for n in ("forward_heads", "attention_maps", "block_tokens")):
        probe: Probe = StudentProbe(model)
    elif all(hasattr(model, n) for n in ("patch_embed", "blocks", "_pos_embed", "norm", "head")):
        probe = ViTProbe(model)
    else:
        raise UserError(
            f"cannot analyse a {type(model).__name__}: expected a deitlt student or a timm ViT/DeiT"
        )
    model.eval()
    return probe


@torch.no_grad()
def trace(probe: Probe, x: Tensor, attentions: bool = False, tokens: bool = False) -> Trace:
    """:meth:`Probe.trace` in inference mode (no autograd graph is kept)."""
    return probe.trace(x, attentions=attentions, tokens=tokens)
