"""Readers of raw datasets given as files: ImageNet-LT, iNaturalist-2018, Places-LT and any
``<path> <label>`` lists (:func:`read_lists`), and one folder per class (:func:`read_folder`).

Files are only listed and stat'ed, never decoded; the records they return and the long-tail
selection they share live in :mod:`deitlt_scale.data.sources`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deitlt_scale.data.sources import Record, SourceData, select_longtail
from deitlt_scale.errors import UserError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
DEFAULT_NUM_CLASSES = {"imagenet-lt": 1000, "inat2018": 8142, "places-lt": 365}
DEFAULT_LISTS = {
    "imagenet-lt": (
        ("ImageNet_LT_train.txt", "Imagenet_LT_train.txt"),
        ("ImageNet_LT_test.txt", "Imagenet_LT_test.txt"),
    ),
    "inat2018": (("iNaturalist18_train.txt",), ("iNaturalist18_val.txt",)),
    "places-lt": (("Places_LT_train.txt",), ("Places_LT_test.txt",)),
}


# --------------------------------------------------------------------------- list files


@dataclass(frozen=True)
class _Entry:
    where: str  # "LIST:LINE"
    path: str  # as written in the list
    label: int


def _stat_sizes(paths: Sequence[Path]) -> list[int | None]:
    """File sizes in bytes (None when missing); threads hide network file-system latency."""

    def size(path: Path) -> int | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_size if path.is_file() else None

    if len(paths) < 256:
        return [size(p) for p in paths]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(size, paths))


class _BadEntries:
    """Collects bad list/folder entries; raises on the first unless ``skip`` (--skip-bad)."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.items: list[dict[str, str]] = []

    def add(self, where: str, reason: str) -> None:
        self.items.append({"source": where, "reason": reason})

    def raise_if_any(self) -> None:
        if self.items and not self.skip:
            first = self.items[0]
            more = f" (and {len(self.items) - 1} more)" if len(self.items) > 1 else ""
            raise UserError(
                f"{first['source']}: {first['reason']}{more}; fix the list, "
                "or pass --skip-bad to skip such entries and count them"
            )


def _parse_list(path: Path, bad: _BadEntries) -> list[_Entry]:
    """``<relative path> <integer label>`` per line, whitespace-separated; blank lines ignored."""
    if not path.is_file():
        raise UserError(f"list file {path} not found; pass the right --train-list/--eval-list")
    entries: list[_Entry] = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}:{number}"
            if len(fields) != 2:
                bad.add(where, f"expected '<path> <label>', got {line.strip()!r}")
                continue
            try:
                label = int(fields[1])
            except ValueError:
                bad.add(where, f"label {fields[1]!r} is not an integer")
                continue
            entries.append(_Entry(where, fields[0], label))
    return entries


def _check_entries(
    entries: list[_Entry], root: Path, num_classes: int, seen: set[str], bad: _BadEntries
) -> list[Record]:
    """Records of the good entries: label in range, file present, path not seen before."""
    paths = [root / e.path for e in entries]
    sizes = _stat_sizes(paths)
    records: list[Record] = []
    for entry, path, size in zip(entries, paths, sizes):
        normal = os.path.normpath(str(path))
        if not 0 <= entry.label < num_classes:
            bad.add(entry.where, f"label {entry.label} is outside 0..{num_classes - 1}")
        elif normal in seen:
            bad.add(entry.where, f"duplicate path {entry.path}")
        elif size is None:
            bad.add(entry.where, f"file {entry.path} not found under {root}")
        else:
            seen.add(normal)
            records.append(Record(normal, entry.label, size))
    return records


