"""Pre-training without labels: the masked autoencoder of the student's encoder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from deitlt_scale.config import Config
from deitlt_scale.strict import ConfigError
from deitlt_scale.tasks.base import MicroBatch, Model, Task

if TYPE_CHECKING:
    from deitlt_scale.data.loader import Batch
    from deitlt_scale.data.meta import DatasetMeta


MAE_EVAL_SEED = 0  # the masks of an evaluation: the same patches hidden at every evaluation


class MAETask(Task):
    """Masked-autoencoder pre-training of the student's encoder (:mod:`deitlt_scale.models.mae`):
    no labels, no teacher; evaluation is the masked reconstruction loss of each split, and a
    student starts from the encoder with ``train.init_from`` (heads new)."""

    name = "mae"
    command = "pretrain"
    spec_file = "mae.json"
    headline = "mae/neg_loss"  # higher is better, as for every headline
    classifies = False

    def __init__(self, cfg: Config, meta: DatasetMeta, device: torch.device | None = None) -> None:
        super().__init__(cfg, meta)

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        mix = cfg.data.mixup
        rules = {
            "distill.type": (cfg.distill.type != "none", "none"),
            "teacher.path": (bool(cfg.teacher.path), "empty"),
            "distill.drw_epoch": (cfg.distill.drw_epoch is not None, "null"),
            "data.mixup.prob": (mix.prob > 0 and (mix.mixup_alpha > 0 or mix.cutmix_alpha > 0), "0"),
        }  # fmt: skip
        for key, (bad, wanted) in rules.items():
            if bad:
                raise ConfigError(
                    f"{key} must be {wanted} for train.task=pretrain: MAE pre-training uses no "
                    "labels, teacher or mixing"
                )

    def build_model(self) -> nn.Module:
        from deitlt_scale.models.mae import MaskedAutoencoder
        from deitlt_scale.models.student import create_student

        cfg = self.cfg
        encoder = create_student(cfg.model, self.num_classes, cfg.data.image_size)
        encoder.reset_classifier(0)  # the heads are a student's; pre-training trains none
        m = cfg.mae
        return MaskedAutoencoder(encoder, m.mask_ratio, m.decoder_dim, m.decoder_depth,
                                 m.decoder_heads, m.norm_pix_loss)  # fmt: skip

    def model_spec(self) -> dict[str, Any]:
        from dataclasses import asdict

        from deitlt_scale.models.student import student_spec

        arch, kwargs = student_spec(self.cfg.model, self.num_classes, self.cfg.data.image_size)
        return {
            "architecture": "mae",
            "encoder": {"architecture": arch, "model_args": kwargs},
            "mae": asdict(self.cfg.mae),
            "img_size": self.cfg.data.image_size,
            "mean": list(self.cfg.data.mean),
            "std": list(self.cfg.data.std),
            "dataset": self.meta.dataset,
        }

    def inputs(self, batch: Batch, seed: int, drw: bool) -> MicroBatch:
        return MicroBatch(batch.images, batch.labels, None)

    def loss(
        self, out: Any, mb: MicroBatch, teacher_logits: Tensor | None, drw: bool
    ) -> dict[str, Tensor]:
        return {"loss": out.loss}

    @torch.no_grad()
    def evaluate_split(self, model: Model, batches: Any, world: Any) -> dict[str, float]:
        """The masked patches' mean squared error over the split (padding left out), with masks
        drawn from a fixed seed, summed over ranks."""
        torch.manual_seed(MAE_EVAL_SEED)
        total = torch.zeros(2, dtype=torch.float64, device=world.device)
        for batch in batches:
            keep = batch.labels >= 0
            if keep.any():
                out = model(batch.images[keep].to(next(model.parameters()).dtype))
                total += torch.stack([out.loss.double() * keep.sum(), keep.sum().double()])
        if world.world_size > 1:
            torch.distributed.all_reduce(total)
        loss = float(total[0] / total[1].clamp(min=1))
        return {"mae/loss": loss, "mae/neg_loss": -loss}

    def describe(self) -> str:
        m = self.cfg.mae
        return (
            f"{self.name} ({self.cfg.model.arch} encoder, mask {m.mask_ratio}, decoder "
            f"{m.decoder_depth} x {m.decoder_dim}, norm_pix_loss {m.norm_pix_loss})"
        )
