"""The reference input pipeline, for comparison only: torch DataLoader + webdataset + PIL + timm.

It runs the paper's recipe the way the original code does (timm ``create_transform`` with
``rand-m9-mstd0.5-inc1``, random erasing p=0.25 pixel mode, bicubic) on the same shards, so the
DALI pipeline's throughput (``deitlt bench data``) and augmentation statistics (tests) can be
measured against it. Training never uses it.

timm's RandAugment draws from the global ``random``/``numpy`` generators; each worker seeds them
from the loader seed and its worker id.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from deitlt_scale.config import DataConfig
from deitlt_scale.data.loader import Batch


def timm_auto_augment(cfg: DataConfig) -> str | None:
    """The timm auto-augment string for the configured RandAugment (None when off)."""
    a = cfg.augment
    if a.randaugment_ops <= 0:
        return None
    spec = f"rand-m{a.randaugment_magnitude}-mstd0.5-inc1"
    return spec if a.randaugment_ops == 2 else f"{spec}-n{a.randaugment_ops}"


def reference_transform(cfg: DataConfig):
    """timm's train transform with this config's recipe: PIL image -> normalised CHW tensor."""
    from timm.data import create_transform

    a = cfg.augment
    return create_transform(
        input_size=cfg.image_size,
        is_training=True,
        scale=tuple(a.scale),
        ratio=tuple(a.ratio),
        hflip=a.hflip,
        vflip=0.0,
        color_jitter=0.0,  # the recipe has none (timm drops it whenever RandAugment is on)
        auto_augment=timm_auto_augment(cfg),
        interpolation="bicubic",
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        re_prob=a.random_erasing,
        re_mode="pixel",
        re_count=1,
    )


class ReferenceLoader:
    """Endless stream of train batches from ``tars`` (single process group, no rank split)."""

    def __init__(
        self,
        tars: Sequence[str | Path],
        cfg: DataConfig,
        batch_size: int,
        num_workers: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.tars = [str(t) for t in tars]
        self.cfg = cfg
        self.batch_size = batch_size
        # A worker without a shard of its own would give nothing, and the DataLoader would wait
        # for it forever.
        self.num_workers = min(num_workers, len(self.tars))
        self.seed = seed
        self.device = torch.device(device)

    def _dataset(self):
        import webdataset as wds

        transform = reference_transform(self.cfg)
        return (
            wds.WebDataset(
                self.tars,
                shardshuffle=len(self.tars),
                seed=self.seed,
                nodesplitter=None,
                empty_check=False,
            )
            .shuffle(self.cfg.shuffle_buffer)
            .decode("pil")
            .to_tuple("jpg", "cls")
            .map_tuple(transform, int)
            .repeat()  # endless, so every batch is full: callers take as many as they need
        )

    def _seed_worker(self, worker_id: int) -> None:
        value = self.seed * 1000 + worker_id
        random.seed(value)
        np.random.seed(value % 2**32)
        torch.manual_seed(value)

    def __iter__(self) -> Iterator[Batch]:
        if self.num_workers == 0:
            self._seed_worker(0)
        loader = torch.utils.data.DataLoader(
            self._dataset(),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            worker_init_fn=self._seed_worker,
            persistent_workers=False,
            pin_memory=self.device.type == "cuda",
        )
        for images, labels in loader:
            yield Batch(
                images.to(self.device, non_blocking=True),
                labels.to(torch.int64).to(self.device, non_blocking=True),
            )