def _names_from_parents(records: list[Record], root: Path, num_classes: int) -> list[str]:
    """Per class, the folder its training images share, less the leading folders common to all
    classes (ImageNet ``train/n01440764`` -> ``n01440764``, iNat ``train_val2018/Plantae/7477``
    -> ``Plantae/7477``), when every class has a folder of its own; "" otherwise."""
    parents: list[set[str]] = [set() for _ in range(num_classes)]
    for record in records:
        parents[record.label].add(os.path.relpath(os.path.dirname(record.ref), root))
    if any(len(p) != 1 for p in parents):
        return [""] * num_classes
    names = [next(iter(p)) for p in parents]
    if len(set(names)) != num_classes:
        return [""] * num_classes
    if num_classes > 1:
        common = os.path.commonpath(names)
        if common:
            names = [os.path.relpath(n, common) for n in names]
    return names


INAT_CATEGORIES = "categories.json"  # iNaturalist-2018's category file, beside the lists


def _inat_category_names(root: Path, num_classes: int) -> list[str] | None:
    """Per label, the species name iNaturalist-2018's ``categories.json`` gives its category id
    (``[{"id": 0, "name": "Plantae ...", ...}, ...]``); None when the file is absent or does
    not name every class."""
    path = root / INAT_CATEGORIES
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text())
        names = {int(e["id"]): str(e["name"]) for e in entries}
    except (ValueError, TypeError, KeyError) as err:
        raise UserError(f"{path} is not iNaturalist's category list ({err})") from None
    if sorted(names) != list(range(num_classes)):
        return None
    return [names[c] for c in range(num_classes)]


def _default_list(dataset: str, root: Path, which: int, flag: str) -> Path:
    candidates = DEFAULT_LISTS.get(dataset, ((), ()))[which]
    for name in candidates:
        if (root / name).is_file():
            return root / name
    known = f" (looked for {', '.join(candidates)} in {root})" if candidates else ""
    raise UserError(f"{dataset} needs {flag} <list file>{known}")


