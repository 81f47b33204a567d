"""The CNN teachers: LDAM / CE (optionally DRW and SAM) and PaCo."""

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


class TeacherTask(Task):
    """A CNN teacher (ResNet-32/50) trained with LDAM or CE, DRW-weighted late, optionally with
    SAM (the trainer's second pass), on weakly augmented, unmixed images."""

    name = "teacher"
    command = "teacher train"
    spec_file = "model.json"
    headline = "teacher/mean_class"

    def __init__(self, cfg: Config, meta: DatasetMeta, device: torch.device | None = None) -> None:
        from deitlt_scale.losses import teacher_objective

        super().__init__(cfg, meta)
        self.objective = teacher_objective(cfg.distill, meta.train_counts)
        self._normed = cfg.distill.teacher_loss == "ldam"

    @classmethod
    def check(cls, cfg: Config) -> None:
        mix = cfg.data.mixup
        if mix.prob > 0 and (mix.mixup_alpha > 0 or mix.cutmix_alpha > 0):
            raise ConfigError(
                "data.mixup.prob must be 0 for train.task=teacher: the LDAM/CE teacher losses "
                "take hard labels, so mixed images would be trained on unmixed labels"
            )
        t = cfg.train
        if cfg.optim.sam_rho > 0 and not (cfg.deepspeed.zero_stage == 0 and t.grad_accum == 1):
            raise ConfigError(
                "optim.sam_rho > 0 needs deepspeed.zero_stage=0 and train.grad_accum=1 "
                "(SAM perturbs the full, already reduced gradient)"
            )

    def build_model(self) -> nn.Module:
        from deitlt_scale.models.teachers import create_teacher_arch

        return create_teacher_arch(self.cfg.model.arch, self.num_classes, normed=self._normed)

    def model_spec(self) -> dict[str, Any]:
        return {
            "architecture": self.cfg.model.arch,
            "model_args": {},
            "num_classes": self.num_classes,
        }

    def inputs(self, batch: Batch, seed: int, drw: bool) -> MicroBatch:
        return MicroBatch(batch.images, batch.labels, None)

    def loss(
        self, out: Any, mb: MicroBatch, teacher_logits: Tensor | None, drw: bool
    ) -> dict[str, Tensor]:
        return self.objective(out.float(), mb.labels, drw)

    def predict(self, model: Model, images: Tensor) -> dict[str, Tensor]:
        return {"teacher": model(images)}

    def describe(self) -> str:
        loss = self.cfg.distill.teacher_loss
        sam = f", SAM rho {self.cfg.optim.sam_rho}" if self.cfg.optim.sam_rho > 0 else ""
        return f"{self.name} ({self.cfg.model.arch}, {loss}{sam})"

    def save_outputs(self, module: nn.Module, run_dir: Any) -> Any:
        """The trained network as a teacher file (``RUN_DIR/teacher``) that students load."""
        from pathlib import Path

        from deitlt_scale.models.teacher_file import TeacherInfo, save_teacher

        cfg = self.cfg
        info = TeacherInfo(
            arch=cfg.model.arch,
            num_classes=self.num_classes,
            input_size=cfg.data.image_size,
            mean=tuple(cfg.data.mean),
            std=tuple(cfg.data.std),
            normed=self._normed,
            label_space="model",
            source=f"deitlt {self.command} ({run_dir})",
        )
        out = Path(run_dir) / "teacher"
        save_teacher(out, self.teacher_network(module).float(), info)
        return out

    def teacher_network(self, module: nn.Module) -> nn.Module:
        """The network a student's teacher file holds."""
        return module


