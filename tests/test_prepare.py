"""`deitlt data prepare` / `inspect` on tiny generated data in every source format.

Shards are read back through the ``webdataset`` package and through DALI's
``fn.readers.webdataset`` (CPU, with the written index files); both must yield exactly the
expected (image, label) multiset.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deitlt_scale.cli import main
from deitlt_scale.data.longtail import lt_counts
from deitlt_scale.data.prepare import PROGRESS_FILE, SOURCES, parse_size, prepare_dataset
from deitlt_scale.errors import UserError

# --------------------------------------------------------------------------- image identities
# Each generated image is one flat colour that encodes its id in base 8 (channel steps of 32),
# so it survives JPEG compression and can be identified after decoding.


def colour(i: int) -> tuple[int, int, int]:
    return tuple(16 + 32 * ((i >> (3 * c)) & 7) for c in range(3))


def identify(jpeg: bytes) -> int:
    mean = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float64).mean((0, 1))
    digits = np.clip(np.round((mean - 16) / 32), 0, 7).astype(int)
    return int(digits[0] + 8 * digits[1] + 64 * digits[2])


def flat_image(i: int, size: int = 16, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour(i)).save(buffer, fmt, quality=90)
    return buffer.getvalue()


# --------------------------------------------------------------------------- readers


def read_webdataset(meta, split: str) -> Counter:
    import webdataset as wds

    urls = [str(tar) for tar, _ in meta.shard_files(split)]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return Counter((sample["jpg"], int(sample["cls"])) for sample in dataset)


def read_dali(meta, split: str) -> Counter:
    from nvidia.dali import fn, pipeline_def

    tars, indexes = zip(*meta.shard_files(split))
    total = meta.num_samples(split)

    @pipeline_def(batch_size=total, num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(
            paths=[str(t) for t in tars],
            index_paths=[str(i) for i in indexes],
            ext=["jpg", "cls"],
            missing_component_behavior="error",
            random_shuffle=False,
            name="reader",
        )
        return jpg, cls

    pipeline = pipe()
    pipeline.build()
    assert pipeline.epoch_size("reader") == total
    jpgs, labels = pipeline.run()
    return Counter(
        (np.array(jpgs[i]).tobytes(), int(np.array(labels[i]).tobytes())) for i in range(total)
    )


def assert_both_readers_yield(meta, split: str, expected: Counter) -> None:
    assert read_webdataset(meta, split) == expected
    assert read_dali(meta, split) == expected
    assert meta.num_samples(split) == sum(expected.values())


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.suffix in (".tar", ".idx") or p.name == "meta.json"
    }


# --------------------------------------------------------------------------- CIFAR fixtures


def _pickle(obj: dict, path: Path) -> None:
    # Protocol 2 with bytes keys: how the original Python 2 batches read with encoding="bytes".
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _cifar_rows(ids: list[int]) -> np.ndarray:
    # Channel-major rows of 3072 bytes, as in the original batches.
    return np.stack([np.repeat(np.array(colour(i), np.uint8), 1024) for i in ids])


def make_cifar_tarball(tmp: Path, kind: str, per_class: int, test_per_class: int) -> dict:
    """A CIFAR python tarball with flat-colour images; returns labels and image ids."""
    k = 10 if kind == "cifar10" else 100
    train_labels = np.random.RandomState(1).permutation(np.repeat(np.arange(k), per_class))
    test_labels = np.repeat(np.arange(k), test_per_class)
    train_ids = list(range(len(train_labels)))
    test_ids = [len(train_ids) + j for j in range(len(test_labels))]
    folder = tmp / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    label_key = b"labels" if kind == "cifar10" else b"fine_labels"
    names = [f"class{c}".encode() for c in range(k)]
    if kind == "cifar10":
        batches = np.array_split(np.arange(len(train_labels)), 5)
        for b, rows in enumerate(batches, start=1):
            _pickle(
                {
                    b"batch_label": f"training batch {b} of 5".encode(),
                    b"labels": train_labels[rows].tolist(),
                    b"data": _cifar_rows([train_ids[r] for r in rows]),
                    b"filenames": [f"{r}.png".encode() for r in rows],
                },
                folder / f"data_batch_{b}",
            )
        _pickle({b"label_names": names, b"num_cases_per_batch": 10000}, folder / "batches.meta")
        test_name = "test_batch"
    else:
        _pickle(
            {
                b"batch_label": b"training batch 1 of 1",
                b"fine_labels": train_labels.tolist(),
                b"coarse_labels": (train_labels // 5).tolist(),
                b"data": _cifar_rows(train_ids),
                b"filenames": [f"{r}.png".encode() for r in train_ids],
            },
            folder / "train",
        )
        _pickle({b"fine_label_names": names, b"coarse_label_names": names[:20]}, folder / "meta")
        test_name = "test"
    _pickle(
        {label_key: test_labels.tolist(), b"data": _cifar_rows(test_ids), b"batch_label": b"t"},
        folder / test_name,
    )
    tarball = tmp / f"{folder.name.replace('-batches-py', '-python')}.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return {
        "tarball": tarball,
        "folder": folder,
        "train_labels": train_labels,
        "test_labels": test_labels,
        "train_ids": train_ids,
        "test_ids": test_ids,
        "names": [n.decode() for n in names],
    }


def reference_selection(labels: np.ndarray, counts: list[int]) -> list[int]:
    """METHOD.md 1.1 as the reference runs it: global np.random.seed(0), np.random.shuffle."""
    saved = np.random.get_state()
    try:
        np.random.seed(0)
        kept = []
        for c, n in enumerate(counts):
            idx = np.where(labels == c)[0]
            np.random.shuffle(idx)
            kept.extend(idx[:n].tolist())
    finally:
        np.random.set_state(saved)
    return kept


def decoded_ids(meta, split: str) -> Counter:
    return Counter((identify(jpg), label) for (jpg, label), n in read_dali(meta, split).items()
                   for _ in range(n))  # fmt: skip


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    return make_cifar_tarball(tmp_path_factory.mktemp("c10"), "cifar10", 10, 2)


def test_cifar10_lt_keeps_exactly_the_reference_selection(cifar10, tmp_path):
    meta = prepare_dataset(
        "cifar10-lt", tmp_path / "out", root=cifar10["tarball"], imbalance=10,
        shard_size="8KB", progress=False,
    )  # fmt: skip
    counts = lt_counts(100 / 10, 10, 10)
    kept = reference_selection(cifar10["train_labels"], counts)
    expected = Counter((cifar10["train_ids"][i], int(cifar10["train_labels"][i])) for i in kept)
    assert meta.train_counts == counts
    assert meta.class_map == list(range(10))  # CIFAR ids are already frequency-sorted
    assert len(meta.splits["train"]["shards"]) > 1
    assert Counter((identify(j), lab) for (j, lab), n in read_webdataset(meta, "train").items()
                   for _ in range(n)) == expected  # fmt: skip
    assert decoded_ids(meta, "train") == expected


def test_cifar10_lt_eval_is_the_whole_balanced_test_split(cifar10, tmp_path):
    meta = prepare_dataset(
        "cifar10-lt", tmp_path / "out", root=cifar10["folder"], imbalance=10, progress=False
    )
    expected = Counter(zip(cifar10["test_ids"], cifar10["test_labels"].tolist()))
    assert meta.eval_counts == [2] * 10
    assert decoded_ids(meta, "eval") == expected


def test_cifar_meta_records_names_groups_and_imbalance(cifar10, tmp_path):
    meta = prepare_dataset(
        "cifar10-lt", tmp_path / "out", root=cifar10["tarball"].parent, imbalance=10,
        progress=False,
    )  # fmt: skip
    assert meta.dataset == "cifar10-lt"
    assert meta.class_names == cifar10["names"]
    assert meta.boundaries == (3, 7)
    assert meta.groups["paper"] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert meta.groups["count"] == [2] * 10  # every class has fewer than 20 images here
    assert meta.imbalance_factor == 10.0
    assert meta.image_size == 32


def test_cifar100_lt_format_is_read_with_fine_labels(tmp_path):
    raw = make_cifar_tarball(tmp_path / "raw", "cifar100", 2, 1)
    meta = prepare_dataset(
        "cifar100-lt", tmp_path / "out", root=raw["tarball"], imbalance=2, progress=False
    )
    counts = lt_counts(2.0, 100, 2)
    kept = reference_selection(raw["train_labels"], counts)
    assert meta.dataset == "cifar100-lt"
    assert meta.train_counts == counts
    assert meta.boundaries == (36, 71)
    assert decoded_ids(meta, "train") == Counter(
        (raw["train_ids"][i], int(raw["train_labels"][i])) for i in kept
    )


def test_a_tarball_that_is_not_cifar_is_refused(tmp_path):
    other = tmp_path / "cifar-10-python.tar.gz"
    (tmp_path / "readme.txt").write_text("hello")
    with tarfile.open(other, "w:gz") as tar:
        tar.add(tmp_path / "readme.txt", arcname="readme.txt")
    with pytest.raises(UserError, match="not a CIFAR-10 archive"):
        prepare_dataset("cifar10-lt", tmp_path / "out", root=other, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_tarball_is_refused(tmp_path):
    bogus = tmp_path / "cifar-10-python.tar.gz"
    bogus.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(UserError, match="not a CIFAR archive"):
        prepare_dataset("cifar10-lt", tmp_path / "out", root=bogus, progress=False)


# --------------------------------------------------------------------------- list sources


def make_list_dataset(root: Path, layout, counts, eval_per_class, shuffle_eval=False):
    """Generated JPEGs under ``root`` and '<path> <label>' lists; ``layout(split, c, i)`` gives
    each relative path. Returns (train list, eval list, {relative path: (bytes, label)})."""
    files: dict[str, tuple[bytes, int]] = {}
    lines = {"train": [], "eval": []}
    image_id = 0
    for split, per_class in (("train", counts), ("eval", [eval_per_class] * len(counts))):
        for c, n in enumerate(per_class):
            for i in range(n):
                rel = layout(split, c, i)
                data = flat_image(image_id)
                image_id += 1
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(data)
                files[rel] = (data, c)
                lines[split].append(f"{rel} {c}")
    if shuffle_eval:
        lines["eval"] = [lines["eval"][i] for i in np.random.RandomState(3).permutation(
            len(lines["eval"]))]  # fmt: skip
    train_list, eval_list = root / "train.txt", root / "eval.txt"
    train_list.write_text("\n".join(lines["train"]) + "\n")
    eval_list.write_text("\n".join(lines["eval"]))  # no trailing newline, as ImageNet-LT's
    return train_list, eval_list, files


def imagenet_layout(split: str, c: int, i: int) -> str:
    wnid = f"n{c:08d}"
    if split == "train":
        return f"train/{wnid}/{wnid}_{i}.JPEG"
    return f"val/{wnid}/ILSVRC2012_val_{c * 100 + i:08d}.JPEG"


def inat_layout(split: str, c: int, i: int) -> str:
    return f"train_val2018/Plantae/{c}/{split}{c:04d}{i:04d}abcdef.jpg"


IMAGENET_COUNTS = [3, 6, 2, 6, 4]  # ties at 6 (labels 1, 3): ascending original label first
IMAGENET_CLASS_MAP = [3, 0, 4, 1, 2]


def expected_from_lists(files, lists, class_map) -> Counter:
    wanted = set()
    for path in lists:
        wanted |= {line.split()[0] for line in path.read_text().splitlines() if line.strip()}
    return Counter((files[rel][0], class_map[files[rel][1]]) for rel in wanted)


def test_imagenet_lt_lists_map_classes_by_frequency(tmp_path):
    root = tmp_path / "imagenet"
    train_list, eval_list, files = make_list_dataset(root, imagenet_layout, IMAGENET_COUNTS, 2)
    meta = prepare_dataset(
        "imagenet-lt", tmp_path / "out", root=root, train_list=train_list, eval_list=eval_list,
        num_classes=5, shard_size="2KB", progress=False,
    )  # fmt: skip
    assert meta.dataset == "imagenet-lt"
    assert meta.class_map == IMAGENET_CLASS_MAP
    assert meta.train_counts == [6, 6, 4, 3, 2]
    assert meta.class_names == ["n00000001", "n00000003", "n00000004", "n00000000", "n00000002"]
    assert len(meta.splits["train"]["shards"]) > 1
    # Original JPEG bytes are stored unchanged, with model labels.
    assert_both_readers_yield(
        meta, "train", expected_from_lists(files, [train_list], IMAGENET_CLASS_MAP)
    )
    assert_both_readers_yield(meta, "eval",
                              expected_from_lists(files, [eval_list], IMAGENET_CLASS_MAP))  # fmt: skip


def test_inat2018_lists_with_shuffled_val(tmp_path):
    root = tmp_path / "inat"
    train_list, eval_list, files = make_list_dataset(root, inat_layout, [1, 5, 3], 1, True)
    meta = prepare_dataset(
        "inat2018", tmp_path / "out", root=root, train_list=train_list, eval_list=eval_list,
        num_classes=3, shard_size="3KB", workers=2, progress=False,
    )  # fmt: skip
    class_map = [2, 0, 1]
    assert meta.dataset == "inat2018"
    assert meta.class_map == class_map
    assert meta.class_names == ["1", "2", "0"]  # Plantae/<id> less the common folders
    assert meta.boundaries == (0, 0)  # paper's [842, 4543] exceed 3 classes: count rule
    assert_both_readers_yield(meta, "train", expected_from_lists(files, [train_list], class_map))
    assert_both_readers_yield(meta, "eval", expected_from_lists(files, [eval_list], class_map))


def test_inat2018_class_names_come_from_its_categories_file(tmp_path):
    root = tmp_path / "inat"
    train_list, eval_list, _ = make_list_dataset(root, inat_layout, [1, 5, 3], 1)
    species = ["Quercus robur", "Bufo bufo", "Parus major"]
    categories = [{"id": i, "name": n, "supercategory": "x"} for i, n in enumerate(species)]
    (root / "categories.json").write_text(json.dumps(categories))
    meta = prepare_dataset(
        "inat2018", tmp_path / "out", root=root, train_list=train_list, eval_list=eval_list,
        num_classes=3, progress=False,
    )  # fmt: skip
    # model labels are frequency-ranked: original 1 (5 images), 2 (3), 0 (1)
    assert meta.class_names == ["Bufo bufo", "Parus major", "Quercus robur"]


def test_default_list_names_are_found_inside_the_root(tmp_path):
    root = tmp_path / "imagenet"
    train_list, eval_list, _ = make_list_dataset(root, imagenet_layout, IMAGENET_COUNTS, 1)
    train_list.rename(root / "ImageNet_LT_train.txt")
    eval_list.rename(root / "ImageNet_LT_test.txt")
    meta = prepare_dataset(
        "imagenet-lt", tmp_path / "out", root=root, num_classes=5, progress=False
    )
    assert meta.num_samples("train") == sum(IMAGENET_COUNTS)


def test_list_source_uses_the_given_name(tmp_path):
    root = tmp_path / "mine"
    train_list, eval_list, _ = make_list_dataset(root, imagenet_layout, [4, 2], 1)
    meta = prepare_dataset(
        "list", tmp_path / "out", root=root, train_list=train_list, eval_list=eval_list,
        name="my-data", progress=False,
    )  # fmt: skip
    assert (meta.dataset, meta.num_classes, meta.train_counts) == ("my-data", 2, [4, 2])


@pytest.fixture
def small_lists(tmp_path):
    root = tmp_path / "raw"
    train_list, eval_list, _ = make_list_dataset(root, imagenet_layout, [3, 2], 1)
    return root, train_list, eval_list


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("train/n00000000/missing.JPEG 0", "not found"),
        ("train/n00000000/n00000000_0.JPEG zero", "not an integer"),
        ("train/n00000001/n00000001_0.JPEG 7", "outside 0..1"),
        ("train/n00000000/n00000000_1.JPEG 0", "duplicate path"),
        ("just-a-path", "expected '<path> <label>'"),
    ],
)
def test_bad_list_line_is_an_error_naming_file_and_line(small_lists, tmp_path, bad_line, message):
    root, train_list, eval_list = small_lists
    with open(train_list, "a") as f:
        f.write(bad_line + "\n")
    with pytest.raises(UserError, match=message) as err:
        prepare_dataset(
            "list", tmp_path / "out", root=root, train_list=train_list, eval_list=eval_list,
            num_classes=2, progress=False,
        )  # fmt: skip
    assert f"{train_list}:6:" in str(err.value)
    assert "--skip-bad" in str(err.value)


def test_skip_bad_skips_and_counts_bad_lines(small_lists, tmp_path):
    root, train_list, eval_list = small_lists
    with open(train_list, "a") as f:
        f.write("train/n00000000/missing.JPEG 0\n")
    meta = prepare_dataset(
        "list", tmp_path / "out", root=root, train_list=train_list, eval_list=eval_list,
        num_classes=2, skip_bad=True, max_skip_fraction=0.5, progress=False,
    )  # fmt: skip
    assert meta.train_counts == [3, 2]
    assert [s["source"] for s in meta.skipped] == [f"{train_list}:6"]


def test_eval_path_that_is_also_in_train_is_an_error(small_lists, tmp_path):
    root, train_list, eval_list = small_lists
    eval_list.write_text(eval_list.read_text() + "\ntrain/n00000000/n00000000_0.JPEG 0\n")
    with pytest.raises(UserError, match="duplicate path"):
        prepare_dataset(
            "list", tmp_path / "out", root=root, train_list=train_list, eval_list=eval_list,
            progress=False,
        )  # fmt: skip


# --------------------------------------------------------------------------- class folders


def make_folder(root: Path, counts: dict[str, int], png_in: str | None = None) -> dict:
    """Class folders of flat-colour images; returns {path: (id, original label)}."""
    made, image_id = {}, 0
    for label, (name, n) in enumerate(sorted(counts.items())):
        (root / name).mkdir(parents=True)
        for i in range(n):
            fmt = "PNG" if name == png_in and i == 0 else "JPEG"
            path = root / name / f"img{i:03d}.{'png' if fmt == 'PNG' else 'jpg'}"
            path.write_bytes(flat_image(image_id, fmt=fmt))
            made[path] = (image_id, label)
            image_id += 1
    return made


def test_folder_with_eval_fraction_holds_out_a_balanced_split(tmp_path):
    made = make_folder(tmp_path / "raw", {"ant": 8, "bee": 4, "cat": 6}, png_in="bee")
    meta = prepare_dataset(
        "folder", tmp_path / "out", root=tmp_path / "raw", eval_fraction=0.5,
        shard_size="2KB", progress=False,
    )  # fmt: skip
    class_map = [0, 2, 1]  # ant 8 -> 0, cat 6 -> 1, bee 4 -> 2
    assert meta.dataset == "raw"
    assert meta.class_map == class_map
    assert meta.class_names == ["ant", "cat", "bee"]
    assert meta.eval_counts == [2, 2, 2]
    assert meta.train_counts == [6, 4, 2]
    every = read_webdataset(meta, "train") + read_webdataset(meta, "eval")
    assert read_dali(meta, "train") + read_dali(meta, "eval") == every
    assert Counter((identify(j), lab) for (j, lab), n in every.items() for _ in range(n)) == \
        Counter((i, class_map[lab]) for i, lab in made.values())  # fmt: skip
    stored = {jpg for jpg, _ in every}
    for path in made:
        if path.suffix == ".jpg":
            assert path.read_bytes() in stored  # JPEG files are stored unchanged
    png = next(p for p in made if p.suffix == ".png")
    assert png.read_bytes() not in stored  # the PNG was converted ...
    assert all(jpg[:2] == b"\xff\xd8" for jpg in stored)  # ... to JPEG, like everything


def test_folder_with_eval_root(tmp_path):
    make_folder(tmp_path / "train", {"a": 3, "b": 5})
    make_folder(tmp_path / "val", {"a": 1, "b": 1})
    meta = prepare_dataset(
        "folder", tmp_path / "out", root=tmp_path / "train", eval_root=tmp_path / "val",
        name="ab", progress=False,
    )  # fmt: skip
    assert (meta.dataset, meta.train_counts, meta.eval_counts) == ("ab", [5, 3], [1, 1])
    assert meta.class_names == ["b", "a"]


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(UserError, match="holds no class folder"):
        prepare_dataset("folder", tmp_path / "out", root=tmp_path / "raw", eval_fraction=0.5)


def test_folder_without_an_eval_split_is_refused(tmp_path):
    make_folder(tmp_path / "raw", {"a": 2})
    with pytest.raises(UserError, match="--eval-root DIR or --eval-fraction"):
        prepare_dataset("folder", tmp_path / "out", root=tmp_path / "raw")


def _truncate_one(made: dict) -> Path:
    victim = sorted(p for p in made if p.suffix == ".jpg")[1]
    victim.write_bytes(victim.read_bytes()[:200])
    return victim


def test_truncated_image_is_skipped_counted_and_listed(tmp_path):
    made = make_folder(tmp_path / "raw", {"a": 6, "b": 5})
    victim = _truncate_one(made)
    meta = prepare_dataset(
        "folder", tmp_path / "out", root=tmp_path / "raw", eval_fraction=0.2,
        max_skip_fraction=0.1, progress=False,
    )  # fmt: skip
    assert [s["source"] for s in meta.skipped] == [str(victim)]
    assert "truncated" in meta.skipped[0]["reason"] or "decode" in meta.skipped[0]["reason"]
    assert meta.num_samples("train") + meta.num_samples("eval") == 10
    assert sum(read_webdataset(meta, "train").values()) == meta.num_samples("train")


def test_too_many_skipped_images_fail_the_preparation(tmp_path):
    made = make_folder(tmp_path / "raw", {"a": 6, "b": 5})
    _truncate_one(made)
    with pytest.raises(UserError, match="more than --max-skip-fraction 0.01"):
        prepare_dataset(
            "folder", tmp_path / "out", root=tmp_path / "raw", eval_fraction=0.2, progress=False
        )
    assert not (tmp_path / "out" / "meta.json").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".partial")]


# --------------------------------------------------------------------------- digits-lt


def reference_digits() -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """docs/data.md's definition, written out: pixels, labels, eval ids, train ids."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target
    grey = np.clip(np.round(digits.images * 255 / 16), 0, 255).astype(np.uint8)
    pixels = np.stack([np.asarray(Image.fromarray(g).resize((32, 32), Image.BICUBIC))
                       for g in grey]).astype(np.float64)  # fmt: skip
    rng = np.random.RandomState(0)
    eval_ids = []
    for c in range(10):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        eval_ids.extend(idx[:50].tolist())
    pool = np.array(sorted(set(range(len(labels))) - set(eval_ids)))
    train_ids = pool[reference_selection(labels[pool], lt_counts(120, 10, 20))].tolist()
    return pixels, labels, eval_ids, train_ids


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return prepare_dataset(
        "digits-lt", tmp_path_factory.mktemp("digits") / "out", shard_size="100KB", progress=False
    )


