"""Readers of raw datasets: each turns a source into records (a file or an array row with its
original label) and what meta.json needs to know about the classes. This module holds the CIFAR
and digits readers and what every reader shares (records, the long-tail selection, the held-out
val split, the encoding); the list and class-folder readers are in
:mod:`deitlt_scale.data.list_sources`.

Nothing here writes shards. Readers decode no image file (files are only listed and stat'ed);
the CIFAR and digits readers hold their pixel arrays, which are small by construction.
:func:`encode_file` and :func:`encode_array` turn one record into the JPEG bytes a shard stores.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from deitlt_scale.data.longtail import lt_counts
from deitlt_scale.errors import UserError

# Images that are not JPEG (PNG, CIFAR/digits arrays, CMYK JPEG, ...) are converted once to RGB
# JPEG at this quality with 4:4:4 chroma: tiny images (32 px) lose visibly less colour detail
# than with the default 4:2:0 subsampling.
JPEG_QUALITY = 95
JPEG_SUBSAMPLING = 0  # Pillow's code for 4:4:4
# The embedded default dataset: sklearn's 8x8 digits, upsampled (bicubic) to this size.
DIGITS_SIZE = 32
DIGITS_EVAL_PER_CLASS = 50
DIGITS_N_MAX = 120
DIGITS_IMBALANCE = 20.0
CIFAR_IMBALANCE = 100.0
# The reference seeds its long-tail selection with 0 (np.random.seed(0)), whatever the run seed.
SELECTION_SEED = 0
# The held-out validation split (--val-per-class) draws with its own stream, so adding it leaves
# the reference's long-tail selection untouched.
VAL_SEED = 1
# --val-per-class all: every image the long-tailed selection leaves unused (a class-imbalanced
# split that moves nothing out of train; choose on its mean per-class accuracy).
VAL_ALL = "all"


class BadImage(Exception):
    """An image that cannot be decoded (corrupt, truncated, not an image); it is skipped."""


@dataclass(frozen=True)
class Record:
    """One raw sample. ``ref`` is an absolute file path, or for array sources the row number
    (decimal text) in ``SourceData.arrays[split]``. ``size`` is the file size in bytes (the
    estimate of its stored size); 0 for array rows."""

    ref: str
    label: int  # original label
    size: int = 0


@dataclass
class SourceData:
    """Everything a reader learned about a raw dataset; labels here are *original* labels."""

    dataset: str
    num_classes: int
    class_names: list[str]  # per original label ("" where unknown)
    train: list[Record]
    eval: list[Record]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # split -> uint8 (N, H, W, 3)
    image_size: int | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)  # bad list entries (--skip-bad)
    details: dict[str, Any] = field(default_factory=dict)  # recorded in meta.json["source"]
    val: list[Record] = field(default_factory=list)  # held-out validation split; [] when none


# --------------------------------------------------------------------------- long-tail selection


def select_longtail(
    labels: Sequence[int], counts: Sequence[int], seed: int = SELECTION_SEED
) -> list[int]:
    """Indices kept by the reference CIFAR-LT rule (METHOD.md 1.1), in class-by-class order.

    ``np.random.seed(seed)``, then for each class ``c`` in ascending order: that class's indices
    in the original order, shuffled by ``np.random.shuffle``, first ``counts[c]`` kept. A private
    ``RandomState(seed)`` used sequentially draws the same stream without touching global state.
    """
    rng = np.random.RandomState(seed)
    labels = np.asarray(labels)
    kept: list[int] = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        kept.extend(idx[: int(n)].tolist())
    return kept


def hold_out_val(
    labels: np.ndarray,
    train: Sequence[int],
    pool: Sequence[int],
    per_class: int | str,
    seed: int = VAL_SEED,
) -> tuple[list[int], list[int], dict[int, int]]:
    """A balanced validation split of ``per_class`` rows per class, disjoint from the train
    rows and from anything outside ``pool`` (the test split never is in it). ``per_class`` =
    :data:`VAL_ALL` takes every unused pool row instead (as many per class as there are) and
    never touches the train split.

    The val rows of class ``c`` are drawn (a ``RandomState(seed)`` shuffle, classes in
    ascending order) from the pool rows the long-tailed ``train`` selection left unused. Where
    a class has fewer unused rows than ``per_class`` (a head class whose every image is in the
    train split, as class 0 of CIFAR-10-LT), the shortfall is moved from the end of its train
    rows; the returned ``moved`` counts them per class, and the train split of such a class is
    that much smaller than the reference's. Returns ``(train, val, moved)``; ``train`` keeps its
    order.
    """
    every = per_class == VAL_ALL
    if not every and (not isinstance(per_class, int) or per_class < 1):
        raise UserError(f"--val-per-class must be >= 1 or {VAL_ALL!r}, got {per_class!r}")
    rng = np.random.RandomState(seed)
    labels = np.asarray(labels)
    train_set = set(int(i) for i in train)
    pool = np.asarray(sorted(int(i) for i in pool))
    if every:
        unused = [int(i) for i in pool if int(i) not in train_set]
        return [int(i) for i in train], unused, {}
    val: list[int] = []
    moved: dict[int, int] = {}
    dropped: set[int] = set()
    for c in range(int(labels.max()) + 1):
        unused = np.array([i for i in pool[labels[pool] == c] if int(i) not in train_set])
        rng.shuffle(unused)
        take = unused[:per_class].tolist()
        short = per_class - len(take)
        if short > 0:
            mine = [int(i) for i in train if labels[i] == c]
            if len(mine) - short < 1:
                raise UserError(
                    f"class {c} has {len(mine) + len(take)} images outside the test split, too "
                    f"few for --val-per-class {per_class} and one training image; lower it"
                )
            take += mine[-short:]
            dropped.update(mine[-short:])
            moved[c] = short
        val.extend(int(i) for i in take)
    kept = [int(i) for i in train if int(i) not in dropped]
    return kept, val, moved


# --------------------------------------------------------------------------- encoding


def encode_array(pixels: np.ndarray) -> bytes:
    """RGB JPEG (quality 95, 4:4:4) of a uint8 ``(H, W, 3)`` array."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(
        buffer, "JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING
    )
    return buffer.getvalue()


