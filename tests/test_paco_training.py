"""PaCo teacher training end to end: `deitlt teacher train recipes/teacher_paco_digits.yaml` on
the embedded digits (real DALI two-view loader, real DeepSpeed engine with SAM), its teacher file
against `deitlt teacher import --format paco` of the same run's MoCo weights, and the config
rules of two-view training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deitlt_scale import config as config_mod
from deitlt_scale import tasks
from deitlt_scale.data import meta as meta_io
from deitlt_scale.engine import checkpoint
from deitlt_scale.models.importers import import_checkpoint
from deitlt_scale.models.moco import MoCo
from deitlt_scale.steps import resolve_steps
from deitlt_scale.strict import ConfigError

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "teacher_paco_digits.yaml"
MICRO, QUEUE, STEPS = 32, 64, 3


def overrides(data: Path, run_dir: Path) -> list[str]:
    return [
        f"data.shards={data}",
        f"runtime.run_dir={run_dir}",
        f"train.micro_batch={MICRO}",
        f"data.epoch_multiple={MICRO}",
        f"paco.moco_k={QUEUE}",
        "train.epochs=1",
        "schedule.warmup_epochs=0",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        "tracking.enabled=false",
    ]


@pytest.fixture(scope="module")
def paco_run(digits_lt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("paco") / "run"
    cmd = [sys.executable, "-m", "deitlt_scale.cli", "teacher", "train", str(RECIPE)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [*cmd, *overrides(digits_lt, run_dir)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"[step {STEPS}] eval" in proc.stdout
    return run_dir


def moco_state(run_dir: Path) -> dict[str, torch.Tensor]:
    state, _ = checkpoint.consolidate(checkpoint.latest_checkpoint(run_dir).path)
    return state


def test_training_moves_the_queries_keys_follow_by_momentum_and_the_queue_fills(
    paco_run: Path,
) -> None:
    state = moco_state(paco_run)
    torch.manual_seed(0)  # the trainer's initial weights for seed 0
    arch = config_mod.load(RECIPE).model.arch  # the digits PaCo recipe's ResNet
    initial = MoCo(arch, 10, moco_dim=32, moco_k=QUEUE).state_dict()
    name = "encoder_q.conv1.weight"
    moved_q = (state[name] - initial[name]).abs().max()
    moved_k = (state[name.replace("_q", "_k")] - initial[name]).abs().max()
    assert moved_q > 0 and 0 < moved_k < moved_q  # m = 0.999: the keys lag far behind
    assert int(state["queue_ptr"]) == STEPS * MICRO % QUEUE
    assert torch.allclose(state["queue"].norm(dim=1), torch.ones(QUEUE), atol=1e-5)


def test_the_teacher_file_is_the_import_of_the_runs_paco_checkpoint(
    paco_run: Path, digits_lt: Path, tmp_path: Path
) -> None:
    # The run's weights saved as PaCo/LT saves them (a DataParallel-wrapped MoCo).
    source = tmp_path / "paco_checkpoint.pth.tar"
    wrapped = {f"module.{k}": v for k, v in moco_state(paco_run).items()}
    torch.save({"epoch": 1, "state_dict": wrapped}, source)
    imported = tmp_path / "imported"
    import_checkpoint(
        "paco", source, config_mod.load(RECIPE).model.arch, 10, 32, imported, label_space="model",
        mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010),
    )  # fmt: skip

    cfg = config_mod.load(RECIPE.parent / "tiny_digits.yaml", [f"data.shards={digits_lt}"])
    meta = meta_io.load(digits_lt)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    logits = []
    for teacher in (paco_run / "teacher", imported):
        cfg.teacher.path = str(teacher)
        runner, info = tasks.load_frozen_teacher(cfg, meta, torch.device("cpu"))
        assert not info.normed and info.num_classes == 10
        logits.append(runner.launch(images).wait())
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_deitlt_eval_scores_the_run_through_the_containers_inference(
    paco_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from deitlt_scale.cli import main

    trained = json.loads((paco_run / "eval" / "latest.json").read_text())["metrics"]
    assert main(["eval", str(paco_run)]) == 0
    assert "teacher" in capsys.readouterr().out
    scored = json.loads((paco_run / "eval" / "latest.json").read_text())["metrics"]
    assert scored["teacher/overall"] == trained["teacher/overall"]  # the same weights, scored again


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["data.epoch_multiple=1"], "PaCo's queue takes full batches; set data.epoch_multiple=32"),
        (["paco.moco_k=48"], "paco.moco_k=48 is not a multiple of the global micro-batch 32"),
        (["deepspeed.zero_stage=3", "optim.sam_rho=0"], "deepspeed.zero_stage=3 with paco"),
        (["model.arch=resnet50x"], "PaCo trains resnet8 or resnet14 or"),
        (["data.mixup.prob=1.0", "data.mixup.mixup_alpha=0.8"], "data.mixup.prob must be 0"),
        (["distill.drw_epoch=0"], "PaCo re-balances through its log-prior term"),
    ],
)
def test_two_view_recipes_that_cannot_train_are_refused_in_one_line(
    digits_lt: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    cfg = config_mod.load(RECIPE, [*overrides(digits_lt, tmp_path / "run"), *extra])
    with pytest.raises(ConfigError) as err:
        tasks.check(cfg)
        resolve_steps(cfg, meta_io.load(digits_lt).num_samples("train"), 1)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_every_paco_recipe_trains_a_paco_task_in_whole_batches_at_its_world_size() -> None:
    for recipe in sorted((REPO / "recipes").glob("teacher_paco_*.yaml")):
        cfg = config_mod.load(recipe, [])
        assert tasks.check(cfg) is tasks.PaCoTask, recipe.name
        world = (cfg.train.global_batch or cfg.train.micro_batch) // cfg.train.micro_batch
        for train_images in (405, 10_847, 115_846, 437_513):  # digits, CIFAR-10-LT, IN-LT, iNat
            if train_images >= cfg.data.epoch_multiple:
                resolve_steps(cfg, train_images, world)


def test_teacher_train_plans_a_paco_job_of_w_processes_without_building_it(
    digits_lt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deitlt_scale.cli import main

    argv = ["teacher", "train", str(RECIPE), f"data.shards={digits_lt}", "--dry-run"]
    assert main([*argv, "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 process(es), paco run" in out
    # floor(405 / 64) * 64 = 384 images per epoch: 192 per rank, three full micro-batches.
    assert "3 micro-batches per rank (last of 64 images)" in out
    assert main([*argv, "--world-size", "3"]) == 2
    assert "paco.moco_k=256 is not a multiple of the global micro-batch 192" in (
        capsys.readouterr().err
    )