def test_digits_lt_counts_and_meta(digits):
    assert digits.dataset == "digits-lt"
    assert digits.train_counts == [120, 86, 61, 44, 31, 22, 16, 11, 8, 6]
    assert digits.eval_counts == [50] * 10
    assert digits.imbalance_factor == 20.0
    assert digits.image_size == 32
    assert digits.class_names == [str(c) for c in range(10)]
    assert digits.groups["paper"] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert digits.groups["count"] == [0, 1, 1, 1, 1, 1, 2, 2, 2, 2]


def test_digits_lt_holds_exactly_the_documented_images(digits):
    pixels, labels, eval_ids, train_ids = reference_digits()
    flat = pixels.reshape(len(pixels), -1).astype(np.float32)
    candidates = {c: np.where(labels == c)[0] for c in range(10)}  # digits' labels = model labels
    for split, ids in (("train", train_ids), ("eval", eval_ids)):
        stored = read_dali(digits, split)
        assert stored == read_webdataset(digits, split)
        found = Counter()
        for (jpg, label), n in stored.items():
            image = np.asarray(Image.open(io.BytesIO(jpg)))
            assert image.shape == (32, 32, 3)
            grey = image[..., 0].reshape(1, -1).astype(np.float32)
            distance = np.abs(flat[candidates[label]] - grey).mean(1)
            nearest = int(distance.argmin())
            assert distance[nearest] < 3.0  # JPEG q95 noise, far below another digit's distance
            found[(int(candidates[label][nearest]), label)] += n
        assert found == Counter((i, int(labels[i])) for i in ids)


