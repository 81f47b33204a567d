"""An epoch's last optimizer step may hold fewer micro-batches than ``train.grad_accum`` (the
reference's epoch arithmetic, METHOD.md 1.6). Its gradient must be the mean over the micro-batches
it really has, and DeepSpeed must step exactly once per optimizer step whatever the group size.

A real Trainer (DeepSpeed ZeRO 1, fp32) with plain SGD at a constant lr: the update of each step
is compared with ``-lr * mean_j grad_j`` computed by autograd on a copy of the model."""

from __future__ import annotations

import copy

import pytest
import torch

from deitlt_scale.benchmarks.synthetic import DeviceBatch

LR = 0.05


def micro_batches(count: int, seed: int) -> list[DeviceBatch]:
    gen = torch.Generator().manual_seed(seed)
    return [
        DeviceBatch(
            torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        )
        for _ in range(count)
    ]


def expected_update(trainer, batches) -> dict[str, torch.Tensor]:
    """Parameters after one SGD step on the mean of the micro-batches' gradients."""
    model = copy.deepcopy(trainer.engine.module).train()
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for batch in batches:
        model.zero_grad()
        mb = trainer.task.inputs(batch, seed=0, drw=False)
        trainer.task.loss(model(mb.images), mb, None, drw=False)["loss"].backward()
        for n, p in model.named_parameters():
            grads[n] += p.grad / len(batches)
    return {n: p.detach() - LR * grads[n] for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def trainer(world, tmp_path_factory):
    from deitlt_scale import config as config_mod
    from deitlt_scale.benchmarks.synthetic import synthetic_meta
    from deitlt_scale.engine.trainer import Trainer

    settings = {
        "model.arch": "deit_tiny_distilled_patch16_224",
        "model.patch_size": 8,
        "model.embed_dim": 48,
        "model.depth": 2,
        "model.num_heads": 2,
        "model.drop_path": 0.0,
        "data.image_size": 32,
        "data.mixup.prob": 0.0,
        "data.mixup.label_smoothing": 0.0,
        "distill.type": "none",
        "train.micro_batch": 8,
        "train.grad_accum": 4,
        "train.epochs": 1,
        "train.log_every": 1 << 30,
        "optim.name": "sgd",
        "optim.momentum": 0.0,
        "optim.weight_decay": 0.0,
        "optim.lr": LR,
        "optim.lr_scale_batch": 0,
        "schedule.warmup_epochs": 0,
        "schedule.min_lr": LR,
        "deepspeed.bf16": "false",
        "checkpoint.resume": "false",
        "tracking.enabled": "false",
        "runtime.run_dir": tmp_path_factory.mktemp("short") / "run",
        "runtime.device": "cpu",
    }
    cfg = config_mod.load(None, [f"{k}={v}" for k, v in settings.items()])
    # 6 micro-batches of 8 per epoch in groups of 4: steps of 4 and 2 micro-batches.
    return Trainer(cfg, world, meta=synthetic_meta(10, 6 * 8)).build(with_data=False)


def test_the_epoch_has_a_full_and_a_short_step(trainer):
    s = trainer.steps
    assert s.steps_per_epoch == 2
    assert [s.micro_batches_in_step(i) for i in range(2)] == [4, 2]


@pytest.mark.parametrize("step", [0, 1], ids=["full step", "short step"])
def test_each_step_applies_the_mean_gradient_of_its_micro_batches(trainer, step):
    count = trainer.steps.micro_batches_in_step(step)
    batches = micro_batches(count, seed=step)
    want = expected_update(trainer, batches)
    trainer.state.step = step
    engine_steps = trainer.engine.global_steps
    trainer.train_step(iter(batches))
    trainer.finish_steps()
    assert trainer.engine.global_steps == engine_steps + 1
    got = dict(trainer.engine.module.named_parameters())
    for name, value in want.items():
        torch.testing.assert_close(got[name].detach(), value, rtol=1e-5, atol=1e-6, msg=name)
