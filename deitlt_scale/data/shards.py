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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
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


def sample_cost(image_bytes: int) -> int:
    """Approximate bytes one sample takes in a tar: its image, two headers and padding."""
    return image_bytes + 3 * 512


def chunk_by_bytes(samples: Iterable[Sample], shard_bytes: int) -> Iterator[list[Sample]]:
    """Group samples into shards of about ``shard_bytes`` (tar overhead included)."""
    batch: list[Sample] = []
    size = 0
    for sample in samples:
        cost = sample_cost(len(sample.image))
        if batch and size + cost > shard_bytes:
            yield batch
            batch, size = [], 0
        batch.append(sample)
        size += cost
    if batch:
        yield batch


def plan_bounds(image_sizes: Sequence[int], shard_bytes: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges that cut a sample sequence into shards of about ``shard_bytes``.

    The same greedy rule as :func:`chunk_by_bytes`, applied to (estimated) image sizes in bytes
    before any image is read, so that shard contents are fixed up front. Every shard holds at
    least one sample; an empty sequence gives no shard.
    """
    bounds: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, nbytes in enumerate(image_sizes):
        cost = sample_cost(int(nbytes))
        if i > start and size + cost > shard_bytes:
            bounds.append((start, i))
            start, size = i, 0
        size += cost
    if start < len(image_sizes):
        bounds.append((start, len(image_sizes)))
    return bounds


@dataclass(frozen=True)
class IndexEntry:
    """One component of one sample in a DALI v1.2 index line: data offset and size in bytes."""

    ext: str
    offset: int
    size: int
    name: str


def read_index(path: str | Path) -> list[list[IndexEntry]]:
    """Parse a DALI ``wds2idx`` v1.2 index: one list of components per sample, in tar order."""
    path = Path(path)
    lines = path.read_text().splitlines()
    if not lines:
        raise ValueError(f"{path} is empty")
    header = lines[0].split()
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise ValueError(f"{path}:1: expected '{INDEX_VERSION} <count>', got {lines[0]!r}")
    samples: list[list[IndexEntry]] = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ValueError(f"{path}:{number}: expected groups of 'ext offset size name'")
        try:
            samples.append(
                [
                    IndexEntry(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                    for i in range(0, len(fields), 4)
                ]
            )
        except ValueError:
            raise ValueError(f"{path}:{number}: offset and size must be integers") from None
    if len(samples) != int(header[1]):
        raise ValueError(f"{path}: header announces {header[1]} samples, found {len(samples)}")
    return samples


@dataclass
class ShardCheck:
    """What :func:`verify_shard` found; ``problems`` is empty when the shard is sound."""

    num_samples: int = 0
    bytes: int = 0
    sha256: str = ""
    labels: list[int] = field(default_factory=list)  # the .cls value of every sample, in order
    problems: list[str] = field(default_factory=list)


def verify_shard(
    tar_path: str | Path, idx_path: str | Path, expected: ShardInfo | None = None
) -> ShardCheck:
    """Check a shard in one read: its sha256/size/count against ``expected`` (when given), and
    that its DALI index lists exactly the tar's entries (names, data offsets, sizes, grouping).
    Also collects every sample's label so callers can recount classes."""
    tar_path, idx_path = Path(tar_path), Path(idx_path)
    check = ShardCheck()
    if not tar_path.is_file():
        check.problems.append(f"{tar_path} is missing")
        return check
    digest = hashlib.sha256()
    entries: list[IndexEntry] = []
    try:
        with open(tar_path, "rb") as raw:
            reader = _HashingReader(raw, digest)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    ext = _split_name(member.name)[1]
                    entries.append(IndexEntry(ext, member.offset_data, member.size, member.name))
                    payload = tar.extractfile(member).read()
                    if ext == LABEL_EXT:
                        try:
                            check.labels.append(int(payload))
                        except ValueError:
                            check.problems.append(f"{tar_path}: {member.name} is not an integer")
            while reader.read(1 << 20):  # the end-of-archive padding belongs to the checksum
                pass
            check.bytes = reader.tell()
    except (tarfile.TarError, OSError, EOFError) as err:
        check.problems.append(f"{tar_path} is not a readable tar ({err})")
        return check
    check.sha256 = digest.hexdigest()
    grouped: list[list[IndexEntry]] = []
    for entry in entries:
        key = _split_name(entry.name)[0]
        if grouped and _split_name(grouped[-1][0].name)[0] == key:
            grouped[-1].append(entry)
        else:
            grouped.append([entry])
    check.num_samples = len(grouped)
    if expected is not None:
        if check.sha256 != expected.sha256:
            check.problems.append(
                f"{tar_path}: sha256 {check.sha256} != recorded {expected.sha256}"
            )
        if check.bytes != expected.bytes:
            check.problems.append(f"{tar_path}: {check.bytes} bytes != recorded {expected.bytes}")
        if check.num_samples != expected.num_samples:
            check.problems.append(
                f"{tar_path}: {check.num_samples} samples != recorded {expected.num_samples}"
            )
    if not idx_path.is_file():
        check.problems.append(f"{idx_path} is missing")
        return check
    try:
        indexed = read_index(idx_path)
    except ValueError as err:
        check.problems.append(str(err))
        return check
    if indexed != grouped:
        first = next(
            (i for i, (a, b) in enumerate(zip(indexed, grouped)) if a != b),
            min(len(indexed), len(grouped)),
        )
        check.problems.append(
            f"{idx_path} does not match {tar_path.name} (first difference at sample {first}); "
            f"rebuild it with `wds2idx {tar_path} {idx_path}`"
        )
    return check


def _split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member as WebDataset and wds2idx see it: the extension starts
    at the first dot of the base name."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class _HashingReader(io.RawIOBase):
    """A read-only stream that counts and hashes what it reads from ``raw``."""

    def __init__(self, raw, digest) -> None:
        self._raw, self._digest, self._pos = raw, digest, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self._digest.update(data)
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos


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
