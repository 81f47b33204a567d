"""``meta.json``: what a prepared dataset directory holds, read by training, eval and export.

Labels everywhere downstream are *model* labels (classes ranked by descending training count).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deitlt_scale.data.longtail import GROUP_NAMES
from deitlt_scale.errors import UserError

META_FILE = "meta.json"
FORMAT = "deitlt-shards/1"
SPLITS = ("train", "eval")  # required; "val" (a held-out validation split) is optional
OPTIONAL_SPLITS = ("val",)


@dataclass
class DatasetMeta:
    dataset: str  # e.g. "cifar10-lt", "inat2018", "digits-lt"
    num_classes: int
    train_counts: list[int]  # per model label, non-increasing
    eval_counts: list[int]  # per model label
    class_map: list[int]  # class_map[original label] = model label
    class_names: list[str]  # per model label ("" where unknown)
    # Per model label: 0 head, 1 mid, 2 tail. "paper": the paper's index boundaries on
    # frequency-sorted ids (METHOD.md 1.5); "count": >100 / 20-100 / <20 training images.
    groups: dict[str, list[int]]
    boundaries: tuple[int, int]  # the paper convention's [b1, b2]
    imbalance_factor: float  # N_max / N_min of the training split
    splits: dict[str, dict[str, Any]]  # split -> {"num_samples": n, "shards": [ShardInfo json]}
    image_size: int | None = None  # native image size when uniform (e.g. 32 for CIFAR)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"source": ..., "reason": ...}
    source: dict[str, Any] = field(default_factory=dict)  # how it was prepared (args, versions)
    format: str = FORMAT
    val_counts: list[int] | None = None  # per model label, when a val split was held out
    root: Path | None = field(default=None, repr=False, compare=False)  # directory it was read from

    def num_samples(self, split: str) -> int:
        return int(self.splits[split]["num_samples"])

    def shard_files(self, split: str) -> list[tuple[Path, Path]]:
        """(tar, index) absolute paths of a split, in the order they were written."""
        if self.root is None:
            raise ValueError("DatasetMeta was not loaded from a directory")
        return [
            (self.root / shard["name"], self.root / shard["index"])
            for shard in self.splits[split]["shards"]
        ]

    def group_names(self) -> tuple[str, ...]:
        return GROUP_NAMES

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("root")
        out["boundaries"] = list(self.boundaries)
        return out


def save(meta: DatasetMeta, directory: str | Path) -> Path:
    """Write meta.json atomically (it is the last file a preparation writes)."""
    path = Path(directory) / META_FILE
    tmp = path.with_name(f".{META_FILE}.partial")
    tmp.write_text(json.dumps(meta.to_json(), indent=1) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def load(directory: str | Path) -> DatasetMeta:
    """Read and sanity-check a prepared dataset directory."""
    directory = Path(directory)
    path = directory / META_FILE
    if not path.is_file():
        raise UserError(
            f"{directory} holds no {META_FILE}: prepare it with `deitlt data prepare ... --out {directory}`"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); re-run `deitlt data prepare`") from None
    if raw.get("format") != FORMAT:
        raise UserError(f"{path} has format {raw.get('format')!r}, expected {FORMAT!r}")
    known = set(DatasetMeta.__dataclass_fields__) - {"root"}
    meta = DatasetMeta(**{k: v for k, v in raw.items() if k in known})
    meta.boundaries = tuple(meta.boundaries)
    meta.root = directory
    k = meta.num_classes
    for name, values in (
        ("train_counts", meta.train_counts),
        ("eval_counts", meta.eval_counts),
        ("class_map", meta.class_map),
        ("class_names", meta.class_names),
    ):
        if len(values) != k:
            raise UserError(f"{path}: {name} has {len(values)} entries for {k} classes")
    for split in SPLITS:
        if split not in meta.splits:
            raise UserError(f"{path} lists no {split!r} split")
    return meta
