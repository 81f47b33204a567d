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

from typing import Any

import torch

from deitlt_scale.config import Config
from deitlt_scale.errors import UserError
from deitlt_scale.tasks.base import MicroBatch, Model, Task
from deitlt_scale.tasks.pretrain import MAETask
from deitlt_scale.tasks.students import DeiTLTTask, ViTTask, load_frozen_teacher
from deitlt_scale.tasks.teachers import PaCoTask, TeacherTask

TASKS: dict[str, type[Task]] = {
    t.name: t for t in (DeiTLTTask, ViTTask, TeacherTask, PaCoTask, MAETask)
}


def task_class(cfg: Config) -> type[Task]:
    """The kind of run a config describes: ``train.task`` (with ``paco.enabled`` for teachers)
    and, for students, the DIST token."""
    if cfg.train.task == "teacher":
        return PaCoTask if cfg.paco.enabled else TeacherTask
    if cfg.train.task == "pretrain":
        return MAETask
    return DeiTLTTask if cfg.model.distilled else ViTTask


def check(cfg: Config) -> type[Task]:
    """The kind of run ``cfg`` describes, after the config rules of that kind (one-line
    :class:`ConfigError`); every command that builds a run calls it before anything else."""
    kind = task_class(cfg)
    kind.check(cfg)
    return kind


def create(cfg: Config, meta: Any, device: torch.device | None = None) -> Task:
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


__all__ = [
    "TASKS",
    "DeiTLTTask",
    "MAETask",
    "MicroBatch",
    "Model",
    "PaCoTask",
    "Task",
    "TeacherTask",
    "ViTTask",
    "check",
    "create",
    "load_frozen_teacher",
    "require_command",
    "task_class",
]
