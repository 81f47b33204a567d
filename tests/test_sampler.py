"""The epoch's sample order and step arithmetic against the reference sampler (METHOD.md 1.6).

Pure tests: no DALI. ``reference_rasampler`` is the reference's ``RASampler.__iter__``
(DeiT ``samplers.py``) given the epoch's permutation, followed by its DataLoader's batching.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from deitlt_scale import config
from deitlt_scale.config import REFERENCE_EPOCH_MULTIPLE
from deitlt_scale.data.epoch_plan import (
    EpochLayout,
    epoch_permutation,
    epoch_plan,
    global_sequence,
)
from deitlt_scale.steps import resolve_steps
from deitlt_scale.strict import ConfigError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def reference_rasampler(
    permutation: list[int], world: int, rank: int, repeats: int = 3
) -> list[int]:
    """RASampler.__iter__ of the reference, on a given permutation."""
    n = len(permutation)
    num_samples = math.ceil(n * repeats / world)
    total_size = num_samples * world
    num_selected = math.floor(n // 256 * 256 / world)
    indices = [i for i in permutation for _ in range(repeats)]
    indices += indices[: (total_size - len(indices))]
    indices = indices[rank:total_size:world]
    return indices[:num_selected]


def reference_micro_batches(
    permutation: list[int], world: int, micro_batch: int, repeats: int
) -> list[Counter]:
    """Per micro-batch index, the samples the reference trains on over all ranks (with
    multiplicity): each rank's DataLoader batches its sampler's list, drop_last=False."""
    per_rank = [reference_rasampler(permutation, world, r, repeats) for r in range(world)]
    count = math.ceil(len(per_rank[0]) / micro_batch)
    return [
        Counter(i for r in per_rank for i in r[j * micro_batch : (j + 1) * micro_batch])
        for j in range(count)
    ]


def plan_micro_batches(layout: EpochLayout, seed: int, epoch: int) -> list[Counter]:
    plans = [epoch_plan(layout, seed, epoch, r) for r in range(layout.world_size)]
    return [
        Counter(int(i) for plan in plans for i in plan[j].positions())
        for j in range(layout.micro_batches)
    ]


# --------------------------------------------------------------------------------------------
# The order


@pytest.mark.parametrize(
    ("n", "world", "micro_batch", "repeats"),
    [
        (12_406, 2, 128, 3),  # CIFAR-10-LT rho 100
        (13_996, 2, 128, 3),  # CIFAR-10-LT rho 50: a partial last step
        (12_608, 2, 128, 3),  # CIFAR-100-LT rho 50
        (115_846, 4, 128, 3),  # ImageNet-LT
        (1_000, 1, 48, 3),
        (3_000, 4, 40, 2),
    ],
)
def test_every_micro_batch_trains_on_the_reference_samplers_samples(
    n: int, world: int, micro_batch: int, repeats: int
) -> None:
    layout = EpochLayout(n, world, micro_batch, repeats, REFERENCE_EPOCH_MULTIPLE)
    permutation = epoch_permutation(n, seed=0, epoch=7).tolist()
    want = reference_micro_batches(permutation, world, micro_batch, repeats)
    got = plan_micro_batches(layout, seed=0, epoch=7)
    assert len(got) == len(want)
    assert got == want


def test_a_rank_trains_on_the_reference_count_in_micro_batches_of_the_reference_sizes() -> None:
    layout = EpochLayout(437_513, 4, 128, 3, REFERENCE_EPOCH_MULTIPLE)  # iNaturalist-2018
    plan = epoch_plan(layout, seed=0, epoch=0, rank=3)
    sizes = [mb.size for mb in plan]
    assert sum(sizes) == 109_376
    assert sizes == [128] * 854 + [64]


def test_each_drawn_image_is_trained_on_three_times_in_one_step_unless_it_straddles_two() -> None:
    n, world, micro_batch, accum = 12_406, 2, 128, 4
    layout = EpochLayout(n, world, micro_batch, 3, REFERENCE_EPOCH_MULTIPLE)
    plans = [epoch_plan(layout, seed=1, epoch=4, rank=r) for r in range(world)]
    steps: dict[int, set[int]] = {}
    copies: Counter = Counter()
    for rank_plan in plans:
        for j, mb in enumerate(rank_plan):
            for sample in mb.positions().tolist():
                copies[sample] += 1
                steps.setdefault(sample, set()).add(j // accum)
    last = int(global_sequence(layout, seed=1, epoch=4)[-1])  # may have been cut short
    assert all(c == 3 for s, c in copies.items() if s != last)
    assert len(copies) == math.ceil(world * 6_144 / 3)
    straddling = [s for s, where in steps.items() if len(where) > 1]
    assert all(max(steps[s]) - min(steps[s]) == 1 for s in straddling)
    # The reference's steps hold 1024 images, not a multiple of 3: at most one image per step
    # boundary straddles it.
    assert len(straddling) <= max(max(w) for w in steps.values())


def test_a_micro_batch_reads_each_sample_once_and_lists_all_its_copies() -> None:
    layout = EpochLayout(12_406, 2, 128, 3, REFERENCE_EPOCH_MULTIPLE)
    for mb in epoch_plan(layout, seed=0, epoch=0, rank=1):
        assert len(set(mb.samples.tolist())) == len(mb.samples)
        assert int(mb.copies.sum()) == mb.size
        assert sorted(mb.order.tolist()) == sorted(
            e * 3 + c for e, k in enumerate(mb.copies.tolist()) for c in range(k)
        )


def test_copies_of_an_image_get_different_mixup_partners() -> None:
    """Mixup pairs position i with B - 1 - i; copies kept side by side would share a partner."""
    layout = EpochLayout(12_406, 2, 128, 3, REFERENCE_EPOCH_MULTIPLE)
    shared = pairs = 0
    for mb in epoch_plan(layout, seed=0, epoch=0, rank=0):
        samples = mb.positions()
        partners = samples[::-1]
        for sample in np.unique(samples):
            mine = partners[samples == sample]
            pairs += len(mine) * (len(mine) - 1) // 2
            shared += sum(int(c * (c - 1) // 2) for c in Counter(mine.tolist()).values())
    assert pairs > 1_000
    assert shared / pairs < 0.05


def test_the_global_order_is_a_pure_function_of_seed_and_epoch() -> None:
    layout = EpochLayout(5_000, 2, 64, 3, REFERENCE_EPOCH_MULTIPLE)
    first = global_sequence(layout, seed=3, epoch=2)
    assert np.array_equal(first, global_sequence(layout, seed=3, epoch=2))
    assert not np.array_equal(first, global_sequence(layout, seed=3, epoch=3))
    assert not np.array_equal(first, global_sequence(layout, seed=4, epoch=2))
    one_rank = EpochLayout(5_000, 1, 64, 3, REFERENCE_EPOCH_MULTIPLE)
    assert np.array_equal(global_sequence(one_rank, seed=3, epoch=2), first)  # same 4,864 here


def test_without_repeats_an_epoch_is_distinct_samples() -> None:
    layout = EpochLayout(1_000, 2, 32, 1, 1)
    seen = [int(i) for r in range(2) for mb in epoch_plan(layout, 0, 0, r) for i in mb.samples]
    assert sorted(seen) == list(range(1_000))


# --------------------------------------------------------------------------------------------
# Steps of the paper's recipes (METHOD.md 1.6)

PAPER = [
    # recipe, N, world, samples/rank, micro-batches, steps/epoch, total, last step, last micro
    ("cifar10lt_r100", 12_406, 2, 6_144, 48, 12, 14_400, 4, 128),
    ("cifar10lt_r50", 13_996, 2, 6_912, 54, 14, 16_800, 2, 128),
    ("cifar100lt_r100", 10_847, 2, 5_376, 42, 11, 13_200, 2, 128),
    ("cifar100lt_r50", 12_608, 2, 6_272, 49, 13, 15_600, 1, 128),
    ("imagenetlt_deitlt_b", 115_846, 4, 28_928, 226, 57, 79_800, 2, 128),
    ("inat18_deitlt_b", 437_513, 4, 109_376, 855, 214, 214_000, 3, 64),
]


@pytest.mark.parametrize(
    ("recipe", "n", "world", "per_rank", "micro", "per_epoch", "total", "last_step", "last"),
    PAPER,
    ids=[row[0] for row in PAPER],
)
def test_paper_recipes_take_the_reference_steps(
    recipe, n, world, per_rank, micro, per_epoch, total, last_step, last
) -> None:
    cfg = config.load(RECIPES / f"{recipe}.yaml")
    config.validate_world(cfg, world)
    assert cfg.data.repeated_aug == 3
    steps = resolve_steps(cfg, n, world)
    assert steps.samples_per_rank == per_rank
    assert steps.micro_batches_per_epoch == micro
    assert steps.steps_per_epoch == per_epoch
    assert steps.total == steps.scheduled == total
    assert steps.micro_batches_in_step(per_epoch - 1) == last_step
    assert steps.micro_batches_in_step(per_epoch) == cfg.train.grad_accum  # next epoch's first
    assert steps.last_micro_batch == last
    assert steps.micro_batch_size(per_epoch - 1, last_step - 1) == last


def test_an_epochs_steps_hold_every_micro_batch_and_sample_once() -> None:
    cfg = config.load(RECIPES / "inat18_deitlt_b.yaml")
    steps = resolve_steps(cfg, 437_513, 4)
    epoch = range(3 * steps.steps_per_epoch, 4 * steps.steps_per_epoch)
    micro = [steps.micro_batches_in_step(s) for s in epoch]
    assert sum(micro) == steps.micro_batches_per_epoch
    assert [steps.first_micro_batch(s) for s in epoch] == list(np.cumsum([0, *micro[:-1]]))
    sizes = [steps.micro_batch_size(s, m) for s, k in zip(epoch, micro) for m in range(k)]
    assert sum(sizes) == steps.samples_per_rank
    with pytest.raises(ValueError, match="no micro-batch 3"):
        steps.micro_batch_size(epoch[-1], 3)


def test_warm_up_and_drw_count_steps_of_the_reference_length() -> None:
    cfg = config.load(RECIPES / "cifar10lt_r50.yaml")
    steps = resolve_steps(cfg, 13_996, 2)
    assert steps.warmup == 5 * 14
    assert steps.drw_start == 1100 * 14


def test_an_odd_last_micro_batch_under_mixup_is_refused() -> None:
    cfg = config.load(None, ["train.micro_batch=128"])
    with pytest.raises(ConfigError, match="holds 85 images"):
        resolve_steps(cfg, 1_100, 3)  # 1,024 / 3 = 341 per rank = 2 x 128 + 85
    without_mixup = config.load(None, ["train.micro_batch=128", "data.mixup.prob=0"])
    assert resolve_steps(without_mixup, 1_100, 3).last_micro_batch == 85


def test_a_split_smaller_than_the_epoch_multiple_keeps_its_samples() -> None:
    cfg = config.load(None, ["train.micro_batch=8"])
    assert resolve_steps(cfg, 200, 2).samples_per_rank == 100
    with pytest.raises(ConfigError, match="fewer than the 4 ranks"):
        resolve_steps(cfg, 3, 4)