def read_lists(
    source: str,
    root: str | Path,
    train_list: str | Path | None = None,
    eval_list: str | Path | None = None,
    num_classes: int | None = None,
    skip_bad: bool = False,
    name: str | None = None,
    val_list: str | Path | None = None,
) -> SourceData:
    """ImageNet-LT, iNaturalist-2018, Places-LT or any ``<path> <label>`` lists (METHOD.md
    1.2, 1.3). ``val_list``: a held-out validation list (ImageNet-LT and Places-LT ship one of
    20 images per class: ``ImageNet_LT_val.txt``, ``Places_LT_val.txt``), checked like the
    others and disjoint from both.

    ``source`` is ``imagenet-lt``, ``inat2018``, ``places-lt`` or ``list``; ``name`` overrides
    the dataset
    name (``list`` defaults to the root folder's name). Paths are relative to ``root``.
    ``num_classes`` defaults to 1000 (imagenet-lt), 8142 (inat2018), or the largest training
    label + 1. Bad lines (malformed, non-integer or out-of-range label, missing file, path listed
    twice, eval path also in train) raise a :class:`UserError` naming ``LIST:LINE``, or are
    skipped and counted with ``skip_bad``.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--root {root} is not a directory; point it at the image root")
    dataset = name or (root.resolve().name if source == "list" else source)
    train_path = Path(train_list) if train_list else _default_list(source, root, 0, "--train-list")
    eval_path = Path(eval_list) if eval_list else _default_list(source, root, 1, "--eval-list")
    bad = _BadEntries(skip_bad)
    train_entries = _parse_list(train_path, bad)
    eval_entries = _parse_list(eval_path, bad)
    if not train_entries:
        raise UserError(f"{train_path} lists no image; expected '<path> <label>' lines")
    if num_classes is None:
        num_classes = DEFAULT_NUM_CLASSES.get(source) or max(e.label for e in train_entries) + 1
    seen: set[str] = set()
    train = _check_entries(train_entries, root, num_classes, seen, bad)
    evals = _check_entries(eval_entries, root, num_classes, seen, bad)
    val: list[Record] = []
    details: dict[str, Any] = {}
    if val_list is not None:
        val = _check_entries(_parse_list(Path(val_list), bad), root, num_classes, seen, bad)
        details["val_list"] = str(val_list)
    bad.raise_if_any()
    names = _inat_category_names(root, num_classes) if source == "inat2018" else None
    return SourceData(
        dataset=dataset,
        num_classes=num_classes,
        class_names=names or _names_from_parents(train, root, num_classes),
        train=train,
        eval=evals,
        skipped=bad.items,
        details={
            "raw": str(root),
            "train_list": str(train_path),
            "eval_list": str(eval_path),
            **details,
        },
        val=val,
    )


# --------------------------------------------------------------------------- class folders


def _images_under(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursively, by extension), in sorted path order."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        found.extend(
            Path(dirpath, f)
            for f in sorted(filenames)
            if Path(f).suffix.lower() in IMAGE_EXTENSIONS and not f.startswith(".")
        )
    return found


def _class_folders(root: Path, flag: str) -> list[Path]:
    if not root.is_dir():
        raise UserError(f"{flag} {root} is not a directory; it must hold one folder per class")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"{flag} {root} holds no class folder; expected {root}/<class>/<image>")
    return folders


def _folder_records(folders: list[Path], labels: dict[str, int], flag: str) -> list[Record]:
    records: list[Record] = []
    for folder in folders:
        files = _images_under(folder)
        if not files and flag == "--root":
            raise UserError(f"class folder {folder} holds no image; remove it or add images")
        sizes = _stat_sizes(files)
        records.extend(
            Record(str(f), labels[folder.name], s) for f, s in zip(files, sizes) if s is not None
        )
    return records


def read_folder(
    root: str | Path,
    eval_root: str | Path | None = None,
    eval_fraction: float | None = None,
    name: str | None = None,
) -> SourceData:
    """One sub-folder per class (labels = sorted folder names); ``name`` defaults to the root
    folder's name. Eval is ``eval_root`` (the same
    class folders) or, with ``eval_fraction`` f, a balanced held-out split: ``floor(f * n_min)``
    images per class (at least 1, leaving at least one for training), chosen by a seeded
    shuffle of each class's files as in :func:`select_longtail`."""
    root = Path(root)
    folders = _class_folders(root, "--root")
    labels = {f.name: i for i, f in enumerate(folders)}
    records = _folder_records(folders, labels, "--root")
    k = len(folders)
    details: dict[str, Any] = {"raw": str(root)}
    if eval_root is not None:
        eval_folders = _class_folders(Path(eval_root), "--eval-root")
        unknown = [f.name for f in eval_folders if f.name not in labels]
        if unknown:
            raise UserError(
                f"--eval-root {eval_root} has class folder {unknown[0]!r} that --root {root} "
                "lacks; both must use the same class folder names"
            )
        train, evals = records, _folder_records(eval_folders, labels, "--eval-root")
        details["eval_root"] = str(eval_root)
    elif eval_fraction is not None:
        if not 0 < eval_fraction < 1:
            raise UserError(f"--eval-fraction must be between 0 and 1, got {eval_fraction}")
        per_class = np.bincount([r.label for r in records], minlength=k)
        n_min = int(per_class.min())
        if n_min < 2:
            raise UserError(
                f"class folder {folders[int(per_class.argmin())]} has {n_min} image(s); "
                "--eval-fraction needs at least 2 per class (or use --eval-root)"
            )
        held = min(max(1, int(eval_fraction * n_min)), n_min - 1)
        held_idx = set(select_longtail([r.label for r in records], [held] * k))
        train = [r for i, r in enumerate(records) if i not in held_idx]
        evals = [r for i, r in enumerate(records) if i in held_idx]
        details.update(eval_fraction=eval_fraction, eval_per_class=held)
    else:
        raise UserError("folder needs --eval-root DIR or --eval-fraction F for its eval split")
    return SourceData(
        dataset=name or root.resolve().name,
        num_classes=k,
        class_names=[f.name for f in folders],
        train=train,
        eval=evals,
        details=details,
    )
