"""Synthetic inputs of `deitlt bench step`: an in-memory long-tailed dataset description,
device-resident random batches and a random-weight teacher file. Throughput does not depend on
pixel values or teacher weights, so none of these needs a real dataset or a trained teacher."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

SYNTHETIC_POOL = 2  # distinct device-resident batches, used in turn


class DeviceBatch(NamedTuple):
    """What the trainer reads from a batch: normalised images (B, 3, H, W) and labels (B,)."""

    images: Any
    labels: Any


def synthetic_meta(num_classes: int, train_samples: int):
    """An in-memory :class:`~deitlt_scale.data.meta.DatasetMeta` for ``num_classes`` classes with
    a long-tailed count profile (ImageNet-LT-like, 1280 down to 5) and ``train_samples`` images
    per epoch; it names no shards (for ``Trainer(..., meta=...).build(with_data=False)``)."""
    from deitlt_scale.data.longtail import (
        groups_by_count,
        groups_by_index,
        lt_counts,
        paper_boundaries,
    )
    from deitlt_scale.data.meta import DatasetMeta

    counts = [max(1, n) for n in lt_counts(1280, num_classes, 256.0)]
    boundaries = paper_boundaries("synthetic", counts)
    return DatasetMeta(
        dataset="synthetic",
        num_classes=num_classes,
        train_counts=counts,
        eval_counts=[1] * num_classes,
        class_map=list(range(num_classes)),
        class_names=[""] * num_classes,
        groups={
            "paper": groups_by_index(num_classes, boundaries),
            "count": groups_by_count(counts),
        },
        boundaries=boundaries,
        imbalance_factor=counts[0] / counts[-1],
        splits={
            "train": {"num_samples": train_samples, "shards": []},
            "eval": {"num_samples": num_classes, "shards": []},
        },
    )


def write_random_teacher(directory: Path, arch: str, num_classes: int, input_size: int) -> Path:
    """A teacher file (seeded random weights) that the trainer loads like a real one."""
    import torch

    from deitlt_scale.models.teacher_file import TeacherInfo, save_teacher
    from deitlt_scale.models.teachers import create_teacher_arch

    torch.manual_seed(0)
    model = create_teacher_arch(arch, num_classes)
    info = TeacherInfo(arch, num_classes, input_size, label_space="model", source="random")
    return save_teacher(directory, model, info)


def synthetic_batches(
    batch: int, image_size: int, num_classes: int, device
) -> Iterator[DeviceBatch]:
    """Endless batches from a pool of :data:`SYNTHETIC_POOL` device-resident random batches."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    pool = [
        DeviceBatch(
            torch.randn(batch, 3, image_size, image_size, generator=gen).to(device),
            torch.randint(0, num_classes, (batch,), generator=gen).to(device),
        )
        for _ in range(SYNTHETIC_POOL)
    ]
    i = 0
    while True:
        yield pool[i % len(pool)]
        i += 1
