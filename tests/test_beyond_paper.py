"""The eval history that scripts/beyond_paper.py reads back: the per-class CSVs the evaluator
writes at every eval reproduce its metrics, and the reference's test-split choice is the eval
with the best mean-head Overall."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from deitlt_scale.data.loader import Batch
from deitlt_scale.engine.evaluate import evaluate, write_eval_outputs

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("beyond_paper", REPO / "scripts" / "beyond_paper.py")
beyond = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(beyond)

K = 6
GROUPS = {"paper": [0, 0, 1, 1, 2, 2], "count": [0, 1, 1, 1, 2, 2]}
META = SimpleNamespace(
    num_classes=K, groups=GROUPS, train_counts=[40, 20, 10, 6, 3, 2], class_names=list("abcdef")
)
LABELS = [c for c in range(K) for _ in range(4)]  # 4 eval images per class


def _eval(eval_dir: Path, step: int, wrong: dict[str, int]) -> dict[str, float]:
    """Evaluate three heads that each miss the first ``wrong[head]`` images; write step ``step``."""

    def predict(images: torch.Tensor) -> dict[str, torch.Tensor]:
        index = images[:, 0, 0, 0].long()
        out = {}
        for head in beyond.HEADS:
            predicted = torch.tensor(LABELS)[index]
            predicted = torch.where(index < wrong[head], (predicted + 1) % K, predicted)
            out[head] = torch.nn.functional.one_hot(predicted, K).float()
        return out

    batches = [
        Batch(torch.arange(i, min(i + 5, len(LABELS))).float()[:, None, None, None],
              torch.tensor(LABELS[i : i + 5]))
        for i in range(0, len(LABELS), 5)
    ]  # fmt: skip
    result = evaluate(predict, batches, K, GROUPS, torch.device("cpu"))
    write_eval_outputs(result, eval_dir, META, step)
    return result.metrics


def test_the_per_class_history_reproduces_every_evals_metrics(tmp_path: Path) -> None:
    expected = {
        10: _eval(tmp_path, 10, {"cls": 3, "dist": 9, "mean": 14}),
        20: _eval(tmp_path, 20, {"cls": 0, "dist": 5, "mean": 7}),
    }
    history = beyond.per_eval(tmp_path)
    assert sorted(history) == [10, 20]
    for step, metrics in history.items():
        for key, value in metrics.items():
            assert value == pytest.approx(expected[step][key], abs=1e-6), (step, key)


def test_the_test_split_choice_is_the_eval_with_the_best_mean_head(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _eval(run / "eval", 10, {"cls": 0, "dist": 0, "mean": 12})
    best = _eval(run / "eval", 20, {"cls": 9, "dist": 9, "mean": 2})
    _eval(run / "eval", 30, {"cls": 0, "dist": 0, "mean": 6})  # the final eval: better CLS only
    step, metrics = beyond.test_selected(run)
    assert step == 20
    assert metrics["mean/overall"] == pytest.approx(best["mean/overall"])
    beyond.check_history(run)  # latest.json is the last eval's


def test_a_history_that_disagrees_with_latest_json_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _eval(run / "eval", 10, {"cls": 0, "dist": 0, "mean": 3})
    latest = run / "eval" / "latest.json"
    record = json.loads(latest.read_text())
    record["metrics"]["mean/overall"] = 0.5
    latest.write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="mean/overall"):
        beyond.check_history(run)
