"""The shards of a split as the loaders read them (:class:`ShardFiles`), checked before DALI
touches them (:func:`check_shards`), and the one error a bad shard gives (:class:`ShardError`,
also for a DALI read that fails: :func:`shard_error`)."""

from __future__ import annotations

import dataclasses
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from deitlt_scale.data.dali import LABEL_BYTES
from deitlt_scale.data.meta import DatasetMeta
from deitlt_scale.data.shards import sha256_file
from deitlt_scale.errors import UserError


class ShardError(UserError):
    """A shard that is missing, truncated, inconsistent with its index, or lacks a label."""


@dataclass(frozen=True)
class ShardFiles:
    tar: Path
    index: Path
    num_samples: int
    bytes: int  # expected tar size, from meta.json
    sha256: str = ""  # expected checksum, from meta.json (checked only on the error path)


def check_shards(meta: DatasetMeta, split: str) -> list[ShardFiles]:
    """Verify every shard of ``split`` before DALI touches it; raise :class:`ShardError` naming it.

    Checks: tar and index exist; the tar has the size meta.json records; the index has the
    recorded sample count, every sample has a ``.jpg`` and a ``.cls`` within the tar, and the tar
    headers of the first and last indexed members carry the names the index gives.
    """
    infos = meta.splits[split]["shards"]
    files = meta.shard_files(split)
    if not files:
        raise ShardError(
            f"{meta.root}/meta.json lists no {split} shards; re-run `deitlt data prepare`"
        )
    out = []
    for (tar, index), info in zip(files, infos):
        shard = _check_shard(tar, index, int(info["num_samples"]), int(info["bytes"]))
        out.append(dataclasses.replace(shard, sha256=str(info.get("sha256", ""))))
    total = sum(s.num_samples for s in out)
    if total != meta.num_samples(split):
        raise ShardError(
            f"{meta.root}/meta.json: {split} shards hold {total} samples but num_samples is "
            f"{meta.num_samples(split)}; re-run `deitlt data prepare`"
        )
    return out


def _check_shard(tar: Path, index: Path, num_samples: int, size: int) -> ShardFiles:
    redo = "re-run `deitlt data prepare`"
    if not tar.is_file():
        raise ShardError(f"shard {tar} is missing; restore it or {redo}")
    if not index.is_file():
        raise ShardError(f"index {index} of shard {tar.name} is missing; {redo}")
    actual = tar.stat().st_size
    if actual != size:
        raise ShardError(
            f"shard {tar} is {actual} bytes but meta.json records {size} (truncated or replaced); "
            f"{redo}"
        )
    lines = index.read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != "v1.2" or not head[1].isdigit():
        raise ShardError(f"index {index} has no 'v1.2 <count>' header; {redo}")
    if int(head[1]) != num_samples or len(lines) - 1 != num_samples:
        raise ShardError(
            f"index {index} lists {len(lines) - 1} samples (header {head[1]}) but shard "
            f"{tar.name} should hold {num_samples}; {redo}"
        )
    first: tuple[int, str] | None = None
    last: tuple[int, str] | None = None
    for row, line in enumerate(lines[1:], start=1):
        fields = line.split()
        if len(fields) % 4:
            raise ShardError(f"index {index} line {row + 1} is malformed; {redo}")
        parts = {}
        for i in range(0, len(fields), 4):
            ext, offset, length, name = fields[i : i + 4]
            offset_i, length_i = int(offset), int(length)
            if offset_i < 512 or offset_i + length_i > actual:
                raise ShardError(
                    f"index {index} line {row + 1}: {name} lies outside shard {tar.name}; {redo}"
                )
            parts[ext] = (offset_i, length_i, name)
            if first is None:
                first = (offset_i, name)
            last = (offset_i, name)
        missing = [ext for ext in ("jpg", "cls") if ext not in parts]
        if missing:
            raise ShardError(
                f"shard {tar}: sample {row} ({fields[3] if fields else '?'}) has no "
                f".{' or .'.join(missing)} member; {redo}"
            )
        cls_len = parts["cls"][1]
        if not 1 <= cls_len < LABEL_BYTES:
            raise ShardError(
                f"shard {tar}: label {parts['cls'][2]} is {cls_len} bytes, expected 1..{LABEL_BYTES - 1}"
            )
    with open(tar, "rb") as f:
        for offset, name in (first, last):  # type: ignore[misc]
            f.seek(offset - 512)
            header = f.read(512)
            try:
                member = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape").name
            except tarfile.TarError:
                member = None
            if member != name:
                raise ShardError(
                    f"index {index} does not match shard {tar.name}: at offset {offset} it expects "
                    f"{name}, the tar holds {member!r}; {redo}"
                )
    return ShardFiles(tar, index, num_samples, size)


def shard_error(err: Exception, shards: list[ShardFiles]) -> ShardError:
    """Turn a DALI runtime error into a one-line ShardError naming the shard where possible."""
    text = str(err)
    named = [s for s in shards if s.tar.name in text or s.index.name in text]
    culprit = named[0].tar if named else None
    if culprit is None:  # DALI did not say: find a shard that changed since it was written
        for s in shards:
            if not s.tar.is_file() or s.tar.stat().st_size != s.bytes:
                culprit = s.tar
                break
        else:  # same sizes: compare checksums (slow, but only on this error path)
            culprit = next(
                (s.tar for s in shards if s.sha256 and sha256_file(s.tar) != s.sha256), None
            )
    detail = _first_dali_line(text)
    if culprit is not None:
        return ShardError(
            f"reading shard {culprit} failed ({detail}); restore it or re-run `deitlt data prepare`"
        )
    where = shards[0].tar.parent
    return ShardError(f"reading the shards in {where} failed ({detail})")


def _first_dali_line(text: str) -> str:
    """The reason in a DALI error: the first line after "encountered:", without assert noise."""
    tail = text.split("encountered:", 1)[-1]
    skip = ("Critical error", "Error in", "which was", "File ", "C++ context", "Current pipeline")
    for line in tail.splitlines():
        line = line.strip()
        if line and not line.startswith(skip):
            line = re.sub(r'^Assert on ".*?" failed: ', "", line)
            return re.sub(r"\s+", " ", line)[:200]
    return "DALI error"
