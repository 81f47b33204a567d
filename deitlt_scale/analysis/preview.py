"""``deitlt data preview``: what the student and its teacher train on, drawn before training.

The student's half is the first micro-batch of a run of the recipe, as the trainer builds it: the
project's train loader (DALI, the recipe's augmentation), the task's targets rule (Mixup/CutMix
with the trainer's seed of step 0) and the frozen teacher's label on each mixed image. Each image
is captioned with its own label, the label mixed into it and its weight, and the teacher's
label, green when the teacher names one of the two, red when it names neither. The teacher's
half is the first micro-batch of the teacher's own recipe (the ``config.yaml`` of the run that
wrote the teacher file, or ``--teacher-recipe``) on the same data. An augmentation that destroys
the content shows as a red grid before any training time is spent on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deitlt_scale.config import Config


@dataclass
class PreviewBatch:
    images: np.ndarray  # (B, H, W, 3) in [0, 1]
    labels: list[int]
    partners: list[int | None]  # the label mixed into each image (None: unmixed)
    weight: float  # the image's own share (lambda); 1 when unmixed
    teacher: list[int | None]  # the teacher's label per image (None: no teacher)


def _pixels(images: torch.Tensor, mean, std) -> np.ndarray:
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return (images.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _first_batch(cfg: Config, meta, count: int):
    from deitlt_scale.data.loader import TrainLoader

    loader = TrainLoader(
        meta, cfg.data, count, 1, rank=0, world_size=1, seed=cfg.train.seed,
        device=torch.device("cpu"),
    )  # fmt: skip
    return next(iter(loader.epoch(0)))


def student_batch(cfg: Config, meta, count: int) -> PreviewBatch:
    """The first ``count`` images of step 0 as the student trains on them."""
    from deitlt_scale import tasks
    from deitlt_scale.engine.trainer import mix_seed

    cfg.train.micro_batch = count
    batch = _first_batch(cfg, meta, count)
    task = tasks.create(cfg, meta, torch.device("cpu"))
    seed = mix_seed(cfg.train.seed, 0, 0, 0)
    mb = task.inputs(batch, seed, drw=False)
    labels = mb.labels.tolist()
    weight, partners = 1.0, [None] * len(labels)
    mixer = getattr(task, "mixer", None)
    if mb.targets is not None and mixer is not None and mixer.enabled:
        weight = mixer.draw(seed, *mb.images.shape[-2:]).lam
        if weight < 1.0:
            partners = mb.labels.flip(0).tolist()
    teacher: list[int | None] = [None] * len(labels)
    if task.teacher is not None:
        with torch.no_grad():
            logits = task.teacher.launch(mb.images).wait()
        teacher = task.objective.teacher_labels(logits).tolist()
    images = _pixels(mb.images, cfg.data.mean, cfg.data.std)
    return PreviewBatch(images, labels, partners, weight, teacher)


def teacher_config(cfg: Config, teacher_recipe: str | None) -> Config | None:
    """The teacher's training config: ``teacher_recipe``, else the ``config.yaml`` beside the
    teacher file (``RUN_DIR/teacher`` -> ``RUN_DIR/config.yaml``); None when neither exists."""
    from deitlt_scale import config as config_mod

    if teacher_recipe is not None:
        return config_mod.load(teacher_recipe)
    if cfg.teacher.path:
        saved = Path(cfg.teacher.path).parent / "config.yaml"
        if saved.is_file():
            return config_mod.load(saved)
    return None


def teacher_batch(teacher_cfg: Config, shards: str, meta, count: int) -> PreviewBatch:
    """The first ``count`` images of the teacher's recipe on ``shards``."""
    teacher_cfg.data.shards = shards
    batch = _first_batch(teacher_cfg, meta, count)
    images = _pixels(batch.images, teacher_cfg.data.mean, teacher_cfg.data.std)
    labels = batch.labels.tolist()
    return PreviewBatch(images, labels, [None] * len(labels), 1.0, [None] * len(labels))


def summary(batch: PreviewBatch) -> str:
    """How often the teacher's label is the image's own, or one of the mixed-in labels."""
    pairs = [
        (t, y, p) for t, y, p in zip(batch.teacher, batch.labels, batch.partners) if t is not None
    ]
    if not pairs:
        return "no teacher: nothing to compare"
    own = sum(t == y for t, y, _ in pairs)
    either = sum(t in (y, p) for t, y, p in pairs)
    return (
        f"teacher's label = the image's own label on {own} of {len(pairs)} images, one of the "
        f"labels mixed into it on {either} of {len(pairs)} (own weight {batch.weight:.2f})"
    )


def draw(student: PreviewBatch, teacher: PreviewBatch | None, names: list[str], title: str):
    """The two grids in one figure."""
    from deitlt_scale.analysis.plots import figure

    columns = 8
    s_rows = -(-len(student.labels) // columns)
    t_rows = 0 if teacher is None else -(-len(teacher.labels) // columns)
    fig = figure(1.45 * columns, 1.75 * (s_rows + t_rows) + 0.9)
    fig.suptitle(title, fontsize=9)
    grid = fig.add_gridspec(s_rows + t_rows, columns)
    for i, image in enumerate(student.images):
        ax = fig.add_subplot(grid[i // columns, i % columns])
        ax.imshow(image, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        y, p, t = student.labels[i], student.partners[i], student.teacher[i]
        text = names[y] if p is None else f"{names[y]} {student.weight:.2f} + {names[p]}"
        colour = "black"
        if t is not None:
            text += f"\nteacher: {names[t]}"
            colour = "tab:green" if t in (y, p) else "tab:red"
        ax.set_title(text, fontsize=7, color=colour)
        if i == 0:
            ax.set_ylabel("student", fontsize=8)
    for i, image in enumerate([] if teacher is None else teacher.images):
        ax = fig.add_subplot(grid[s_rows + i // columns, i % columns])
        ax.imshow(image, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(names[teacher.labels[i]], fontsize=7)
        if i == 0:
            ax.set_ylabel("teacher", fontsize=8)
    return fig
