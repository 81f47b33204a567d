"""WebDataset tar shards with DALI index files, written in one pass.

A sample is ``<key>.jpg`` (encoded image bytes) + ``<key>.cls`` (the model label as ASCII
decimal). The index beside each tar follows DALI's ``wds2idx`` format v1.2, computed while
writing (the offsets are known), so no second pass over the tar is needed. A shard is written
under a temporary name and renamed when complete: a name ending in ``.tar`` is always whole.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

INDEX_VERSION = "v1.2"
IMAGE_EXT = "jpg"
LABEL_EXT = "cls"


@dataclass(frozen=True)
class Sample:
    key: str  # unique within the split, no dots or slashes
    image: bytes  # encoded image (JPEG)
    label: int  # model label


@dataclass(frozen=True)
class ShardInfo:
    name: str  # tar file name, relative to the dataset directory
    index: str  # DALI index file name
    num_samples: int
    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return asdict(self)


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx"


def write_shard(samples: Iterable[Sample], out_dir: str | Path, name: str) -> ShardInfo:
    """Write one shard and its index atomically; returns what meta.json records about it."""
    out_dir = Path(out_dir)
    tar_path, idx_path = out_dir / name, out_dir / index_name(name)
    tmp_tar = tar_path.with_name(f".{name}.partial")
    tmp_idx = idx_path.with_name(f".{idx_path.name}.partial")
    rows: list[str] = []
    digest = hashlib.sha256()
    with open(tmp_tar, "wb") as raw:
        writer = _HashingWriter(raw, digest)
        with tarfile.open(fileobj=writer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                if "." in sample.key or "/" in sample.key:
                    raise ValueError(f"sample key {sample.key!r} must not contain '.' or '/'")
                parts = []
                for ext, payload in (
                    (IMAGE_EXT, sample.image),
                    (LABEL_EXT, str(int(sample.label)).encode()),
                ):
                    member = f"{sample.key}.{ext}"
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    info.mode = 0o644
                    # Data follows the 512-byte header; the tarfile offset is where the header starts.
                    parts.append(f"{ext} {writer.tell() + 512} {len(payload)} {member}")
                    tar.addfile(info, io.BytesIO(payload))
                rows.append(" ".join(parts))
        raw.flush()
        os.fsync(raw.fileno())
        size = writer.tell()
    if not rows:
        tmp_tar.unlink()
        raise ValueError(f"shard {name} would be empty")
    tmp_idx.write_text(f"{INDEX_VERSION} {len(rows)}\n" + "\n".join(rows) + "\n")
    # Index first, tar last: a complete tar name implies its index is complete too.
    tmp_idx.replace(idx_path)
    tmp_tar.replace(tar_path)
    return ShardInfo(name, idx_path.name, len(rows), size, digest.hexdigest())


def chunk_by_bytes(samples: Iterable[Sample], shard_bytes: int) -> Iterator[list[Sample]]:
    """Group samples into shards of about ``shard_bytes`` (tar overhead included)."""
    batch: list[Sample] = []
    size = 0
    for sample in samples:
        cost = len(sample.image) + 3 * 512  # two headers + padding, roughly
        if batch and size + cost > shard_bytes:
            yield batch
            batch, size = [], 0
        batch.append(sample)
        size += cost
    if batch:
        yield batch


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class _HashingWriter(io.RawIOBase):
    """A write-only stream that counts and hashes what passes through to ``raw``."""

    def __init__(self, raw: io.BufferedWriter, digest) -> None:
        self._raw, self._digest, self._pos = raw, digest, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        self._raw.write(data)
        self._digest.update(data)
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos
