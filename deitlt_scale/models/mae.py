"""Masked-autoencoder pre-training (He et al., CVPR 2022) of the project's student encoder.

The encoder is the student itself (:func:`deitlt_scale.models.student.create_student`: the timm
DeiT with CLS and DIST tokens, or the plain ViT), so a pre-trained encoder's weights load into a
student by name (``train.init_from``, :mod:`deitlt_scale.engine.warm_start`). Around it:

* each image's patch tokens (with their position embeddings) are shuffled by per-sample noise
  from torch's generator and only the first ``1 - mask_ratio`` are kept; the prefix tokens (CLS,
  DIST) join the kept ones and the encoder's blocks and norm run on them alone;
* a light decoder (timm ``Block``s of ``decoder_dim`` width) sees the encoded tokens projected to
  its width, a learned mask token in every masked place, the order restored, and fixed 2-D
  sin-cos position embeddings (timm ``build_sincos2d_pos_embed``; zeros for the prefix rows);
* the loss is the mean squared error of the predicted pixels of the masked patches only, against
  each patch normalised by its own mean and variance (``norm_pix_loss``, the MAE default).

LiVT (Xu et al., CVPR 2023) pre-trains this way on the long-tailed training split itself before
fine-tuning with balanced BCE; the recipes ``recipes/mae_*.yaml`` carry its settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

PIXEL_EPS = 1e-6  # MAE's variance floor of norm_pix_loss


@dataclass
class MAEOutput:
    loss: Tensor  # 0-d, the masked patches' mean squared error
    pred: Tensor  # (B, L, p * p * 3) predicted pixels of every patch
    mask: Tensor  # (B, L) 1 where the patch was masked


class MaskedAutoencoder(nn.Module):
    """``encoder``: a timm ViT (with or without a DIST token) whose patch grid is fixed."""

    def __init__(
        self,
        encoder: nn.Module,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        from functools import partial

        from timm.layers import LayerNorm
        from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
        from timm.models.vision_transformer import Block

        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.prefix = int(encoder.num_prefix_tokens)
        grid = tuple(encoder.patch_embed.grid_size)
        self.patch = int(encoder.patch_embed.patch_size[0])
        if encoder.pos_embed.shape[1] != grid[0] * grid[1] + self.prefix:
            raise ValueError("the encoder's position embedding must cover its prefix tokens")
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        patches = build_sincos2d_pos_embed(list(grid), decoder_dim).reshape(1, -1, decoder_dim)
        prefix = torch.zeros(1, self.prefix, decoder_dim)
        self.register_buffer("decoder_pos_embed", torch.cat([prefix, patches], 1), persistent=False)
        self.decoder_blocks = nn.Sequential(
            *(
                Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True,
                      norm_layer=partial(LayerNorm, eps=1e-6))
                for _ in range(decoder_depth)
            )
        )  # fmt: skip
        self.decoder_norm = LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def patchify(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, L, p * p * 3), patches in row-major order, pixels (p, p, C)."""
        b, c, h, w = images.shape
        p = self.patch
        x = images.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The kept tokens encoded (prefix first), the mask (B, L) and the order that restores
        the shuffled patches."""
        e = self.encoder
        x = e.patch_embed(images) + e.pos_embed[:, self.prefix :]
        b, length, dim = x.shape
        keep = int(length * (1 - self.mask_ratio))
        noise = torch.rand(b, length, device=x.device)
        shuffle = noise.argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        kept = x.gather(1, shuffle[:, :keep, None].expand(-1, -1, dim))
        mask = torch.ones(b, length, device=x.device)
        mask[:, :keep] = 0
        mask = mask.gather(1, restore)
        tokens = [e.cls_token] + ([e.dist_token] if self.prefix == 2 else [])
        prefix = torch.cat(tokens, 1) + e.pos_embed[:, : self.prefix]
        x = torch.cat([prefix.expand(b, -1, -1), kept], 1)
        x = e.norm_pre(e.pos_drop(x))
        return e.norm(e.blocks(x)), mask, restore

    def decode(self, x: Tensor, restore: Tensor) -> Tensor:
        x = self.decoder_embed(x)
        b, length = restore.shape
        hidden = x[:, self.prefix :]
        masks = self.mask_token.expand(b, length - hidden.shape[1], -1)
        patches = torch.cat([hidden, masks], 1)
        patches = patches.gather(1, restore[:, :, None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, : self.prefix], patches], 1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, self.prefix :])

    def forward(self, images: Tensor) -> MAEOutput:
        encoded, mask, restore = self.encode(images)
        pred = self.decode(encoded, restore)
        target = self.patchify(images).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + PIXEL_EPS) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return MAEOutput(loss, pred, mask)
