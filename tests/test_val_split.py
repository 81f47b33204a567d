"""The held-out validation split of `deitlt data prepare` (--val-per-class, --val-list) and the
Places-LT list source: disjoint from train and test, balanced, read by the eval loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deitlt_scale.data import list_sources, sources
from deitlt_scale.data.prepare import prepare_dataset
from deitlt_scale.errors import UserError
from tests.test_prepare import flat_image, make_cifar_tarball


def test_val_rows_come_from_the_rows_the_long_tail_leaves_unused():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    train = [0, 1, 4]  # class 0 keeps rows 0-1, class 1 row 4
    kept, val, moved = sources.hold_out_val(labels, train, pool=range(8), per_class=2)
    assert kept == train and moved == {}
    assert {2, 3} <= set(val) <= {2, 3, 5, 6, 7}  # class 0 has exactly two unused rows
    assert np.bincount(labels[val]).tolist() == [2, 2]


def test_a_class_without_enough_unused_rows_gives_its_last_train_rows():
    labels = np.array([0, 0, 0, 1, 1, 1])
    train = [2, 0, 1, 3]  # every class-0 row is in train
    kept, val, moved = sources.hold_out_val(labels, train, pool=range(6), per_class=1)
    assert moved == {0: 1}
    assert 1 in val and kept == [2, 0, 3]  # the last class-0 train row moved to val


def test_val_never_takes_rows_outside_the_pool():
    labels = np.array([0, 0, 0, 0])
    _, val, _ = sources.hold_out_val(labels, [0], pool=[0, 1], per_class=1)
    assert val == [1]  # rows 2-3 (the test split) are never candidates


def test_val_per_class_that_would_empty_a_class_is_refused():
    labels = np.array([0, 0])
    with pytest.raises(UserError, match="too few for --val-per-class 2"):
        sources.hold_out_val(labels, [0, 1], pool=[0, 1], per_class=2)


def test_digits_val_split_is_balanced_and_disjoint_and_keeps_the_train_split():
    base = sources.read_digits()
    data = sources.read_digits(val_per_class=8)
    train, test, val = ({r.ref for r in rs} for rs in (data.train, data.eval, data.val))
    assert train == {r.ref for r in base.train}  # 8 per class fit in the unused images
    assert not val & train and not val & test
    assert np.bincount([r.label for r in data.val]).tolist() == [8] * 10


def test_cifar_val_split_moves_the_shortfall_of_a_full_head_class(tmp_path):
    raw = make_cifar_tarball(tmp_path, "cifar10", 10, 2)
    data = sources.read_cifar("cifar10-lt", raw["tarball"], 10, val_per_class=2)
    # n_max = 10: class 0 puts all 10 images in train, so 2 move to val; class 9 keeps 1.
    assert data.details["val_moved_from_train"] == {"0": 2}
    counts = np.bincount([r.label for r in data.train], minlength=10)
    assert counts[0] == 8 and counts[9] == 1
    assert not {r.ref for r in data.val} & {r.ref for r in data.train}


def test_prepared_val_split_is_written_and_read_by_the_eval_loader(tmp_path):
    from deitlt_scale.config import DataConfig
    from deitlt_scale.data.loader import EvalLoader

    meta = prepare_dataset("digits-lt", tmp_path / "d", val_per_class=3, progress=False)
    assert meta.val_counts == [3] * 10 and meta.num_samples("val") == 30
    cfg = DataConfig(shards=str(tmp_path / "d"), image_size=32, device="cpu", num_threads=1)
    labels = torch.cat([b.labels for b in EvalLoader(meta, cfg, 16, 0, 1, "cpu", split="val")])
    labels = labels[labels >= 0]
    assert np.bincount(labels.numpy(), minlength=10).tolist() == [3] * 10


def test_eval_loader_names_the_fix_when_the_val_split_is_missing(digits_lt):
    from deitlt_scale.config import DataConfig
    from deitlt_scale.data import meta as meta_mod
    from deitlt_scale.data.loader import EvalLoader

    meta = meta_mod.load(digits_lt)
    with pytest.raises(UserError, match="no 'val' split; prepare it with .*--val-per-class"):
        EvalLoader(meta, DataConfig(device="cpu"), 16, 0, 1, "cpu", split="val")


def places_root(tmp_path):
    """A Places-LT layout: images and the three standard list files."""
    root = tmp_path / "places"
    lines: dict[str, list[str]] = {"train": [], "test": [], "val": []}
    for split, per_class in (("train", 3), ("test", 1), ("val", 1)):
        for c in range(365):
            for i in range(per_class if split != "train" else 1 + (c == 0) * 2):
                rel = f"{split}/c{c:03d}/{i}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(flat_image(c, size=8))
                lines[split].append(f"{rel} {c}")
    for split, name in (("train", "Places_LT_train.txt"), ("test", "Places_LT_test.txt"),
                        ("val", "Places_LT_val.txt")):  # fmt: skip
        (root / name).write_text("\n".join(lines[split]) + "\n")
    return root


def test_places_lt_reads_its_standard_lists_with_365_classes(tmp_path):
    root = places_root(tmp_path)
    data = list_sources.read_lists("places-lt", root, val_list=root / "Places_LT_val.txt")
    assert data.dataset == "places-lt" and data.num_classes == 365
    assert len(data.train) == 367 and len(data.eval) == 365 and len(data.val) == 365
    assert data.details["train_list"].endswith("Places_LT_train.txt")


def test_a_val_list_entry_also_in_train_is_refused(tmp_path):
    root = places_root(tmp_path)
    (root / "val.txt").write_text("train/c000/0.jpg 0\n")
    with pytest.raises(UserError, match="duplicate path train/c000/0.jpg"):
        list_sources.read_lists("places-lt", root, val_list=root / "val.txt")
