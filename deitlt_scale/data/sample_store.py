"""Random access to the encoded training images and their labels, by stored sample index.

A sample's stored index is its position in the split's shards concatenated in meta.json order,
rows in DALI-index order. The store reads each shard's DALI index (``<shard>.idx``: per member
its extension, byte offset and length inside the tar) once, then serves any sample's JPEG bytes
in O(1): from memory when the split's encoded images fit in ``cache_bytes`` (read once,
sequentially, shard by shard), otherwise by ``os.pread`` from the tar at the indexed offset,
which the OS page cache serves after the first epoch when the node's memory holds the split.
Either way an epoch may visit the samples in any order, which is what an exact per-epoch
permutation of the whole split needs.

Labels (the ``.cls`` members) are read once when the store is created. A read that fails or
comes back short (a shard deleted or truncated after the loader checked it) raises
:class:`ShardError` naming the shard.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import numpy as np

from deitlt_scale.data.shard_files import ShardError, ShardFiles

REDO = "restore it or re-run `deitlt data prepare`"


@dataclass
class SampleStore:
    """Encoded images and labels of one split, addressable by stored sample index."""

    shards: list[ShardFiles]
    shard_of: np.ndarray  # (N,) int32 index into ``shards``
    offset: np.ndarray  # (N,) int64 byte offset of the JPEG inside its tar
    length: np.ndarray  # (N,) int64 JPEG length in bytes
    labels: np.ndarray  # (N,) int64 model labels
    keys: list[str]  # (N,) WebDataset sample keys (member names without extension)
    cache: np.ndarray | None = None  # all JPEGs back to back, when cached
    cache_offset: np.ndarray | None = None  # (N,) int64 start of each JPEG in ``cache``
    _files: dict[int, int] = field(default_factory=dict, repr=False)  # shard -> open fd

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def cached(self) -> bool:
        return self.cache is not None

    @property
    def encoded_bytes(self) -> int:
        return int(self.length.sum())

    def encoded(self, index: int) -> np.ndarray:
        """The JPEG bytes of sample ``index`` as a 1-D uint8 array (a view when cached)."""
        length = int(self.length[index])
        if self.cache is not None:
            start = int(self.cache_offset[index])  # type: ignore[index]
            return self.cache[start : start + length]
        shard = int(self.shard_of[index])
        data = os.pread(self._fd(shard), length, int(self.offset[index]))
        if len(data) != length:
            tar = self.shards[shard].tar
            raise ShardError(
                f"reading shard {tar} failed (sample {self.keys[index]}: {len(data)} of {length} "
                f"bytes; truncated?); {REDO}"
            )
        return np.frombuffer(data, dtype=np.uint8)

    def reopen(self) -> None:
        """Close the open tars, so the next reads see the files now on disk."""
        files, self._files = self._files, {}
        for fd in files.values():
            os.close(fd)

    def _fd(self, shard: int) -> int:
        fd = self._files.get(shard)
        if fd is None:
            tar = self.shards[shard].tar
            try:
                fd = os.open(tar, os.O_RDONLY)
            except OSError as err:
                raise ShardError(f"reading shard {tar} failed ({err.strerror}); {REDO}") from None
            self._files[shard] = fd
        return fd

    def __del__(self) -> None:
        for fd in self._files.values():
            with contextlib.suppress(OSError):
                os.close(fd)


def _index_rows(shard: ShardFiles) -> list[dict[str, tuple[int, int, str]]]:
    """Per sample of the (already checked) index: ext -> (offset, length, member name)."""
    rows = []
    for line in shard.index.read_text().splitlines()[1:]:
        fields = line.split()
        rows.append(
            {
                fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                for i in range(0, len(fields), 4)
            }
        )
    return rows


def _label(raw: bytes, tar: object, name: str) -> int:
    text = raw.decode("ascii", errors="replace").strip()
    if not text.isdigit():
        raise ShardError(f"shard {tar}: label {name} is {raw!r}, not a decimal; {REDO}")
    return int(text)


def open_store(shards: list[ShardFiles], cache_bytes: int) -> SampleStore:
    """Index ``shards`` (checked by ``shard_files.check_shards``) and read the labels; cache the JPEGs
    in memory when they total at most ``cache_bytes``."""
    per_shard = [_index_rows(s) for s in shards]
    rows = [row for part in per_shard for row in part]
    n = len(rows)
    shard_of = np.repeat(np.arange(len(shards), dtype=np.int32), [len(p) for p in per_shard])
    offset = np.array([row["jpg"][0] for row in rows], dtype=np.int64)
    length = np.array([row["jpg"][1] for row in rows], dtype=np.int64)
    keys = [row["jpg"][2].rsplit(".", 1)[0] for row in rows]
    labels = np.zeros(n, dtype=np.int64)
    store = SampleStore(shards, shard_of, offset, length, labels, keys)
    cache = cache_offset = None
    if int(length.sum()) <= cache_bytes:
        cache = np.empty(int(length.sum()), dtype=np.uint8)
        cache_offset = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)
    first = 0
    for k, (shard, part) in enumerate(zip(shards, per_shard)):
        if cache is not None:  # one sequential read of the whole tar
            try:
                data = shard.tar.read_bytes()
            except OSError as err:
                raise ShardError(
                    f"reading shard {shard.tar} failed ({err.strerror}); {REDO}"
                ) from None
        for i, row in enumerate(part):
            index = first + i
            cls_offset, cls_length, cls_name = row["cls"]
            if cache is not None:
                start, end = int(offset[index]), int(offset[index] + length[index])
                if end > len(data):
                    raise ShardError(
                        f"reading shard {shard.tar} failed (sample {keys[index]} lies past its "
                        f"end; truncated?); {REDO}"
                    )
                at = int(cache_offset[index])  # type: ignore[index]
                cache[at : at + end - start] = np.frombuffer(data, np.uint8, end - start, start)
                raw = data[cls_offset : cls_offset + cls_length]
            else:
                raw = os.pread(store._fd(k), cls_length, cls_offset)
            labels[index] = _label(raw, shard.tar, cls_name)
        first += len(part)
    store.cache, store.cache_offset = cache, cache_offset
    if cache is not None:
        store.reopen()
    return store


__all__ = ["SampleStore", "open_store"]
