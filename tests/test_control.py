"""`deitlt bench control`: the plain PyTorch loop that trains a recipe beside the project's
trainer, with nothing of the engine; its budget, its sampler, its loss, and the comparison."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deitlt_scale import config as config_mod
from deitlt_scale.benchmarks import control
from deitlt_scale.steps import resolve_steps

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tiny_digits.yaml"


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["data.repeated_aug=3", "data.epoch_multiple=256", "train.micro_batch=32"],
        ["train.epochs=7", "schedule.warmup_epochs=2", "distill.drw_epoch=5"],
        ["train.max_steps=10"],
    ],
)
def test_the_plain_loops_budget_is_the_trainers(overrides):
    cfg = config_mod.load(RECIPE, overrides)
    mine = control.budget(cfg, 405)
    theirs = resolve_steps(cfg, 405, 1)
    assert (mine.steps_per_epoch, mine.total, mine.warmup, mine.drw_start) == (
        theirs.steps_per_epoch, theirs.total, theirs.warmup, theirs.drw_start
    )  # fmt: skip


def test_the_sampler_repeats_each_drawn_image_and_cuts_the_epoch_as_the_reference():
    sampler = control.RepeatedAugSampler(405, repeats=3, multiple=256, seed=0)
    first = list(sampler)
    assert len(first) == len(sampler) == 256
    counts = Counter(first)
    assert set(counts.values()) <= {1, 2, 3} and sum(c == 3 for c in counts.values()) >= 84
    sampler.set_epoch(1)
    assert list(sampler) != first
    plain = control.RepeatedAugSampler(405, repeats=1, multiple=64, seed=0)
    assert len(list(plain)) == 384 and len(set(plain)) == 384


def test_the_loss_is_the_deitlt_objective_written_out():
    torch.manual_seed(0)
    cls, dist, teacher = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    targets = torch.softmax(torch.randn(4, 3), dim=1)
    loss, labels = control.deitlt_loss((cls, dist), targets, None, teacher, 0.5, None)
    expected = 0.5 * torch.sum(-targets * F.log_softmax(cls, -1), -1).mean()
    expected += 0.5 * F.cross_entropy(dist, teacher.argmax(-1))
    torch.testing.assert_close(loss, expected)
    assert labels.tolist() == teacher.argmax(-1).tolist()
    weights = control.class_weights([120, 10, 2], 0.9999)
    assert float(weights.sum()) == pytest.approx(3.0) and weights[2] > weights[0]


def test_a_recipe_the_plain_loop_does_not_train_is_refused_naming_the_key(tmp_path):
    from deitlt_scale.errors import UserError

    cfg = config_mod.load(RECIPE, ["distill.cls_loss=balanced_softmax"])
    with pytest.raises(UserError, match="distill.cls_loss"):
        control.train_plain(cfg)


@pytest.mark.slow
def test_both_sides_train_and_the_comparison_prints_accuracy_and_the_speed_ratio(
    digits_lt, random_teacher, tmp_path
):
    out = tmp_path / "control"
    cmd = [sys.executable, "-m", "deitlt_scale.cli", "bench", "control", str(RECIPE),
           f"data.shards={digits_lt}", f"teacher.path={random_teacher}", "train.epochs=2",
           "schedule.warmup_epochs=1", "distill.drw_epoch=1", "train.max_steps=8",
           "model.embed_dim=48", "model.depth=2", "tracking.enabled=false",
           "data.num_threads=1", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for side in ("project", "plain"):
        summary = json.loads((out / side / "train_summary.json").read_text())
        assert summary["steps"] == 8 and summary["images"] == 8 * 64
        assert 0 <= summary["teacher_agreement"] <= summary["teacher_in_mix"] <= 1
    plain = json.loads((out / "plain" / "eval" / "latest.json").read_text())
    assert plain["step"] == 8 and set(plain["metrics"]) >= {"mean/overall", "dist/paper/tail"}
    ratio = re.search(r"ratio project/plain images/s: ([0-9.]+)x", done.stdout)
    assert ratio and float(ratio.group(1)) > 0
    assert re.search(r"mean/overall\s+[0-9.]+\s+[0-9.]+\s+[-+][0-9.]+", done.stdout)
    # The plain side again, alone, with the same seed: the same training, to the last bit.
    again = subprocess.run([*cmd[:cmd.index("--out")], f"runtime.run_dir={tmp_path / 'again'}",
                            "--side", "plain"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=900)  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    first, second = (json.loads((d / "train_summary.json").read_text())
                     for d in (out / "plain", tmp_path / "again"))  # fmt: skip
    assert first["loss"] == second["loss"]
    assert json.loads((tmp_path / "again" / "eval" / "latest.json").read_text()) == plain
