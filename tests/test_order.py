"""The epoch order the train loader yields: reshuffled every epoch, and `deitlt data order`."""

from __future__ import annotations

import csv
import io
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_dali import write_dataset

from deitlt_scale import config as config_mod
from deitlt_scale.cli import main
from deitlt_scale.data import meta as meta_mod
from deitlt_scale.data.meta import DatasetMeta
from deitlt_scale.data.order import COLUMNS, EpochOrders, flatten, position_correlation
from deitlt_scale.data.shards import Sample

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_digits.yaml"
CIFAR10_LT_RHO100 = 12_406


@pytest.fixture(scope="module")
def cifar_sized(tmp_path_factory: pytest.TempPathFactory) -> DatasetMeta:
    """12,406 tiny JPEGs in one train shard, as CIFAR-10-LT (rho 100) is at the default size."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    train = [Sample(f"c{i:05d}", data, i % 10) for i in range(CIFAR10_LT_RHO100)]
    eval_ = [Sample(f"e{i:05d}", data, i) for i in range(10)]
    root = tmp_path_factory.mktemp("cifar-sized")
    return write_dataset(root, train, eval_, num_classes=10, train_shards=1, eval_shards=1)


# The reference sampler's setting (repeated augmentation x3, 256-sample epochs), which the paper
# recipes use; the embedded recipe reads every image once per epoch.
REFERENCE = ["data.repeated_aug=3", "data.epoch_multiple=256", "train.micro_batch=32"]


def _orders(meta: DatasetMeta, world: int, overrides: list[str]) -> EpochOrders:
    cfg = config_mod.load(
        RECIPE, [f"data.shards={meta.root}", "data.device=cpu", *REFERENCE, *overrides]
    )
    return EpochOrders(cfg, meta, world, decode=False)


def test_positions_are_uncorrelated_between_epochs_on_a_cifar10_lt_sized_set(
    cifar_sized: DatasetMeta,
) -> None:
    orders = _orders(cifar_sized, 2, ["train.micro_batch=128", "train.grad_accum=4"])
    epochs = [flatten(orders.per_rank(e)) for e in range(4)]
    assert all(len(order) == 12_288 for order in epochs)  # 12,406 // 256 * 256
    assert position_correlation(epochs[0], epochs[0]) == pytest.approx(1.0)
    for previous, current in itertools.pairwise(epochs):
        assert abs(position_correlation(previous, current)) < 0.1


def test_positions_are_uncorrelated_between_epochs_on_digits_lt(digits_lt: Path) -> None:
    """digits-lt trains on 256 of its 405 images per epoch, about 86 distinct ones: two epochs
    share about 18, so one pair's correlation is noisy; its mean over 30 pairs is not."""
    orders = _orders(meta_mod.load(digits_lt), 1, [])
    epochs = [flatten(orders.per_rank(e)) for e in range(31)]
    rhos = [position_correlation(a, b) for a, b in itertools.pairwise(epochs)]
    assert abs(float(np.mean(rhos))) < 0.1


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_data_order_writes_what_the_loader_yields_per_rank_and_prints_each_epoch(
    digits_lt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["data", "order", str(RECIPE), f"data.shards={digits_lt}", "data.device=cpu", *REFERENCE]
    decoded, planned = tmp_path / "decoded.csv", tmp_path / "planned.csv"
    assert main([*args, "--world-size", "2", "--epochs", "2", "--out", str(decoded)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert (
        main([*args, "--world-size", "2", "--epochs", "2", "--no-decode", "--out", str(planned)])
        == 0
    )
    rows = _read_csv(decoded)
    assert tuple(rows[0]) == COLUMNS
    assert rows == _read_csv(planned)  # the plan is what the loader decodes
    assert len(rows) == 2 * 256  # 405 // 256 * 256 images per epoch
    # micro-batch 32, no accumulation, 2 ranks -> 4 micro-batches = 4 steps / epoch
    assert {(r["epoch"], r["step"]) for r in rows} == {
        ("0", "0"), ("0", "1"), ("0", "2"), ("0", "3"),
        ("1", "4"), ("1", "5"), ("1", "6"), ("1", "7"),
    }  # fmt: skip
    per_rank = {(r["epoch"], r["micro_batch"], r["rank"]) for r in rows}
    assert len(per_rank) == 2 * 4 * 2
    epoch_lines = [line for line in printed if line.startswith("epoch ")]
    assert len(epoch_lines) == 2
    assert "4 optimizer steps" in epoch_lines[0] and "vs previous epoch n/a" in epoch_lines[0]
    distinct = len({r["key"] for r in rows if r["epoch"] == "0"})
    assert f"{distinct} distinct images" in epoch_lines[0]
    assert 85 <= distinct <= 87
