"""``deepspeed.grad_accum_dtype``: the dtype bf16 gradients are accumulated and reduced in.

Real DeepSpeed engines of a tiny distilled DeiT on the CPU (gloo), trained for two accumulated
optimizer steps under each ZeRO stage the project supports.
"""

from __future__ import annotations

import pytest
import torch
from test_no_sync import run_steps, synthetic_batch, tiny_trainer

from deitlt_scale import config as config_mod
from deitlt_scale.engine.distributed import deepspeed_config
from deitlt_scale.strict import ConfigError

BF16 = {"deepspeed.bf16": "true", "teacher.dtype": "bf16", "train.grad_accum": 2}


def _accumulation_dtype(engine) -> torch.dtype:
    """Where the engine's optimizer wrapper accumulates micro-batch gradients."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    optimizer = engine.optimizer
    if isinstance(optimizer, BF16_Optimizer):
        return optimizer.fp32_groups_gradient_flat_partition[0].dtype
    return optimizer.gradient_accumulation_dtype


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bf16_gradients_accumulate_in_the_configured_dtype(
    world, random_teacher, tmp_path, stage, dtype
) -> None:
    trainer = tiny_trainer(
        world,
        random_teacher,
        tmp_path / "run",
        "cpu",
        **BF16,
        **{"deepspeed.zero_stage": stage, "deepspeed.grad_accum_dtype": dtype},
    )
    want = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    assert _accumulation_dtype(trainer.engine) == want
    before = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
    run_steps(trainer, synthetic_batch(world.device), 2)
    trainer.finish_steps()
    assert trainer.state.step == 2
    after = trainer.engine.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_bf16_zero0_trains_with_bf16_accumulation(world, random_teacher, tmp_path) -> None:
    """ZeRO 0 keeps bf16 parameters and sums each micro-batch's gradient into their bf16
    ``.grad`` (DeepSpeed's FP16_UnfusedOptimizer): bf16 accumulation, and the step still moves
    the weights."""
    trainer = tiny_trainer(
        world,
        random_teacher,
        tmp_path / "run",
        "cpu",
        **BF16,
        **{"deepspeed.zero_stage": 0, "deepspeed.grad_accum_dtype": "bf16"},
    )
    batch = synthetic_batch(world.device)
    params = [p for p in trainer.engine.module.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    trainer._set_lr(0)
    trainer.train_micro_step(batch, step=0, micro=0, count=2)  # the first of two: no step yet
    assert {p.grad.dtype for p in params} == {torch.bfloat16}
    first = [p.grad.detach().clone() for p in params]
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    trainer.train_micro_step(batch, step=0, micro=1, count=2)  # accumulates, then steps
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    assert any(f.abs().sum() > 0 for f in first)
    run_steps(trainer, batch, 1)
    trainer.finish_steps()
    assert trainer.state.step == 1


def test_fp32_accumulation_at_zero_stage_0_under_bf16_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"deepspeed\.grad_accum_dtype fp32 needs"):
        config_mod.load(
            None,
            ["deepspeed.bf16=true", "deepspeed.zero_stage=0", "deepspeed.grad_accum_dtype=fp32"],
        )


def test_the_deepspeed_config_names_the_accumulation_dtype_only_under_bf16() -> None:
    bf16 = config_mod.load(None, ["deepspeed.bf16=true", "deepspeed.grad_accum_dtype=fp32"])
    assert deepspeed_config(bf16, 1)["data_types"] == {"grad_accum_dtype": "fp32"}
    # DeepSpeed's BF16_Optimizer (ZeRO 1 + fp32 accumulation) needs the grad-norm pass.
    assert deepspeed_config(bf16, 1)["zero_optimization"]["compute_grad_norm"] is True
    fp32 = config_mod.load(None, ["deepspeed.bf16=false"])
    assert "data_types" not in deepspeed_config(fp32, 1)