# --------------------------------------------------------------------------- resume and safety


def _noise_folder(root: Path, classes: int = 4, per_class: int = 30) -> None:
    rng = np.random.RandomState(5)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            array = rng.randint(0, 256, size=(24, 24, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / f"class{c}" / f"{i:03d}.jpg", quality=90)


def _prepare_argv(raw: Path, out: Path, workers: int) -> list[str]:
    return ["data", "prepare", "folder", "--root", str(raw), "--out", str(out),
            "--eval-fraction", "0.25", "--shard-size", "3KB", "--workers", str(workers),
            "--no-progress"]  # fmt: skip


@pytest.mark.slow
def test_killed_preparation_resumes_to_byte_identical_shards(tmp_path):
    raw = tmp_path / "raw"
    _noise_folder(raw)
    assert main(_prepare_argv(raw, tmp_path / "whole", 1)) == 0

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deitlt_scale.cli", *_prepare_argv(raw, out, 2)],
        start_new_session=True,  # its own process group: workers are stopped and killed too
        stderr=subprocess.PIPE,
    )
    progress = out / PROGRESS_FILE
    try:
        # Let it run in 2 ms slices and look only while it is stopped, so the kill lands
        # after a few shards are durable and long before the ~100 shards are all written.
        deadline = time.monotonic() + 120
        while not (progress.is_file() and len(progress.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no shard was written in time"
            os.killpg(proc.pid, signal.SIGCONT)
            time.sleep(0.002)
            os.killpg(proc.pid, signal.SIGSTOP)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "meta.json").exists()  # killed mid-way
    finished = {json.loads(line)["info"]["name"] for line in progress.read_text().splitlines()[:3]}
    kept = {name: (out / name).stat().st_mtime_ns for name in finished}

    assert main(_prepare_argv(raw, out, 2)) == 0
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == kept  # not rewritten
    whole, resumed = shard_bytes(tmp_path / "whole"), shard_bytes(out)
    assert len(whole) > 20
    assert resumed == whole


def test_rerun_of_a_complete_preparation_changes_nothing(tmp_path):
    make_folder(tmp_path / "raw", {"a": 4, "b": 2})
    kwargs = dict(root=tmp_path / "raw", eval_fraction=0.5, progress=False)
    prepare_dataset("folder", tmp_path / "out", **kwargs)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    prepare_dataset("folder", tmp_path / "out", **kwargs)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before


def test_a_damaged_shard_is_rewritten_on_rerun(tmp_path):
    make_folder(tmp_path / "raw", {"a": 6, "b": 4})
    kwargs = dict(root=tmp_path / "raw", eval_fraction=0.5, shard_size="2KB", progress=False)
    meta = prepare_dataset("folder", tmp_path / "out", **kwargs)
    tar = meta.shard_files("train")[1][0]
    good = tar.read_bytes()
    tar.write_bytes(good[:-1024])
    prepare_dataset("folder", tmp_path / "out", **kwargs)
    assert tar.read_bytes() == good


def test_output_holding_another_dataset_is_refused_without_overwrite(tmp_path):
    make_folder(tmp_path / "raw", {"a": 4, "b": 2})
    prepare_dataset("folder", tmp_path / "out", root=tmp_path / "raw", eval_fraction=0.5,
                    progress=False)  # fmt: skip
    before = shard_bytes(tmp_path / "out")
    with pytest.raises(UserError, match="--overwrite"):
        prepare_dataset("digits-lt", tmp_path / "out", progress=False)
    assert shard_bytes(tmp_path / "out") == before
    meta = prepare_dataset("digits-lt", tmp_path / "out", overwrite=True, progress=False)
    assert meta.dataset == "digits-lt"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [
        "eval-000000.tar", "train-000000.tar"]  # fmt: skip


def test_output_with_foreign_shards_and_no_plan_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"someone else's")
    with pytest.raises(UserError, match="another dataset"):
        prepare_dataset("digits-lt", out, progress=False)
    assert (out / "train-000000.tar").read_bytes() == b"someone else's"


