"""Model selection on the held-out val split: which split chooses, its figures, and the record
that `deitlt eval` reads back."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from deitlt_scale.config import Config
from deitlt_scale.data.prepare import prepare_dataset
from deitlt_scale.engine import selection
from deitlt_scale.engine.evaluate import EvalResult


@pytest.fixture(scope="module")
def digits_val(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-val") / "d"
    return prepare_dataset("digits-lt", out, val_per_class=3, progress=False)


def world() -> SimpleNamespace:
    return SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), is_main=True)


def cfg_for(meta) -> Config:
    cfg = Config()
    cfg.data.shards, cfg.data.image_size, cfg.data.device = str(meta.root), 32, "cpu"
    cfg.data.num_threads, cfg.eval.micro_batch = 1, 16
    return cfg


def test_the_val_split_chooses_where_the_dataset_has_one(digits_val, digits_lt):
    from deitlt_scale.data import meta as meta_mod

    assert selection.selection_split(digits_val) == "val"
    assert selection.selection_split(meta_mod.load(digits_lt)) == "eval"


def test_without_a_val_split_the_test_result_chooses(digits_lt):
    from deitlt_scale.data import meta as meta_mod

    meta = meta_mod.load(digits_lt)
    assert selection.build_val_loader(cfg_for(meta), meta, world()) is None
    test = EvalResult({"mean/overall": 0.5}, {}, [])
    assert selection.evaluate_selection(None, None, test, meta, world(), None, 1) is test


def test_val_figures_are_those_of_the_val_split(digits_val, tmp_path):
    loader = selection.build_val_loader(cfg_for(digits_val), digits_val, world())

    def always_class_zero(images):
        logits = torch.zeros(len(images), 10)
        logits[:, 0] = 1.0
        return {"cls": logits}

    test = EvalResult({"cls/overall": 0.9}, {}, [])
    result = selection.evaluate_selection(
        always_class_zero, loader, test, digits_val, world(), tmp_path, 7
    )
    assert result.totals == [3] * 10
    assert result.metrics["cls/overall"] == pytest.approx(0.1)  # one class of ten, balanced
    assert (tmp_path / selection.VAL_DIR / "latest.json").is_file()


def test_the_recorded_split_is_read_back_for_the_eval_note(tmp_path):
    assert selection.selected_on(tmp_path) == "eval"
    assert "chosen on the test split, as the reference does" in selection.selection_note(
        tmp_path, "best"
    )
    selection.record_selection(tmp_path / "eval", "val", "mean/overall", 40, 0.61)
    assert selection.selected_on(tmp_path) == "val"
    assert selection.selection_note(tmp_path, "best") == "best checkpoint chosen on the val split"
    assert selection.selection_note(tmp_path, "latest") == "checkpoint latest"
