"""The students: DeiT-LT (CLS + DIST tokens, a frozen teacher) and the plain ViT baseline, and
the frozen teacher they learn from."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deitlt_scale.config import Config
from deitlt_scale.errors import UserError
from deitlt_scale.strict import ConfigError
from deitlt_scale.tasks.base import MicroBatch, Model, Task

if TYPE_CHECKING:
    from deitlt_scale.data.loader import Batch
    from deitlt_scale.data.meta import DatasetMeta
    from deitlt_scale.models.teacher_file import TeacherInfo
    from deitlt_scale.models.teacher_runner import TeacherRunner


class _StudentTask(Task):
    """Shared by the DeiT-LT student and the ViT baseline: a timm ViT trained on strongly
    augmented, mixed batches with the DeiT-LT objective."""

    command = "train"
    spec_file = "student.json"

    def __init__(self, cfg: Config, meta: DatasetMeta) -> None:
        from deitlt_scale.data.mixing import Mixer
        from deitlt_scale.losses import DeiTLTObjective

        super().__init__(cfg, meta)
        self.mixer = Mixer(cfg.data.mixup, meta.num_classes)
        class_map = meta.class_map if cfg.teacher.map_targets else None
        self.objective = DeiTLTObjective(cfg.distill, meta.train_counts, class_map=class_map)
        self._no_mixup_drw = cfg.distill.no_mixup_drw
        self._smoothing = cfg.data.mixup.label_smoothing

    def build_model(self) -> nn.Module:
        from deitlt_scale.models.student import create_student

        return create_student(self.cfg.model, self.num_classes, self.cfg.data.image_size)

    def model_spec(self) -> dict[str, Any]:
        from deitlt_scale.models.student import student_spec

        cfg, meta = self.cfg, self.meta
        arch, kwargs = student_spec(cfg.model, meta.num_classes, cfg.data.image_size)
        return {
            "architecture": arch,
            "model_args": kwargs,
            "num_classes": meta.num_classes,
            "img_size": cfg.data.image_size,
            "mean": list(cfg.data.mean),
            "std": list(cfg.data.std),
            "interpolation": "bicubic",
            "crop_pct": cfg.data.augment.eval_crop_pct,
            "class_names": meta.class_names,
            "class_map": meta.class_map,
            "groups": meta.groups,
            "boundaries": list(meta.boundaries),
            "dataset": meta.dataset,
            "train_counts": meta.train_counts,
        }

    def inputs(self, batch: Batch, seed: int, drw: bool) -> MicroBatch:
        """The paper's targets rule (METHOD.md 4.3, 5.3): mixed, smoothed targets; in the DRW
        phase of ``no_mixup_drw`` recipes (CIFAR) unmixed images and hard labels (no smoothing)."""
        images, labels = batch.images, batch.labels
        if drw and self._no_mixup_drw:
            return MicroBatch(images, labels, None)
        if self.mixer.enabled:
            mixed, targets = self.mixer(images, labels, seed)
            return MicroBatch(mixed, labels, targets)
        if self._smoothing > 0:
            return MicroBatch(images, labels, self.mixer.smooth_only(labels))
        return MicroBatch(images, labels, None)

    def loss(
        self, out: Any, mb: MicroBatch, teacher_logits: Tensor | None, drw: bool
    ) -> dict[str, Tensor]:
        return self.objective(out, mb.targets, mb.labels, teacher_logits, drw)

    def predict(self, model: Model, images: Tensor) -> dict[str, Tensor]:
        from deitlt_scale.models.student import head_logits

        return head_logits(model(images, heads=True))


class DeiTLTTask(_StudentTask):
    """The DeiT-LT student (CLS + DIST tokens) and its frozen teacher."""

    name = "deitlt"
    headline = "mean/mean_class"

    def __init__(self, cfg: Config, meta: DatasetMeta, device: torch.device | None = None) -> None:
        super().__init__(cfg, meta)
        self.teacher_info: TeacherInfo | None = None
        if device is not None and cfg.distill.type != "none":
            self.teacher, self.teacher_info = load_frozen_teacher(cfg, meta, device)

    def loss(
        self, out: Any, mb: MicroBatch, teacher_logits: Tensor | None, drw: bool
    ) -> dict[str, Tensor]:
        parts = super().loss(out, mb, teacher_logits, drw)
        # The paper's expert-divergence signal (Fig. 4a plots 1 - this).
        parts["cls_dist_cosine"] = F.cosine_similarity(
            out.cls_feat.float(), out.dist_feat.float(), dim=-1
        ).mean()
        return parts


class ViTTask(_StudentTask):
    """The plain ViT baseline: a CLS token only, trained on the ground truth, no teacher."""

    name = "vit"
    headline = "cls/mean_class"

    def __init__(self, cfg: Config, meta: DatasetMeta, device: torch.device | None = None) -> None:
        super().__init__(cfg, meta)

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        if cfg.distill.type != "none":
            raise ConfigError(
                f"model.distilled must be true for distill.type={cfg.distill.type} (the DIST token "
                "learns from the teacher); set distill.type=none for the ViT baseline"
            )
        _check_bal_bce(cfg)

    def describe(self) -> str:
        return f"{self.name} (no DIST token), teacher none"


def _check_bal_bce(cfg: Config) -> None:
    d = cfg.distill
    if d.type == "none" and d.cls_loss == "bal_bce" and d.drw_epoch is not None:
        raise ConfigError(
            "distill.cls_loss=bal_bce with distill.drw_epoch: without a teacher DRW would "
            "re-weight the CLS loss, which balanced BCE already balances; set "
            "distill.drw_epoch=null"
        )


def load_frozen_teacher(
    cfg: Config, meta: DatasetMeta, device: torch.device
) -> tuple[TeacherRunner, TeacherInfo]:
    """The frozen teacher on the student's device, outside the engine, fed as training feeds it."""
    from deitlt_scale.models.teacher_file import load_teacher
    from deitlt_scale.models.teacher_runner import TeacherRunner

    t = cfg.teacher
    if not t.path:
        raise ConfigError(
            f"teacher.path is empty but distill.type={cfg.distill.type}; give a teacher file "
            "(deitlt teacher train|import) or set distill.type=none"
        )
    dtype = torch.bfloat16 if t.dtype == "bf16" else torch.float32
    teacher, info = load_teacher(t.path, device, dtype, t.channels_last)
    if info.num_classes != meta.num_classes:
        raise UserError(
            f"teacher {t.path} predicts {info.num_classes} classes but {cfg.data.shards} "
            f"has {meta.num_classes}; use a teacher trained on this dataset"
        )
    identity_map = list(meta.class_map) == list(range(meta.num_classes))
    if info.label_space == "original" and not t.map_targets and not identity_map:
        raise ConfigError(
            f"teacher.map_targets must be true: {t.path} predicts original labels and "
            f"{cfg.data.shards} re-orders classes by frequency"
        )
    if info.label_space == "model" and t.map_targets:
        raise ConfigError(
            f"teacher.map_targets must be false: {t.path} already predicts model labels"
        )
    if t.compile:
        teacher = torch.compile(teacher)
    runner = TeacherRunner(
        teacher,
        info.input_size,
        dtype,
        t.channels_last,
        t.side_stream,
        # The teacher sees the student's batch re-normalised to its own statistics.
        student_mean=cfg.data.mean,
        student_std=cfg.data.std,
        teacher_mean=info.mean,
        teacher_std=info.std,
    )
    return runner, info