def test_shards_are_shuffled_across_classes(digits):
    first = [lab for _, lab in read_webdataset(digits, "train")][:40]
    assert len(set(first)) > 3  # not stored class by class


# --------------------------------------------------------------------------- command line


def test_cli_sources_match_the_library():
    from deitlt_scale.commands import data

    assert data.SOURCES == SOURCES


def test_prepare_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "prepare", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--root",
        "--out",
        "--imbalance",
        "--shard-size",
        "--workers",
        "--overwrite",
        "--skip-bad",
        "--max-skip-fraction",
        "--eval-fraction",
        "--train-list",
    ):
        assert flag in text  # fmt: skip


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["data", "prepare", "cifar10-lt", "--root", str(tmp_path), "--out",
                 str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cifar-10-python.tar.gz" in err


def test_inspect_prints_histogram_writes_plot_and_verifies(digits, tmp_path, capsys):
    plot = tmp_path / "counts.png"
    assert main(["data", "inspect", str(digits.root), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "    9 9                      6 " in out
    assert "train-000000.tar" in out and "all shards verified" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_fails_on_a_corrupted_shard(tmp_path, capsys):
    make_folder(tmp_path / "raw", {"a": 4, "b": 2})
    meta = prepare_dataset("folder", tmp_path / "out", root=tmp_path / "raw", eval_fraction=0.5,
                           progress=False)  # fmt: skip
    tar = meta.shard_files("train")[0][0]
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert main(["data", "inspect", str(tmp_path / "out"), "--no-plot"]) == 1
    assert "sha256" in capsys.readouterr().err


def test_inspect_fails_on_an_index_that_does_not_match(tmp_path, capsys):
    make_folder(tmp_path / "raw", {"a": 4, "b": 2})
    meta = prepare_dataset("folder", tmp_path / "out", root=tmp_path / "raw", eval_fraction=0.5,
                           progress=False)  # fmt: skip
    idx = meta.shard_files("train")[0][1]
    idx.write_text(idx.read_text().replace("jpg 512", "jpg 1024", 1))
    assert main(["data", "inspect", str(tmp_path / "out"), "--no-plot"]) == 1
    assert "does not match" in capsys.readouterr().err


def test_meta_json_is_loadable_and_lists_every_shard(digits):
    raw = json.loads((digits.root / "meta.json").read_text())
    for split in ("train", "eval"):
        shards = raw["splits"][split]["shards"]
        assert sum(s["num_samples"] for s in shards) == raw["splits"][split]["num_samples"]
        assert all(set(s) == {"name", "index", "num_samples", "bytes", "sha256"} for s in shards)
    assert raw["source"]["jpeg"]["stored"].startswith("original bytes")


def test_an_option_that_does_not_apply_to_the_source_is_refused(tmp_path):
    with pytest.raises(UserError, match="--eval-fraction does not apply to digits-lt"):
        prepare_dataset("digits-lt", tmp_path / "out", eval_fraction=0.5)


def test_different_options_on_a_prepared_directory_are_refused(tmp_path):
    make_folder(tmp_path / "raw", {"a": 4, "b": 2})
    kwargs = dict(root=tmp_path / "raw", eval_fraction=0.5, progress=False)
    prepare_dataset("folder", tmp_path / "out", **kwargs)
    with pytest.raises(UserError, match=r"other inputs or options \(.plan.json: options.seed"):
        prepare_dataset("folder", tmp_path / "out", seed=1, **kwargs)


@pytest.mark.parametrize(
    ("text", "value"),
    [("256MB", 256_000_000), ("64KiB", 65536), ("1.5GB", 1_500_000_000), ("4096", 4096)],
)
def test_shard_sizes_accept_units(text, value):
    assert parse_size(text) == value


def test_shard_size_without_a_number_is_refused():
    with pytest.raises(UserError, match="256MB"):
        parse_size("big")


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    make_folder(tmp_path / "raw", {"a": 4, "b": 2})
    prepare_dataset("folder", tmp_path / "out", root=tmp_path / "raw", eval_fraction=0.5)
    err = capsys.readouterr().err
    assert "prepare raw" in err and "img/s" in err


def test_bench_prepare_prints_the_ratio_last(tmp_path, capsys):
    argv = ["bench", "prepare", "--images", "12", "--image-size", "32", "--classes", "2",
            "--workers", "1", "--workdir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "sequential copy into one tar" in lines[-3]
    assert "deitlt data prepare" in lines[-2]
    assert lines[-1].startswith("ratio prepare/copy: ")
    assert list(tmp_path.iterdir()) == []  # the work directory is removed


def test_text_histogram_groups_many_classes_into_fifty_rows():
    from deitlt_scale.commands.data import histogram_lines

    counts = sorted(np.random.RandomState(0).randint(1, 1000, size=250).tolist(), reverse=True)
    lines = histogram_lines(counts, [""] * 250)
    assert len(lines) == 1 + 50
    assert "5 class(es) per row" in lines[0]
    assert lines[1].split()[0] == "0-4"
