"""Long-tail arithmetic against the figures of METHOD.md (sections 1.1, 1.4, 1.5 and 5.2)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deitlt_scale.data.longtail import (
    HEAD,
    MID,
    TAIL,
    class_map_by_frequency,
    drw_weights,
    groups_by_count,
    groups_by_index,
    lt_counts,
    paper_boundaries,
)
from deitlt_scale.data.sources import select_longtail


def _sizes(groups: list[int]) -> tuple[int, int, int]:
    return groups.count(HEAD), groups.count(MID), groups.count(TAIL)


@pytest.mark.parametrize(
    ("n_max", "k", "rho", "total"),
    [(5000, 10, 100, 12406), (5000, 10, 50, 13996), (500, 100, 100, 10847), (500, 100, 50, 12608)],
)
def test_cifar_lt_totals_match_the_paper_table(n_max, k, rho, total):
    assert sum(lt_counts(n_max, k, rho)) == total


def test_cifar10_lt_if100_per_class_counts():
    assert lt_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_cifar10_lt_if50_per_class_counts():
    assert lt_counts(5000, 10, 50) == [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]


def test_cifar100_lt_if100_counts_around_the_thresholds():
    counts = lt_counts(500, 100, 100)
    assert (counts[0], counts[-1]) == (500, 5)
    assert (counts[34], counts[35], counts[69], counts[70]) == (102, 98, 20, 19)


def test_cifar100_lt_if50_extremes():
    counts = lt_counts(500, 100, 50)
    assert (counts[0], counts[-1]) == (500, 10)


def test_counts_use_the_float_n_max_of_the_reference():
    # The reference's img_max is len(train) / K, a float; 50000 / 10 gives the same counts.
    assert lt_counts(50000 / 10, 10, 100) == lt_counts(5000, 10, 100)


def test_step_profile_halves_the_classes():
    assert lt_counts(100, 4, 10, "step") == [100, 100, 10, 10]


def test_imbalance_below_one_is_rejected():
    with pytest.raises(ValueError, match="imbalance"):
        lt_counts(100, 10, 0.01)


@pytest.mark.parametrize(
    ("dataset", "counts", "expected"),
    [
        ("cifar10-lt", lt_counts(5000, 10, 100), (3, 4, 3)),
        ("cifar10-lt", lt_counts(5000, 10, 50), (3, 4, 3)),
        ("cifar100-lt", lt_counts(500, 100, 100), (36, 35, 29)),
        ("cifar100-lt", lt_counts(500, 100, 50), (36, 35, 29)),
        ("imagenet-lt", [50] * 1000, (390, 445, 165)),
        ("inat2018", [5] * 8142, (842, 3701, 3599)),
        ("digits-lt", lt_counts(120, 10, 20), (3, 4, 3)),
    ],
)
def test_paper_convention_group_sizes(dataset, counts, expected):
    boundaries = paper_boundaries(dataset, counts)
    assert _sizes(groups_by_index(len(counts), boundaries)) == expected


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        (lt_counts(5000, 10, 100), (8, 2, 0)),
        (lt_counts(5000, 10, 50), (9, 1, 0)),
        (lt_counts(500, 100, 100), (35, 35, 30)),
        (lt_counts(500, 100, 50), (41, 41, 18)),
    ],
)
def test_count_convention_group_sizes(counts, expected):
    assert _sizes(groups_by_count(counts)) == expected


def test_count_thresholds_are_inclusive_at_20_and_100():
    assert groups_by_count([101, 100, 20, 19]) == [HEAD, MID, MID, TAIL]


def test_unknown_dataset_gets_boundaries_that_match_the_count_rule():
    counts = [300, 150, 90, 40, 20, 19, 3]
    boundaries = paper_boundaries("my-photos", counts)
    assert boundaries == (2, 5)
    assert groups_by_index(len(counts), boundaries) == groups_by_count(counts)


@pytest.mark.parametrize(
    ("counts", "first", "last"),
    [(lt_counts(5000, 10, 100), 0.051, 3.99), (lt_counts(500, 100, 100), 0.045, 4.38)],
)
def test_drw_weights_match_the_method_examples(counts, first, last):
    weights = drw_weights(counts)
    assert weights[0] == pytest.approx(first, abs=5e-4)
    assert weights[-1] == pytest.approx(last, abs=5e-3)
    assert weights.sum() == pytest.approx(len(counts))


def test_drw_weights_refuse_an_empty_class():
    with pytest.raises(ValueError, match="at least one"):
        drw_weights([10, 0])


def test_class_map_breaks_ties_by_ascending_original_label():
    # counts by original label: 1 and 2 tie at 7, 0 and 4 tie at 5.
    assert class_map_by_frequency([5, 7, 7, 1, 5]) == [2, 0, 1, 4, 3]


@given(st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=40))
def test_class_map_is_a_frequency_ranking(counts):
    class_map = class_map_by_frequency(counts)
    assert sorted(class_map) == list(range(len(counts)))
    by_model = [None] * len(counts)
    for original, model in enumerate(class_map):
        by_model[model] = (counts[original], original)
    # Non-increasing counts; among equal counts, ascending original labels.
    assert by_model == sorted(by_model, key=lambda pair: (-pair[0], pair[1]))


def test_selection_matches_the_global_numpy_rng_procedure():
    labels = np.random.RandomState(7).randint(0, 5, size=200)
    counts = [30, 20, 10, 5, 2]
    saved = np.random.get_state()
    try:
        np.random.seed(0)  # the reference: global seed, then np.random.shuffle per class
        expected = []
        for c, n in enumerate(counts):
            idx = np.where(labels == c)[0]
            np.random.shuffle(idx)
            expected.extend(idx[:n].tolist())
    finally:
        np.random.set_state(saved)
    before = np.random.get_state()[1].copy()
    assert select_longtail(labels, counts) == expected
    assert np.array_equal(np.random.get_state()[1], before)  # global state untouched
