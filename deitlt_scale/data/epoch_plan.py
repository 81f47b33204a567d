"""Which training samples each rank reads in each micro-batch of an epoch: the reference's sampler.

The reference (``RASampler(num_repeats=3)``, METHOD.md 1.6) draws a permutation of the N training
samples per epoch, repeats every index ``repeats`` times consecutively, deals the list out to the
ranks with a stride and truncates each rank to ``floor(floor(N / 256) * 256 / world)`` samples.
Its micro-batch ``j`` therefore trains, over all ranks together, on positions
``[world * B * j, world * (B * j + b_j))`` of the repeated list (``B`` the micro-batch, ``b_j`` its
size on every rank: ``B`` but for a smaller last one), and its optimizer steps on consecutive runs
of those micro-batches.

:func:`epoch_plan` reproduces exactly that global sequence and those per-micro-batch sets, as a
pure function of ``(seed, epoch)`` (the permutation's generator is seeded from both; all ranks
compute the same one). Inside one micro-batch the split over ranks is free (gradients are summed
over ranks), so each rank takes a contiguous part of the micro-batch's slice: the copies of an
image then mostly sit on one rank, where it is read and decoded once and augmented ``repeats``
times. An image whose copies straddle a rank's or a micro-batch's boundary is read once per
piece; one whose copies straddle an optimizer step's boundary trains in both steps, as in the
reference (its steps hold ``world * B * grad_accum`` samples, rarely a multiple of ``repeats``).

A rank's micro-batch is a list of *entries* ``(sample, copies)``; :class:`MicroBatch` also fixes
the order of its images: a random permutation (seeded by ``(seed, epoch, micro-batch, rank)``),
so that mixup, which pairs image ``i`` with image ``B - 1 - i``, gives each copy its own partner
instead of pairing neighbouring copies with copies of one other image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deitlt_scale.data.seeds import derive_seed
from deitlt_scale.steps import samples_per_rank


@dataclass(frozen=True)
class MicroBatch:
    """One rank's micro-batch: the samples to read and the order of their augmented copies.

    ``samples[e]`` (stored sample index) is read once and augmented ``copies[e]`` times;
    ``order`` lists, for each output position, the flat index ``e * repeats + c`` of copy ``c``
    of entry ``e`` in the augmented ``(entries, repeats)`` grid.
    """

    samples: np.ndarray  # (entries,) int64
    copies: np.ndarray  # (entries,) int64, each in 1..repeats
    order: np.ndarray  # (size,) int64 indices into the flattened (entries, repeats) grid
    repeats: int

    @property
    def size(self) -> int:
        return len(self.order)

    def positions(self) -> np.ndarray:
        """(size,) stored sample index of each output position."""
        return self.samples[self.order // self.repeats]


@dataclass(frozen=True)
class EpochLayout:
    """Sizes of an epoch on every rank (identical on all ranks)."""

    num_samples: int  # N, the training split
    world_size: int
    micro_batch: int
    repeats: int
    multiple: int

    @property
    def per_rank(self) -> int:
        return samples_per_rank(self.num_samples, self.world_size, self.multiple)

    @property
    def micro_batches(self) -> int:
        return -(-self.per_rank // self.micro_batch)

    def micro_batch_size(self, index: int) -> int:
        """Images per rank in micro-batch ``index`` of the epoch."""
        if not 0 <= index < self.micro_batches:
            raise ValueError(f"micro-batch {index} outside [0, {self.micro_batches})")
        return min(self.micro_batch, self.per_rank - index * self.micro_batch)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of the stored sample indices (the same on every rank)."""
    generator = torch.Generator().manual_seed(derive_seed("epoch-order", seed, epoch))
    return torch.randperm(num_samples, generator=generator).numpy()


def global_sequence(layout: EpochLayout, seed: int, epoch: int) -> np.ndarray:
    """The epoch's samples in the reference's order, all ranks together: a permutation of N,
    each index repeated ``repeats`` times, cut to ``world * per_rank`` entries."""
    permutation = epoch_permutation(layout.num_samples, seed, epoch)
    return np.repeat(permutation, layout.repeats)[: layout.world_size * layout.per_rank]


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run-length encoding: (value of each run, its length)."""
    if len(values) == 0:
        return values.astype(np.int64), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    lengths = np.diff(np.r_[starts, len(values)])
    return values[starts].astype(np.int64), lengths.astype(np.int64)


def micro_batch_plan(
    layout: EpochLayout, sequence: np.ndarray, seed: int, epoch: int, index: int, rank: int
) -> MicroBatch:
    """Rank ``rank``'s part of micro-batch ``index`` of the epoch whose ``sequence`` is given."""
    size = layout.micro_batch_size(index)
    begin = layout.world_size * layout.micro_batch * index + rank * size
    samples, copies = _runs(sequence[begin : begin + size])
    # Copy c of entry e sits at e * repeats + c of the augmented grid; keep the existing copies.
    grid = (np.arange(len(samples))[:, None] * layout.repeats + np.arange(layout.repeats))[
        np.arange(layout.repeats)[None, :] < copies[:, None]
    ]
    rng = np.random.default_rng(derive_seed("micro-batch-order", seed, epoch, index, rank))
    return MicroBatch(samples, copies, rng.permutation(grid).astype(np.int64), layout.repeats)


def epoch_plan(layout: EpochLayout, seed: int, epoch: int, rank: int) -> list[MicroBatch]:
    """Every micro-batch rank ``rank`` reads in ``epoch``, in order."""
    sequence = global_sequence(layout, seed, epoch)
    return [
        micro_batch_plan(layout, sequence, seed, epoch, j, rank)
        for j in range(layout.micro_batches)
    ]


__all__ = [
    "EpochLayout",
    "MicroBatch",
    "epoch_permutation",
    "epoch_plan",
    "global_sequence",
    "micro_batch_plan",
]