class PaCoTask(TeacherTask):
    """A PaCo teacher (Cui et al. 2021), optionally with SAM: the MoCo container
    (:class:`deitlt_scale.models.moco.MoCo`) trained on a query and a key view of each image
    with :class:`deitlt_scale.losses.PaCoLoss`; evaluated and saved as its inference network,
    ``linear(pooled feature of encoder_q)``, the teacher ``teacher import --format paco`` makes.

    Per micro-batch: the key encoder's momentum update, the forward (queries, keys, the queue as
    it stands), the loss, SAM's second pass over the same keys and queue, the step, and then the
    batch's keys into the queue.
    """

    name = "paco"

    def __init__(self, cfg: Config, meta: DatasetMeta, device: torch.device | None = None) -> None:
        from deitlt_scale.losses import PaCoLoss

        Task.__init__(self, cfg, meta)
        self.objective = PaCoLoss(cfg.paco, meta.train_counts)
        self._normed = False  # PaCo's classifier is a plain linear layer

    @classmethod
    def check(cls, cfg: Config) -> None:
        from deitlt_scale.models.moco import PACO_ARCHS

        super().check(cfg)
        if cfg.model.arch not in PACO_ARCHS:
            raise ConfigError(
                f"model.arch={cfg.model.arch!r}: PaCo trains {' or '.join(PACO_ARCHS)} (the "
                "published MoCo containers)"
            )
        if cfg.deepspeed.zero_stage == 3:
            raise ConfigError(
                "deepspeed.zero_stage=3 with paco.enabled: the key encoder's momentum update "
                "reads every query parameter on every rank; use ZeRO 0-2"
            )
        if cfg.distill.drw_epoch is not None:
            raise ConfigError(
                "distill.drw_epoch with paco.enabled: PaCo re-balances through its log-prior "
                "term, not DRW; leave distill.drw_epoch unset"
            )

    def build_model(self) -> nn.Module:
        from deitlt_scale.models.moco import MoCo

        p = self.cfg.paco
        return MoCo(
            self.cfg.model.arch,
            self.num_classes,
            moco_dim=p.moco_dim,
            moco_k=p.moco_k,
            moco_m=p.moco_m,
            feat_dim=p.feat_dim,
            mlp=p.mlp,
        )

    def model_spec(self) -> dict[str, Any]:
        p = self.cfg.paco
        return {
            **super().model_spec(),
            "model_args": {"moco_dim": p.moco_dim, "moco_k": p.moco_k, "mlp": p.mlp},
            "container": "moco",
        }

    def train_views(self) -> Any:
        from deitlt_scale.data.dali import ContrastViews

        p = self.cfg.paco
        return ContrastViews(p.views, p.randaug_n, float(p.randaug_m))

    def inputs(self, batch: Batch, seed: int, drw: bool) -> MicroBatch:
        if batch.key_images is None:
            raise RuntimeError("a PaCo micro-batch needs the loader's key view (train_views)")
        return MicroBatch(batch.images, batch.labels, None, key_images=batch.key_images)

    def forward(self, model: Model, mb: MicroBatch, dtype: torch.dtype, again: bool = False) -> Any:
        if not again:  # SAM's second pass sees the same key encoder
            _moco(model).momentum_update()
        return model(mb.images.to(dtype), mb.key_images.to(dtype), mb.labels)

    def after_micro_step(self, model: Model, out: Any, mb: MicroBatch) -> None:
        _moco(model).enqueue(out.keys.detach(), mb.labels)

    def loss(
        self, out: Any, mb: MicroBatch, teacher_logits: Tensor | None, drw: bool
    ) -> dict[str, Tensor]:
        return self.objective(out.features, out.labels, out.logits)

    def describe(self) -> str:
        p, sam = self.cfg.paco, self.cfg.optim.sam_rho
        extra = f", SAM rho {sam}" if sam > 0 else ""
        return (
            f"{self.name} ({self.cfg.model.arch}, views {p.views}, queue {p.moco_k}, "
            f"alpha {p.alpha}, t {p.temperature}{extra})"
        )

    def teacher_network(self, module: nn.Module) -> nn.Module:
        from deitlt_scale.models.moco import teacher_from_moco

        return teacher_from_moco(_moco(module))


def _moco(model: Model) -> Any:
    """The MoCo container inside a DeepSpeed engine and/or torch.compile wrapper."""
    module = getattr(model, "module", model)
    return getattr(module, "_orig_mod", module)
