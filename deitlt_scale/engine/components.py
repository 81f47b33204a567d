"""Factories that turn config sections into the trainer's parts. Each gets its own sub-config
(plus the dataset meta where class counts matter); the cross-section checks live here."""

from __future__ import annotations

from typing import Any

import torch

from deitlt_scale.config import Config, ConfigError, Steps
from deitlt_scale.data.meta import DatasetMeta
from deitlt_scale.engine.distributed import World
from deitlt_scale.errors import UserError


def peak_lr(cfg: Config, world_size: int) -> float:
    from deitlt_scale.optim import peak_lr as scaled

    return scaled(cfg.optim, cfg.train.micro_batch, world_size)


def model_spec(cfg: Config, meta: DatasetMeta) -> dict[str, Any]:
    """What export and analysis need to rebuild the trained network (RUN_DIR/student.json)."""
    if cfg.train.task == "teacher":
        return {"architecture": cfg.model.arch, "model_args": {}, "num_classes": meta.num_classes}
    from deitlt_scale.models.student import student_spec

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


def build_model(cfg: Config, meta: DatasetMeta) -> torch.nn.Module:
    if cfg.train.task == "teacher":
        from deitlt_scale.models.teachers import create_teacher_arch

        normed = cfg.distill.teacher_loss == "ldam"
        return create_teacher_arch(cfg.model.arch, meta.num_classes, normed=normed)
    from deitlt_scale.models.student import create_student

    return create_student(cfg.model, meta.num_classes, cfg.data.image_size)


def build_engine(
    model: torch.nn.Module, cfg: Config, ds_config: dict, lr: float, device: torch.device
) -> Any:
    import deepspeed

    from deitlt_scale.optim import build_optimizer

    optimizer = build_optimizer(
        model, cfg.optim, lr, fused=cfg.optim.fused and device.type == "cuda"
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def build_teacher(cfg: Config, meta: DatasetMeta, device: torch.device) -> tuple[Any, Any]:
    """The frozen teacher on the student's device, outside the engine, as a
    :class:`~deitlt_scale.models.teacher_runner.TeacherRunner`; (None, None) without one."""
    if cfg.train.task == "teacher" or cfg.distill.type == "none" or not cfg.teacher.path:
        if cfg.train.task == "student" and cfg.distill.type != "none" and not cfg.teacher.path:
            raise ConfigError(
                f"teacher.path is empty but distill.type={cfg.distill.type}; give a teacher file "
                "(deitlt teacher train|import) or set distill.type=none"
            )
        return None, None
    from deitlt_scale.models.teacher_file import load_teacher
    from deitlt_scale.models.teacher_runner import TeacherRunner

    dtype = torch.bfloat16 if cfg.teacher.dtype == "bf16" else torch.float32
    teacher, info = load_teacher(cfg.teacher.path, device, dtype, cfg.teacher.channels_last)
    if info.num_classes != meta.num_classes:
        raise UserError(
            f"teacher {cfg.teacher.path} predicts {info.num_classes} classes but {cfg.data.shards} "
            f"has {meta.num_classes}; use a teacher trained on this dataset"
        )
    identity_map = list(meta.class_map) == list(range(meta.num_classes))
    if info.label_space == "original" and not cfg.teacher.map_targets and not identity_map:
        raise ConfigError(
            f"teacher.map_targets must be true: {cfg.teacher.path} predicts original labels and "
            f"{cfg.data.shards} re-orders classes by frequency"
        )
    if info.label_space == "model" and cfg.teacher.map_targets:
        raise ConfigError(
            f"teacher.map_targets must be false: {cfg.teacher.path} already predicts model labels"
        )
    if cfg.teacher.compile:
        teacher = torch.compile(teacher)
    runner = TeacherRunner(
        teacher,
        info.input_size,
        dtype,
        cfg.teacher.channels_last,
        cfg.teacher.side_stream,
        student_mean=cfg.data.mean,
        student_std=cfg.data.std,
        teacher_mean=info.mean,
        teacher_std=info.std,
    )
    return runner, info


def build_objective(cfg: Config, meta: DatasetMeta) -> Any:
    if cfg.train.task == "teacher":
        from deitlt_scale.losses import teacher_objective

        return teacher_objective(cfg.distill, meta.train_counts)
    from deitlt_scale.losses import DeiTLTObjective

    class_map = meta.class_map if cfg.teacher.map_targets else None
    return DeiTLTObjective(cfg.distill, meta.train_counts, class_map=class_map)


def build_mixer(cfg: Config, num_classes: int) -> Any:
    from deitlt_scale.data.mixing import Mixer

    return Mixer(cfg.data.mixup, num_classes)


def build_loaders(cfg: Config, meta: DatasetMeta, steps: Steps, world: World) -> tuple[Any, Any]:
    from deitlt_scale.data.loader import EvalLoader, TrainLoader

    train = TrainLoader(
        meta,
        cfg.data,
        micro_batch=cfg.train.micro_batch,
        micro_batches_per_epoch=steps.micro_batches_per_epoch,
        rank=world.rank,
        world_size=world.world_size,
        seed=cfg.train.seed,
        device=world.device,
    )
    evaluation = EvalLoader(
        meta,
        cfg.data,
        micro_batch=cfg.eval.micro_batch,
        rank=world.rank,
        world_size=world.world_size,
        device=world.device,
    )
    return train, evaluation
