"""The task contract the trainer is written against (see :mod:`deitlt_scale.tasks`): the
micro-batch a targets rule makes, and the :class:`Task` interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from deitlt_scale.config import Config
from deitlt_scale.strict import ConfigError

if TYPE_CHECKING:
    from deitlt_scale.data.loader import Batch
    from deitlt_scale.data.meta import DatasetMeta
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

    # Whether evaluation counts per-class hits of :meth:`predict`; a task without classes
    # (MAE pre-training) measures a split with :meth:`evaluate_split` instead.
    classifies: ClassVar[bool] = True

    def evaluate_split(self, model: Model, batches: Any, world: Any) -> dict[str, float]:
        """The figures of one split for a task that does not classify (all ranks)."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name}, teacher {self.cfg.teacher.path or 'none'}"

    def save_outputs(self, module: nn.Module, run_dir: Any) -> Any:
        """Write what the finished run hands on (e.g. a teacher file); returns its path or None."""
        return None
