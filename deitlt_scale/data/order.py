"""`deitlt data order`: which sample every rank trains on at every position, epoch by epoch.

For each simulated rank the real train loader of the recipe is built; its epochs are run (DALI
decodes and augments; no model) and the stored index carried by each batch gives the sample key,
or, with ``decode=False``, the loader's plan for the epoch is read (what it feeds DALI, without
decoding). One row per trained image: epoch, optimizer step (global, 0-based), micro-batch
(within the epoch), rank, position in the micro-batch, sample key.

Per epoch: the distinct images, the mean copies per image, the optimizer steps, and the Spearman
correlation between the positions of the samples the epoch shares with the previous one (a
sample's position: the index of its first image in the epoch's (micro-batch, rank, position)
order). An exact reshuffle gives correlations near 0 (within about ``1 / sqrt(shared)``).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deitlt_scale.config import Config
from deitlt_scale.data.meta import DatasetMeta
from deitlt_scale.steps import resolve_steps

COLUMNS = ("epoch", "step", "micro_batch", "rank", "position", "key")


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    images: int  # images trained on, all ranks
    distinct: int  # distinct samples among them
    steps: int  # optimizer steps
    correlation: float | None  # Spearman with the previous epoch; None for the first

    @property
    def copies(self) -> float:
        return self.images / self.distinct

    def line(self) -> str:
        rho = "n/a" if self.correlation is None else f"{self.correlation:+.3f}"
        return (
            f"epoch {self.epoch}: {self.distinct} distinct images, {self.copies:.2f} copies per "
            f"image, {self.steps} optimizer steps, position Spearman vs previous epoch {rho}"
        )


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equally long arrays without ties."""
    if len(a) < 2:
        return float("nan")
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def first_positions(order: np.ndarray) -> dict[int, int]:
    """Sample -> index of its first occurrence in ``order``."""
    samples, first = np.unique(order, return_index=True)
    return dict(zip(samples.tolist(), first.tolist()))


def position_correlation(previous: np.ndarray, current: np.ndarray) -> float:
    """Spearman correlation of the first positions of the samples two epochs share."""
    before, after = first_positions(previous), first_positions(current)
    shared = sorted(set(before) & set(after))
    return spearman(np.array([before[s] for s in shared]), np.array([after[s] for s in shared]))


class EpochOrders:
    """The train loaders of every simulated rank, and what each yields per epoch."""

    def __init__(self, cfg: Config, meta: DatasetMeta, world_size: int, decode: bool) -> None:
        from deitlt_scale.data.loader import TrainLoader, resolve_backend

        self.steps = resolve_steps(cfg, meta.num_samples("train"), world_size)
        self.grad_accum = cfg.train.grad_accum
        self.decode = decode
        device = torch.device("cuda" if resolve_backend(cfg.data.device) == "gpu" else "cpu")
        self.loaders = [
            TrainLoader(
                meta,
                cfg.data,
                micro_batch=cfg.train.micro_batch,
                micro_batches_per_epoch=self.steps.micro_batches_per_epoch,
                rank=rank,
                world_size=world_size,
                seed=cfg.train.seed,
                device=device,
            )
            for rank in range(world_size)
        ]

    def per_rank(self, epoch: int) -> list[list[np.ndarray]]:
        """[rank][micro-batch] -> stored sample index of each image."""
        if not self.decode:
            return [loader.epoch_samples(epoch) for loader in self.loaders]
        return [[batch.samples.numpy() for batch in loader.epoch(epoch)] for loader in self.loaders]

    def rows(self, epoch: int, per_rank: list[list[np.ndarray]]) -> Iterator[tuple]:
        """CSV rows of ``epoch`` in (micro-batch, rank, position) order."""
        key = self.loaders[0].key
        first_step = epoch * self.steps.steps_per_epoch
        for micro in range(self.steps.micro_batches_per_epoch):
            step = first_step + micro // self.grad_accum
            for rank, batches in enumerate(per_rank):
                for position, sample in enumerate(batches[micro].tolist()):
                    yield (epoch, step, micro, rank, position, key(sample))


def flatten(per_rank: list[list[np.ndarray]]) -> np.ndarray:
    """The epoch's images in (micro-batch, rank, position) order."""
    micro_batches = len(per_rank[0])
    return np.concatenate(
        [per_rank[r][j] for j in range(micro_batches) for r in range(len(per_rank))]
    )


def write_order(
    cfg: Config,
    meta: DatasetMeta,
    world_size: int,
    epochs: int,
    out: Path,
    decode: bool = True,
    first_epoch: int = 0,
) -> list[EpochStats]:
    """Write the CSV of ``epochs`` epochs from ``first_epoch``; return each epoch's figures."""
    orders = EpochOrders(cfg, meta, world_size, decode)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats: list[EpochStats] = []
    previous: np.ndarray | None = None
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for epoch in range(first_epoch, first_epoch + epochs):
            per_rank = orders.per_rank(epoch)
            writer.writerows(orders.rows(epoch, per_rank))
            order = flatten(per_rank)
            rho = None if previous is None else position_correlation(previous, order)
            stats.append(
                EpochStats(
                    epoch, len(order), len(np.unique(order)), orders.steps.steps_per_epoch, rho
                )
            )
            previous = order
    return stats


__all__ = [
    "COLUMNS",
    "EpochOrders",
    "EpochStats",
    "first_positions",
    "position_correlation",
    "spearman",
    "write_order",
]
