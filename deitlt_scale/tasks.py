"""What a run trains: one :class:`Task` per kind of run.

A task owns everything that differs between kinds of run, so the trainer, the engine factories and
the commands never ask which kind they are running:

* the network it trains (:meth:`Task.build_model`) and its description for export and analysis
  (:meth:`Task.model_spec`, written to ``RUN_DIR/<spec_file>``);
* the frozen teacher it learns from, if any (:attr:`Task.teacher`, outside the DeepSpeed engine);
* the *targets rule* (:meth:`Task.inputs`): which images and which targets a micro-batch trains
  on (mixing, label smoothing, the DRW phase's switch to hard labels);
* the objective (:meth:`Task.loss`), returning named, already-scaled components for logging;
* what evaluation scores (:meth:`Task.predict`) and the headline metric that selects the best
  checkpoint (:attr:`Task.headline`).

Kinds (chosen by :func:`task_class` from ``train.task`` and ``model.distilled``):

=============== ==================================================================================
``deitlt``      the DeiT-LT student: CLS head vs the (mixed, smoothed) ground truth, DIST head vs
                the teacher's hard label on the same augmented, mixed batch, DRW on DIST
``vit``         the plain ViT baseline: CLS token only, no teacher
``teacher``     a CNN teacher trained with LDAM or CE (optionally DRW), on unmixed images
``paco``        a CNN teacher trained with PaCo (``paco.enabled``): the MoCo container on two
                views of each image, saved as the plain classifier network students load
=============== ==================================================================================

A step runs :meth:`Task.forward` (the engine's forward, twice under SAM: ``again=True`` the
second time), :meth:`Task.loss`, and after the engine's step :meth:`Task.after_micro_step`
(PaCo's queue takes the batch's keys there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deitlt_scale.config import Config
from deitlt_scale.errors import UserError
from deitlt_scale.strict import ConfigError

if TYPE_CHECKING:
    from deitlt_scale.data.loader import Batch
    from deitlt_scale.data.meta import DatasetMeta
    from deitlt_scale.models.teacher_file import TeacherInfo
    from deitlt_scale.models.teacher_runner import TeacherRunner

Model = Any  # an nn.Module or a DeepSpeed engine wrapping one: anything ``model(x)`` runs


@dataclass
class MicroBatch:
    """What one micro-batch trains on, after the task's targets rule."""

    images: Tensor  # (B, 3, H, W), mixed when the rule mixes
    labels: Tensor  # (B,) ground-truth model labels of the unmixed samples
    targets: Tensor | None  # (B, K) soft targets (mixed and/or smoothed); None: hard labels
    key_images: Tensor | None = None  # (B, 3, H, W) the second view (PaCo's keys), if any


class Task:
    """The interface the trainer is written against; see the module docstring."""

    name: ClassVar[str]
    command: ClassVar[str]  # the CLI verb that trains this kind of run
    spec_file: ClassVar[str]  # RUN_DIR file describing the trained network
    # The eval metric that selects the best checkpoint: a head's mean per-class accuracy, which
    # is its overall accuracy on a balanced split and stays fair on an imbalanced val split.
    headline: ClassVar[str]
    teacher: TeacherRunner | None = None

    def __init__(self, cfg: Config, meta: DatasetMeta) -> None:
        self.cfg, self.meta = cfg, meta
        self.num_classes = meta.num_classes

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Config rules of this kind of run (see :func:`check`); raises :class:`ConfigError`."""
        if cfg.optim.sam_rho > 0:
            raise ConfigError(
                f"optim.sam_rho > 0 needs train.task=teacher (SAM trains CNN teachers), got a "
                f"{cls.name} run"
            )
        if cfg.paco.enabled:
            raise ConfigError(f"paco.enabled needs train.task=teacher, got a {cls.name} run")

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def model_spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def train_views(self) -> Any:
        """The train loader's two-view setting (:class:`deitlt_scale.data.dali.ContrastViews`),
        or None: one augmented image per sample."""
        return None

    def inputs(self, batch: Batch, seed: int, drw: bool) -> MicroBatch:
        raise NotImplementedError

    def forward(self, model: Model, mb: MicroBatch, dtype: torch.dtype, again: bool = False) -> Any:
        """The training forward of ``mb``; ``again``: SAM's second pass over the same batch."""
        return model(mb.images.to(dtype))

    def after_micro_step(self, model: Model, out: Any, mb: MicroBatch) -> None:
        """Called after the engine's step of each micro-batch (state outside the gradient)."""

    def loss(
        self, out: Any, mb: MicroBatch, teacher_logits: Tensor | None, drw: bool
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict(self, model: Model, images: Tensor) -> dict[str, Tensor]:
        """Logits per reported head, in eval mode; ``model`` may be a DeepSpeed engine (its
        forward runs, so ZeRO-3 gathers the parameters)."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name}, teacher {self.cfg.teacher.path or 'none'}"

    def save_outputs(self, module: nn.Module, run_dir: Any) -> Any:
        """Write what the finished run hands on (e.g. a teacher file); returns its path or None."""
        return None


# --------------------------------------------------------------------------------------------
# Students


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

    def describe(self) -> str:
        return f"{self.name} (no DIST token), teacher none"


# --------------------------------------------------------------------------------------------
# Teachers


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


# --------------------------------------------------------------------------------------------
# Choosing and building


TASKS: dict[str, type[Task]] = {t.name: t for t in (DeiTLTTask, ViTTask, TeacherTask, PaCoTask)}


def task_class(cfg: Config) -> type[Task]:
    """The kind of run a config describes: ``train.task`` (with ``paco.enabled`` for teachers)
    and, for students, the DIST token."""
    if cfg.train.task == "teacher":
        return PaCoTask if cfg.paco.enabled else TeacherTask
    return DeiTLTTask if cfg.model.distilled else ViTTask


def check(cfg: Config) -> type[Task]:
    """The kind of run ``cfg`` describes, after the config rules of that kind (one-line
    :class:`ConfigError`); every command that builds a run calls it before anything else."""
    kind = task_class(cfg)
    kind.check(cfg)
    return kind


def create(cfg: Config, meta: DatasetMeta, device: torch.device | None = None) -> Task:
    """The run's task; ``device=None`` builds it without loading a teacher (evaluation)."""
    return check(cfg)(cfg, meta, device)  # type: ignore[call-arg]


def require_command(cfg: Config, recipe: Any, command: str) -> type[Task]:
    """Check ``cfg`` (:func:`check`) and refuse a recipe handed to the wrong verb (a teacher
    recipe to ``deitlt train``)."""
    kind = check(cfg)
    if kind.command != command:
        raise UserError(
            f"{recipe} trains a {kind.name} (train.task={cfg.train.task}); run it with "
            f"`deitlt {kind.command}`"
        )
    return kind


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
