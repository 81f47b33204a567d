"""Shard writing: tar + DALI index format, atomic names, planning by size, verification."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deitlt_scale.data.shards import (
    Sample,
    chunk_by_bytes,
    index_name,
    plan_bounds,
    read_index,
    sample_cost,
    sha256_file,
    verify_shard,
    write_shard,
)


def _samples(n: int, size: int = 700) -> list[Sample]:
    # Payload sizes vary so that data offsets are not multiples of a fixed stride.
    return [Sample(f"{i:08d}", bytes([i % 251]) * (size + 37 * i), i % 3) for i in range(n)]


@pytest.fixture
def shard(tmp_path: Path):
    info = write_shard(_samples(5), tmp_path, "train-000000.tar")
    return tmp_path, info


def test_index_is_byte_identical_to_dali_wds2idx(shard, tmp_path):
    out, info = shard
    tool = Path(sys.executable).with_name("wds2idx")
    reference = tmp_path / "reference.idx"
    subprocess.run(
        [str(tool), str(out / info.name), str(reference)], check=True, capture_output=True
    )
    assert (out / info.index).read_bytes() == reference.read_bytes()


def test_shard_info_records_size_checksum_and_count(shard):
    out, info = shard
    assert info.num_samples == 5
    assert info.bytes == (out / info.name).stat().st_size
    assert info.sha256 == sha256_file(out / info.name)
    assert info.index == index_name(info.name) == "train-000000.idx"


def test_no_partial_file_is_left_behind(shard):
    out, _ = shard
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.idx", "train-000000.tar"]


def test_labels_are_ascii_decimal_cls_members(shard):
    out, info = shard
    check = verify_shard(out / info.name, out / info.index, info)
    assert check.labels == [0, 1, 2, 0, 1]


def test_empty_shard_is_refused(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        write_shard([], tmp_path, "train-000000.tar")
    assert list(tmp_path.iterdir()) == []


def test_key_with_a_dot_is_refused(tmp_path):
    with pytest.raises(ValueError, match="must not contain"):
        write_shard([Sample("a.b", b"x", 0)], tmp_path, "train-000000.tar")


def test_read_index_groups_components_per_sample(shard):
    out, info = shard
    entries = read_index(out / info.index)
    assert len(entries) == 5
    assert [e.ext for e in entries[0]] == ["jpg", "cls"]
    data = (out / info.name).read_bytes()
    first = entries[2][0]
    assert data[first.offset : first.offset + first.size] == _samples(5)[2].image


def test_read_index_rejects_a_wrong_header(tmp_path):
    path = tmp_path / "x.idx"
    path.write_text("v1.1 1\njpg 512 3 a.jpg\n")
    with pytest.raises(ValueError, match="v1.2"):
        read_index(path)


def test_verify_accepts_a_sound_shard(shard):
    out, info = shard
    check = verify_shard(out / info.name, out / info.index, info)
    assert check.problems == []
    assert (check.num_samples, check.bytes, check.sha256) == (5, info.bytes, info.sha256)


def test_verify_reports_a_changed_byte(shard):
    out, info = shard
    path = out / info.name
    data = bytearray(path.read_bytes())
    data[1024] ^= 0xFF  # inside the first image payload
    path.write_bytes(bytes(data))
    problems = verify_shard(path, out / info.index, info).problems
    assert any("sha256" in p for p in problems)


def test_verify_reports_an_index_that_does_not_match_the_tar(shard):
    out, info = shard
    other = write_shard(_samples(5, size=300), out, "eval-000000.tar")
    shutil.copy(out / other.index, out / info.index)
    problems = verify_shard(out / info.name, out / info.index, info).problems
    assert any("does not match" in p for p in problems)


def test_verify_reports_a_missing_index(shard):
    out, info = shard
    (out / info.index).unlink()
    assert any("missing" in p for p in verify_shard(out / info.name, out / info.index).problems)


def test_plan_bounds_cover_every_sample_once_in_order():
    sizes = [100, 4000, 50, 50, 9000, 10, 10, 10]
    bounds = plan_bounds(sizes, 5000)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(sizes)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    for start, stop in bounds:
        cost = sum(sample_cost(s) for s in sizes[start:stop])
        assert stop - start == 1 or cost <= 5000  # only a lone sample may exceed the target


def test_plan_bounds_agree_with_chunk_by_bytes():
    samples = _samples(30)
    chunks = list(chunk_by_bytes(samples, 6000))
    bounds = plan_bounds([len(s.image) for s in samples], 6000)
    assert [len(c) for c in chunks] == [stop - start for start, stop in bounds]


def test_plan_bounds_of_nothing_is_no_shard():
    assert plan_bounds([], 1000) == []