def encode_bytes(data: bytes) -> bytes:
    """The bytes a shard stores for an encoded image file.

    A valid RGB or greyscale JPEG is returned unchanged (checked by decoding it, at 1/8 scale,
    which still reads the whole entropy-coded stream, so truncation is caught). Anything else
    Pillow decodes (PNG, BMP, CMYK JPEG, ...) is converted once to RGB JPEG (quality 95, 4:4:4;
    an alpha channel is dropped). Raises :class:`BadImage` when the data cannot be decoded.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG" and img.mode in ("RGB", "L"):
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
                return data
            img.load()
            rgb = img.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise BadImage(f"cannot decode image ({err})") from None
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING)
    return buffer.getvalue()


def encode_file(path: str) -> bytes:
    """:func:`encode_bytes` of a file; an unreadable file raises :class:`BadImage`."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise BadImage(f"cannot read ({err.strerror or err})") from None
    return encode_bytes(data)


# --------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class _CifarLayout:
    title: str
    folder: str
    tarball: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str
    names_key: str


_CIFAR = {
    "cifar10-lt": _CifarLayout(
        "CIFAR-10",
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100-lt": _CifarLayout(
        "CIFAR-100",
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        ("train",),
        "test",
        "meta",
        "fine_labels",
        "fine_label_names",
    ),
}
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches contain (dicts, lists, strings, numpy arrays), so that
    a foreign pickle cannot run code."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core.") :]  # numpy 2 moved it
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict[str, Any]:
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as err:  # any unpickling failure means "not a CIFAR batch"
        raise UserError(f"{where} is not a CIFAR python batch ({err}); {_cifar_fix()}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where} is not a CIFAR python batch (no dict inside); {_cifar_fix()}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_fix() -> str:
    return f"point --root at the original python-version archive from {_CIFAR_URL}"


def _cifar_members(dataset: str, root: Path) -> tuple[dict[str, dict[str, Any]], str]:
    """The unpickled meta, train and test members of a CIFAR tarball or extracted folder, by
    base name, and where they were read from. A tarball is read once, in stored order."""
    layout = _CIFAR[dataset]
    wanted = [*layout.train, layout.test, layout.meta]
    candidates = [root, root / layout.folder, root / layout.tarball]
    for place in candidates:
        if place.is_dir() and (place / layout.meta).is_file():
            members = {}
            for name in wanted:
                try:
                    data = (place / name).read_bytes()
                except OSError as err:
                    raise UserError(
                        f"{place / name} is unreadable ({err.strerror}); re-extract "
                        f"{layout.tarball} or point --root at the tarball"
                    ) from None
                members[name] = _unpickle(data, f"{place}/{name}")
            return members, str(place)
    tarball = next((p for p in candidates if p.is_file()), None)
    if tarball is None:
        raise UserError(
            f"--root {root} holds neither {layout.tarball} nor {layout.folder}/; "
            f"download {layout.tarball} from {_CIFAR_URL}"
        )
    members = {}
    try:
        with tarfile.open(tarball) as archive:
            for member in archive:
                name = Path(member.name).name
                if member.isfile() and name in wanted and name not in members:
                    handle = archive.extractfile(member)
                    assert handle is not None
                    members[name] = _unpickle(handle.read(), f"{tarball}:{member.name}")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(f"{tarball} is not a CIFAR archive ({err}); {_cifar_fix()}") from None
    missing = [name for name in wanted if name not in members]
    if missing:
        raise UserError(
            f"{tarball} is not a {layout.title} archive (no {missing[0]} inside); {_cifar_fix()}"
        )
    return members, str(tarball)


def _cifar_batch(batch: dict[str, Any], where: str, label_key: str):
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{where} has no (N, 3072) 'data' array; {_cifar_fix()}")
    if labels is None or len(labels) != len(data):
        raise UserError(f"{where} has no {label_key!r} list matching 'data'; {_cifar_fix()}")
    pixels = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(pixels), np.asarray(labels, dtype=np.int64)


def read_cifar(
    dataset: str,
    root: str | Path,
    imbalance: float = CIFAR_IMBALANCE,
    profile: str = "exp",
    val_per_class: int | str | None = None,
) -> SourceData:
    """CIFAR-10/100-LT from the python tarball or its extracted folder (METHOD.md 1.1).

    Train: ``n_max = len(train) / K``, counts from :func:`lt_counts`, samples kept by
    :func:`select_longtail`. Eval: the whole balanced test split. Class names from the meta file.
    ``val_per_class``: a balanced val split from the original training images
    (:func:`hold_out_val`; never from the test split).
    """
    layout = _CIFAR[dataset]
    members, where = _cifar_members(dataset, Path(root))
    names = members[layout.meta].get(layout.names_key)
    if not isinstance(names, list) or not names:
        raise UserError(f"{where}:{layout.meta} lacks {layout.names_key!r}; {_cifar_fix()}")
    k = len(names)
    parts = [
        _cifar_batch(members.pop(name), f"{where}:{name}", layout.label_key)
        for name in layout.train
    ]
    train_pixels = np.concatenate([p for p, _ in parts])
    train_labels = np.concatenate([lab for _, lab in parts])
    del parts
    test_pixels, test_labels = _cifar_batch(
        members.pop(layout.test), f"{where}:{layout.test}", layout.label_key
    )
    for labels, split in ((train_labels, "train"), (test_labels, "test")):
        if len(labels) and (labels.min() < 0 or labels.max() >= k):
            raise UserError(f"{where}: {split} labels outside 0..{k - 1}; {_cifar_fix()}")
    n_max = len(train_labels) / k  # float, as the reference's img_max
    counts = lt_counts(n_max, k, imbalance, profile)
    kept = select_longtail(train_labels, counts)
    val: list[int] = []
    val_details: dict[str, Any] = {}
    if val_per_class is not None:
        kept, val, moved = hold_out_val(train_labels, kept, range(len(train_labels)), val_per_class)
        val_details = _val_details(val_per_class, moved)
    return SourceData(
        dataset=dataset,
        num_classes=k,
        class_names=[n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names],
        train=[Record(str(i), int(train_labels[i])) for i in kept],
        eval=[Record(str(i), int(lab)) for i, lab in enumerate(test_labels)],
        arrays={"train": train_pixels, "eval": test_pixels, "val": train_pixels},
        val=[Record(str(i), int(train_labels[i])) for i in val],
        image_size=32,
        details={
            "raw": where,
            "imbalance": float(imbalance),
            "profile": profile,
            "n_max": n_max,
            "requested_counts": counts,
            "selection": f"np.random.RandomState({SELECTION_SEED}) shuffle per class (METHOD.md 1.1)",
            **val_details,
        },
    )


def _val_details(per_class: int | str, moved: dict[int, int]) -> dict[str, Any]:
    return {
        "val_per_class": per_class,
        "val_source": "training images the long-tailed selection left unused "
        f"(RandomState({VAL_SEED}) shuffle per class); never the test split",
        "val_moved_from_train": {str(c): n for c, n in moved.items()},
    }


# --------------------------------------------------------------------------- digits-lt


def read_digits(
    imbalance: float = DIGITS_IMBALANCE,
    profile: str = "exp",
    val_per_class: int | str | None = None,
) -> SourceData:
    """The embedded default dataset: scikit-learn's 8x8 handwritten digits, long-tailed.

    Eval: 50 images per class, held out first (a ``RandomState(0)`` shuffle of each class's
    indices, classes in ascending order, first 50). Train: from the rest, ``n_max = 120`` and
    the CIFAR-LT exponential profile, kept by :func:`select_longtail` (a fresh seed 0). Pixels
    (0..16) are scaled to 0..255, upsampled bicubically to 32x32 and replicated to RGB.
    ``val_per_class``: a balanced val split from the images neither split uses
    (:func:`hold_out_val`).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = np.asarray(digits.target, dtype=np.int64)
    gray = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    pixels = np.stack(
        [
            np.asarray(Image.fromarray(img, "L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.BICUBIC))
            for img in gray
        ]
    )
    pixels = np.ascontiguousarray(np.repeat(pixels[..., None], 3, axis=3))
    k = int(labels.max()) + 1
    rng = np.random.RandomState(SELECTION_SEED)
    held_out: list[int] = []
    for c in range(k):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        held_out.extend(idx[:DIGITS_EVAL_PER_CLASS].tolist())
    pool = np.setdiff1d(np.arange(len(labels)), held_out)  # ascending: the original order
    counts = lt_counts(DIGITS_N_MAX, k, imbalance, profile)
    kept = pool[select_longtail(labels[pool], counts)]
    val: list[int] = []
    val_details: dict[str, Any] = {}
    if val_per_class is not None:
        kept, val, moved = hold_out_val(labels, kept.tolist(), pool, val_per_class)
        val_details = _val_details(val_per_class, moved)
    return SourceData(
        dataset="digits-lt",
        num_classes=k,
        class_names=[str(c) for c in range(k)],
        train=[Record(str(i), int(labels[i])) for i in kept],
        eval=[Record(str(i), int(labels[i])) for i in sorted(held_out)],
        arrays={"train": pixels, "eval": pixels, "val": pixels},
        val=[Record(str(i), int(labels[i])) for i in sorted(val)],
        image_size=DIGITS_SIZE,
        details={
            "raw": "sklearn.datasets.load_digits (1,797 8x8 images)",
            "imbalance": float(imbalance),
            "profile": profile,
            "n_max": DIGITS_N_MAX,
            "eval_per_class": DIGITS_EVAL_PER_CLASS,
            "requested_counts": counts,
            "upsampling": f"bicubic 8->{DIGITS_SIZE} px, grey replicated to RGB",
            **val_details,
        },
    )
