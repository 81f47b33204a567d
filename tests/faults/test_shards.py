"""Damaged data: missing, truncated or corrupt shards, a corrupt JPEG, an index not matching its tar.

Each damage is applied to a copy of the prepared digits. `deitlt data inspect` must report it
naming the shard; training must refuse it with one line naming the shard. Training is checked
through the loaders the trainer builds (the checks run before any step); the corrupt JPEG, which
only decoding reveals, through a real `deitlt train`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from deitlt_scale import cli
from deitlt_scale import config as config_mod
from deitlt_scale.data import meta as meta_mod
from deitlt_scale.data.shard_files import ShardError
from deitlt_scale.engine.components import build_eval_loader, build_train_loader
from deitlt_scale.engine.distributed import World
from deitlt_scale.steps import resolve_steps
from faults import RECIPE, TrainProcess, one_line_error, tiny_overrides

SHARD = "train-000003"  # the damaged shard (one of 17 train shards)


def _members(data: Path, shard: str) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every member the shard's index lists."""
    out = []
    for line in (data / f"{shard}.idx").read_text().splitlines()[1:]:
        fields = line.split()
        for i in range(0, len(fields), 4):
            out.append((fields[i + 3], int(fields[i + 1]), int(fields[i + 2])))
    return out


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def delete_tar(data: Path) -> str:
    (data / f"{SHARD}.tar").unlink()
    return SHARD


def truncate_tar(data: Path) -> str:
    tar = data / f"{SHARD}.tar"
    with open(tar, "r+b") as f:
        f.truncate(tar.stat().st_size // 2)
    return SHARD


def corrupt_tar_header(data: Path) -> str:
    _overwrite(data / f"{SHARD}.tar", 0, b"\xff" * 512)  # same size, first member unreadable
    return SHARD


def delete_index(data: Path) -> str:
    (data / f"{SHARD}.idx").unlink()
    return SHARD


def foreign_index(data: Path) -> str:
    shutil.copy(data / "train-000004.idx", data / f"{SHARD}.idx")
    return SHARD


def delete_eval_tar(data: Path) -> str:
    (data / "eval-000002.tar").unlink()
    return "eval-000002"


def corrupt_jpeg(data: Path) -> str:
    """Zero one image's bytes inside the tar: sizes and index stay valid, decoding fails."""
    _, offset, size = next(m for m in _members(data, SHARD) if m[0].endswith(".jpg"))
    _overwrite(data / f"{SHARD}.tar", offset, b"\x00" * size)
    return SHARD


DAMAGES: dict[str, tuple[Callable[[Path], str], str]] = {
    "missing shard": (delete_tar, "a train shard's tar is deleted"),
    "truncated shard": (truncate_tar, "a train shard is truncated to half its size"),
    "corrupt shard": (corrupt_tar_header, "a train shard's first tar header is overwritten"),
    "missing index": (delete_index, "a train shard's DALI index is deleted"),
    "foreign index": (foreign_index, "a train shard's index is another shard's"),
    "missing eval shard": (delete_eval_tar, "an eval shard's tar is deleted"),
}


def _damaged_copy(digits_lt: Path, tmp_path: Path, damage: Callable[[Path], str]):
    data = tmp_path / "data"
    shutil.copytree(digits_lt, data)
    return data, damage(data)


def _inspect(data: Path, capsys) -> tuple[int, list[str]]:
    code = cli.main(["data", "inspect", str(data), "--no-plot"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return code, errors


def _build_loaders(data: Path, teacher: Path, run_dir: Path) -> None:
    """What `deitlt train` builds for its data, with the run's own config."""
    cfg = config_mod.load(RECIPE, tiny_overrides(data, teacher, run_dir))
    meta = meta_mod.load(data)
    steps = resolve_steps(cfg, meta.num_samples("train"), 1)
    world = World(0, 0, 1, torch.device("cpu"), "gloo")
    build_train_loader(cfg, meta, steps, world)
    build_eval_loader(cfg, meta, world)


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(
            kind,
            marks=pytest.mark.fault(
                f"{what}",
                "`deitlt data inspect` exits 1 naming the shard; training refuses it before "
                "step 1 with one line naming the shard",
            ),
        )
        for kind, (_, what) in DAMAGES.items()
    ],
)
def test_a_damaged_shard_is_named_by_inspect_and_refused_by_training(
    kind, digits_lt, random_teacher, tmp_path, capsys
):
    data, shard = _damaged_copy(digits_lt, tmp_path, DAMAGES[kind][0])
    code, errors = _inspect(data, capsys)
    assert code == 1
    assert any(shard in line for line in errors), errors
    with pytest.raises(ShardError) as refused:
        _build_loaders(data, random_teacher, tmp_path / "run")
    message = str(refused.value)
    assert "\n" not in message and f"{shard}." in message, message
    assert not (tmp_path / "run").exists()


@pytest.mark.fault(
    "a corrupt JPEG inside a shard (sizes and index intact)",
    "`deitlt data inspect` exits 1 naming the shard (checksum)",
)
def test_inspect_names_the_shard_of_a_corrupt_jpeg(digits_lt, tmp_path, capsys):
    data, shard = _damaged_copy(digits_lt, tmp_path, corrupt_jpeg)
    code, errors = _inspect(data, capsys)
    assert code == 1
    assert any(shard in line and "sha256" in line for line in errors), errors


@pytest.fixture(scope="module")
def jpeg_run(digits_lt, random_teacher, tmp_path_factory):
    """`deitlt train` on data whose one JPEG is corrupt: it fails when that image is decoded."""
    root = tmp_path_factory.mktemp("jpeg")
    data, shard = _damaged_copy(digits_lt, root, corrupt_jpeg)
    run_dir = root / "run"
    # Nearly every image read in the first epoch (400 of 405, in full micro-batches of 16); with
    # repeated augmentation an epoch reads about a third of them.
    every_image = {"data.repeated_aug": 1, "data.epoch_multiple": 16}
    overrides = tiny_overrides(data, random_teacher, run_dir, **every_image)
    done = TrainProcess.start(overrides, root / "logs").finish()
    return {"done": done, "shard": shard, "run_dir": run_dir}


@pytest.mark.slow
@pytest.mark.fault(
    "a corrupt JPEG inside a shard, met during training",
    "training stops with exit 2 and one line, no traceback and no hang",
)
def test_a_corrupt_jpeg_stops_training_with_one_line(jpeg_run):
    done = jpeg_run["done"]
    assert done.returncode == 2, done.describe()
    line = one_line_error(done)
    assert line.startswith("deitlt train: error: reading ")


@pytest.mark.slow
@pytest.mark.fault(
    "a corrupt JPEG inside a shard, met during training",
    "the error line names the damaged shard",
)
def test_a_corrupt_jpeg_met_in_training_is_named(jpeg_run):
    line = one_line_error(jpeg_run["done"])
    assert f"{jpeg_run['shard']}.tar" in line, line
