"""engine/evaluate.py directly: exact per-class counts, padding, groups, and the all-reduce that
makes Head/Mid/Tail the same on any number of ranks (two real gloo processes)."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deitlt_scale.data.loader import Batch
from deitlt_scale.engine.evaluate import ClassCounts, evaluate

K = 3
GROUPS = {"paper": [0, 1, 2], "count": [0, 0, 2]}


def one_hot_logits(predicted: list[int]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predicted), K).float()


def batches(labels: list[int], predicted: list[int], size: int = 2) -> list[Batch]:
    out = []
    for i in range(0, len(labels), size):
        y = torch.tensor(labels[i : i + size])
        out.append(Batch(one_hot_logits(predicted[i : i + size])[:, :, None, None], y))
    return out


def predict_from_images(images: torch.Tensor) -> dict[str, torch.Tensor]:
    # The "images" carry the logits themselves; the second head is always class 0.
    logits = images[:, :, 0, 0]
    return {"a": logits, "b": one_hot_logits([0] * len(logits))}


def test_per_class_accuracy_is_hits_over_samples_of_each_class():
    labels = [0, 0, 1, 1, 1, 2]
    predicted = [0, 1, 1, 1, 0, 2]
    result = evaluate(predict_from_images, batches(labels, predicted), K, GROUPS, "cpu")
    assert result.per_class["a"] == pytest.approx([0.5, 2 / 3, 1.0])
    assert result.per_class["b"] == pytest.approx([1.0, 0.0, 0.0])
    assert result.totals == [2, 3, 1]
    assert result.metrics["a/overall"] == pytest.approx(4 / 6)  # sample-weighted
    assert result.metrics["a/mean_class"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert result.metrics["a/top5"] == 1.0  # K < 5: every class is in the top K


def test_groups_are_unweighted_means_of_their_classes():
    labels, predicted = [0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 0, 2]
    m = evaluate(predict_from_images, batches(labels, predicted), K, GROUPS, "cpu").metrics
    assert m["a/paper/head"] == pytest.approx(0.5)
    assert m["a/paper/mid"] == pytest.approx(2 / 3)
    assert m["a/count/head"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert math.isnan(m["a/count/mid"])  # no class in the count convention's mid group


def test_padding_labels_are_not_counted():
    labels, predicted = [0, 1, -1, -1], [0, 0, 2, 2]
    result = evaluate(predict_from_images, batches(labels, predicted), K, GROUPS, "cpu")
    assert result.totals == [1, 1, 0]
    assert result.metrics["a/overall"] == pytest.approx(0.5)
    assert math.isnan(result.per_class["a"][2])  # a class with no eval image has no accuracy


def test_class_counts_accumulate_over_batches():
    counts = ClassCounts(K)
    counts.add({"a": one_hot_logits([0, 1])}, torch.tensor([0, 0]))
    counts.add({"a": one_hot_logits([2])}, torch.tensor([2]))
    assert counts.totals.tolist() == [2, 0, 1]
    assert counts.correct["a"].tolist() == [1, 0, 1]


def _rank_main(rank: int, port: int, labels: list[list[int]], predicted: list[list[int]], out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = evaluate(
            predict_from_images, batches(labels[rank], predicted[rank]), K, GROUPS, "cpu"
        )
        out.put((rank, result.metrics, result.totals))
    finally:
        dist.destroy_process_group()


def test_two_ranks_report_exactly_what_one_process_reports_on_all_samples():
    # Rank 1 has no sample of class 2 and one padding entry: per-rank averages would differ.
    labels = [[0, 1, 2, 2], [0, 0, 1, -1]]
    predicted = [[0, 1, 2, 0], [1, 0, 1, 2]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(r, port, labels, predicted, queue)) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    got = dict((rank, (m, t)) for rank, m, t in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    alone = evaluate(
        predict_from_images,
        batches(labels[0] + labels[1], predicted[0] + predicted[1]),
        K,
        GROUPS,
        "cpu",
    )
    for rank in (0, 1):
        metrics, totals = got[rank]
        assert totals == alone.totals == [3, 2, 2]
        for key, value in alone.metrics.items():
            assert metrics[key] == pytest.approx(value, nan_ok=True), key
