"""``train.init_from``: a trained run's student weights at a new image size (position embeddings
resampled, the CLS and DIST token rows kept)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deitlt_scale.config import ModelConfig
from deitlt_scale.engine.warm_start import parse_source, resample_state, warm_start
from deitlt_scale.errors import UserError
from deitlt_scale.models.student import create_student
from tests.test_trainer import launch, tiny_overrides

TINY = ModelConfig(
    arch="deit_tiny_distilled_patch16_224", patch_size=8, embed_dim=48, depth=2, num_heads=2
)


def test_source_is_a_run_dir_with_an_optional_tag():
    assert parse_source("runs/a") == (Path("runs/a"), "best")
    assert parse_source("runs/a:latest") == (Path("runs/a"), "latest")
    assert parse_source("runs/a:step_00000010") == (Path("runs/a"), "step_00000010")


def test_position_embeddings_are_resampled_to_the_new_grid_and_tokens_kept():
    torch.manual_seed(0)
    small, large = create_student(TINY, 10, 32), create_student(TINY, 10, 48)
    state = small.state_dict()
    grid = torch.full((1, 16, 48), 0.25)  # a constant grid stays constant under bicubic resampling
    state["pos_embed"] = torch.cat([state["pos_embed"][:, :2], grid], dim=1)
    moved = resample_state(state, large)
    assert moved["pos_embed"].shape == large.pos_embed.shape == (1, 2 + 36, 48)
    assert torch.equal(moved["pos_embed"][:, :2], state["pos_embed"][:, :2])  # CLS, DIST rows
    assert torch.allclose(moved["pos_embed"][:, 2:], torch.tensor(0.25), atol=1e-6)
    large.load_state_dict(moved, strict=True)
    assert torch.equal(large.cls_token, small.cls_token)
    assert torch.equal(large.dist_token, small.dist_token)


def test_a_state_that_already_fits_is_unchanged():
    model = create_student(TINY, 10, 32)
    state = model.state_dict()
    assert resample_state(state, model) is state


def test_empty_init_from_loads_nothing():
    assert warm_start(create_student(TINY, 10, 32), "") is None


def test_a_missing_source_run_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        warm_start(create_student(TINY, 10, 32), str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_a_trained_32px_student_starts_a_48px_stage(digits_lt, random_teacher, tmp_path):
    from deitlt_scale.engine.checkpoint import consolidate, find_checkpoint

    run_dir = tmp_path / "stage1"
    out = launch(
        tiny_overrides(
            digits_lt,
            random_teacher,
            run_dir,
            **{"train.epochs": 1, "distill.drw_epoch": "null", "model.patch_size": 8},
        )
    )
    assert out.returncode == 0, out.stderr[-2000:]
    large = create_student(TINY, 10, 48)
    note = warm_start(large, f"{run_dir}:latest")
    assert note is not None and "(1, 18, 48) -> (1, 38, 48)" in note
    trained, _ = consolidate(find_checkpoint(run_dir, "latest").path)
    for key, value in large.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(value, trained[key].to(value.dtype)), key
    with torch.no_grad():
        logits = large.eval()(torch.randn(2, 3, 48, 48), heads=True)
    assert logits.cls_logits.shape == (2, 10) and logits.dist_logits.shape == (2, 10)
    wrong = create_student(TINY, 7, 48)
    with pytest.raises(UserError, match="does not fit"):
        warm_start(wrong, f"{run_dir}:latest")
