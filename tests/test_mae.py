"""MAE pre-training (`deitlt pretrain`), a student started from it, layer-wise lr decay and
LiVT's balanced BCE.

The end-to-end test pre-trains the embedded student's encoder for a few steps on digits-lt, is
killed after a checkpoint and resumes, then initialises a DeiT-LT student and a plain ViT from it:
every encoder weight the students take equals the pre-trained one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deitlt_scale import config as config_mod
from deitlt_scale.models.mae import MaskedAutoencoder
from deitlt_scale.models.student import create_student
from deitlt_scale.strict import ConfigError

REPO = Path(__file__).resolve().parent.parent
MAE_RECIPE = REPO / "recipes" / "mae_digits.yaml"
RECIPE = REPO / "recipes" / "tiny_digits.yaml"


def _mae(mask_ratio: float = 0.75, norm_pix: bool = True) -> MaskedAutoencoder:
    torch.manual_seed(0)
    cfg = config_mod.load(RECIPE)
    encoder = create_student(cfg.model, 10, 32)
    encoder.reset_classifier(0)
    return MaskedAutoencoder(encoder, mask_ratio, 32, 1, 4, norm_pix)


# --------------------------------------------------------------------------------------------
# The model


def test_patches_are_the_images_tiles_in_row_major_order():
    model = _mae()
    images = torch.randn(2, 3, 32, 32)
    tiles = images.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, C, 8, 8, 4, 4)
    expected = tiles.permute(0, 2, 3, 4, 5, 1).reshape(2, 64, 48)  # pixels (p, q, c)
    torch.testing.assert_close(model.patchify(images), expected)


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_the_encoder_sees_only_the_kept_patches_and_the_mask_marks_the_rest(ratio):
    model = _mae(ratio)
    torch.manual_seed(1)
    encoded, mask, restore = model.encode(torch.randn(3, 3, 32, 32))
    keep = int(64 * (1 - ratio))
    assert encoded.shape == (3, 2 + keep, 96)  # CLS, DIST and the kept patches
    assert mask.sum(dim=1).tolist() == [64 - keep] * 3
    assert sorted(restore[0].tolist()) == list(range(64))


def test_the_loss_is_the_masked_patches_mean_squared_error_to_normalised_pixels():
    model = _mae()
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    out = model(images)
    target = model.patchify(images)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((out.pred - target) ** 2).mean(-1)
    expected = (per_patch * out.mask).sum() / out.mask.sum()
    torch.testing.assert_close(out.loss, expected)
    # what the decoder predicts for a visible patch does not count
    visible = per_patch * (1 - out.mask)
    assert visible.sum() > 0 and not torch.isclose(out.loss, per_patch.mean())


def test_the_same_seed_masks_the_same_patches():
    model = _mae()
    images = torch.randn(2, 3, 32, 32)
    masks = []
    for _ in range(2):
        torch.manual_seed(3)
        masks.append(model(images).mask)
    torch.testing.assert_close(masks[0], masks[1])


# --------------------------------------------------------------------------------------------
# Layer-wise lr decay and balanced BCE


def test_layer_decay_scales_each_blocks_lr_and_leaves_the_heads_at_the_peak():
    from deitlt_scale.optim import param_groups

    cfg = config_mod.load(RECIPE)
    student = create_student(cfg.model, 10, 32)  # depth 4
    groups = param_groups(student, 0.05, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    params = dict(student.named_parameters())
    assert scale_of[id(params["pos_embed"])] == 0.5**5
    assert scale_of[id(params["patch_embed.proj.weight"])] == 0.5**5
    assert scale_of[id(params["blocks.0.attn.qkv.weight"])] == 0.5**4
    assert scale_of[id(params["blocks.3.mlp.fc2.weight"])] == 0.5**1
    assert scale_of[id(params["head.weight"])] == scale_of[id(params["norm.weight"])] == 1.0
    decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(params["blocks.0.attn.qkv.weight"]) in decay
    assert (
        id(params["blocks.0.attn.qkv.bias"]) not in decay and id(params["cls_token"]) not in decay
    )
    plain = param_groups(student, 0.05)
    assert len(plain) == 2 and all("lr_scale" not in g for g in plain)


def test_the_trainer_applies_each_groups_lr_scale_to_the_scheduled_lr(
    world, random_teacher, tmp_path
):
    from test_no_sync import tiny_trainer

    trainer = tiny_trainer(
        world, random_teacher, tmp_path / "run", "cpu", **{"optim.layer_decay": 0.5}
    )
    trainer._set_lr(3)
    groups = trainer.engine.optimizer.param_groups
    assert {round(g["lr"] / trainer._lr, 6) for g in groups} == {0.5**k for k in range(4)}


def test_balanced_bce_is_livts_formula():
    from deitlt_scale.losses import DeiTLTObjective
    from deitlt_scale.models.student import StudentOutput

    counts = [50, 20, 5]
    cfg = config_mod.load(
        None, ["distill.type=none", "distill.cls_loss=bal_bce", "distill.cls_tau=1"]
    )
    objective = DeiTLTObjective(cfg.distill, counts)
    logits = torch.randn(4, 3)
    targets = torch.softmax(torch.randn(4, 3), dim=1)
    out = StudentOutput(cls_logits=logits, dist_logits=None, cls_feat=None, dist_feat=None)
    got = objective(out, targets, torch.zeros(4, dtype=torch.long), None, drw=False)["loss"]
    pi = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    shifted = logits.double() + torch.log(pi) - torch.log(1 - pi)
    expected = 3 * F.binary_cross_entropy_with_logits(shifted, targets.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    hard = objective(out, None, torch.tensor([0, 1, 2, 1]), None, drw=False)["loss"]
    one_hot = F.one_hot(torch.tensor([0, 1, 2, 1]), 3).double()
    torch.testing.assert_close(
        hard.double(),
        3 * F.binary_cross_entropy_with_logits(shifted, one_hot),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.task=pretrain", "teacher.path=x", "distill.type=none"], "teacher.path"),
        (["train.task=pretrain", "distill.type=hard"], "distill.type"),
        (["train.task=pretrain", "mae.mask_ratio=1.0"], "mae.mask_ratio"),
        (["model.distilled=false", "distill.type=none", "distill.cls_loss=bal_bce",
          "distill.drw_epoch=10"], "distill.cls_loss=bal_bce"),
        (["optim.layer_decay=0"], "optim.layer_decay"),
    ],
)  # fmt: skip
def test_settings_that_do_not_go_together_are_refused_naming_the_key(overrides, key):
    from deitlt_scale import tasks

    with pytest.raises(ConfigError) as err:
        tasks.check(config_mod.load(None, ["train.epochs=20", "teacher.path=", *overrides]))
    assert key in str(err.value)


# --------------------------------------------------------------------------------------------
# deitlt pretrain, killed and resumed, and the students it starts


@pytest.fixture(scope="module")
def pretrained(digits_lt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    run_dir = tmp_path_factory.mktemp("mae") / "run"
    args = [sys.executable, "-m", "deitlt_scale.cli", "pretrain", str(MAE_RECIPE),
            f"data.shards={digits_lt}", f"runtime.run_dir={run_dir}", "train.epochs=4",
            "schedule.warmup_epochs=1", "train.micro_batch=32", "data.epoch_multiple=32",
            "checkpoint.every_steps=3", "checkpoint.keep_last=10", "eval.every_epochs=2",
            "tracking.enabled=false", "data.num_threads=1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((run_dir / "checkpoints").glob("step_*/COMPLETE")):
        assert first.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # a kill, not a polite stop
    first.communicate(timeout=60)
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return {"run_dir": run_dir, "first": first.returncode, "again": again}


@pytest.mark.slow
def test_a_killed_pretraining_resumes_and_finishes_with_its_evaluations(pretrained):
    import json

    assert pretrained["first"] == -signal.SIGKILL
    again = pretrained["again"]
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from" in again.stdout and "done: 48 steps" in again.stdout
    latest = json.loads((pretrained["run_dir"] / "eval" / "latest.json").read_text())
    assert latest["step"] == 48 and latest["metrics"]["mae/loss"] > 0
    spec = json.loads((pretrained["run_dir"] / "mae.json").read_text())
    recipe = config_mod.load(MAE_RECIPE, [])
    assert spec["architecture"] == "mae" and spec["mae"]["mask_ratio"] == recipe.mae.mask_ratio


@pytest.mark.slow
@pytest.mark.parametrize("distilled", [True, False])
def test_a_student_started_from_it_holds_the_pretrained_encoder(pretrained, distilled):
    from deitlt_scale.engine.checkpoint import consolidate, find_checkpoint
    from deitlt_scale.engine.warm_start import warm_start

    run_dir = pretrained["run_dir"]
    overrides = [] if distilled else ["model.distilled=false"]
    cfg = config_mod.load(RECIPE, overrides)
    torch.manual_seed(1)
    student = create_student(cfg.model, 10, 32)
    heads = {k: v.clone() for k, v in student.state_dict().items() if k.startswith("head")}
    note = warm_start(student, f"{run_dir}:latest")
    assert "MAE encoder, new heads" in note and "step 48" in note
    state, _ = consolidate(find_checkpoint(run_dir, "latest").path)
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    mine = student.state_dict()
    for key, value in encoder.items():
        if key == "dist_token" and not distilled:
            assert key not in mine
        elif key == "pos_embed" and not distilled:  # CLS row, then the patches: DIST's row gone
            torch.testing.assert_close(mine[key], torch.cat([value[:, :1], value[:, 2:]], 1))
        else:
            torch.testing.assert_close(mine[key], value, rtol=0, atol=0, msg=key)
    for key, value in heads.items():  # the heads are the student's own, not pre-trained
        torch.testing.assert_close(mine[key], value, rtol=0, atol=0)


@pytest.mark.slow
def test_eval_of_a_pretraining_run_says_what_to_do_instead(pretrained):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deitlt_scale.cli", "eval", str(pretrained["run_dir"]), "--tag",
           "latest"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()[-1]
    assert "pre-training run" in err and "train.init_from" in err
