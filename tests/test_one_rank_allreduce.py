"""A one-process fp32 engine at ZeRO 0 skips DeepSpeed's gradient all-reduce over a single rank
(``engine/components.py``), and still trains what a plain torch loop trains; everywhere else the
engine keeps its reduction."""

from __future__ import annotations

import pytest
import torch

from deitlt_scale import config as config_mod
from deitlt_scale.engine.components import build_engine
from deitlt_scale.engine.distributed import deepspeed_config


def _engine(world, overrides: list[str], seed: int = 0):
    cfg = config_mod.load(None, ["optim.weight_decay=0", *overrides])
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    return build_engine(model, cfg.optim, deepspeed_config(cfg, 1), 0.01, world.device)


@pytest.mark.parametrize(
    "overrides, reduces",
    [
        (["deepspeed.zero_stage=0", "deepspeed.bf16=false"], False),
        (["deepspeed.zero_stage=1", "deepspeed.bf16=false"], True),
        (["deepspeed.zero_stage=0", "deepspeed.bf16=true"], True),
    ],
)
def test_only_a_one_rank_fp32_engine_without_zero_skips_the_all_reduce(world, overrides, reduces):
    assert _engine(world, overrides).enable_backward_allreduce is reduces


def test_the_engine_without_the_all_reduce_trains_the_weights_of_zero_1(world):
    """Three steps of the same batches: ZeRO 0 without the reduction and ZeRO 1 with it end with
    the same weights."""
    engines = [
        _engine(world, [f"deepspeed.zero_stage={s}", "deepspeed.bf16=false"]) for s in (0, 1)
    ]
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(16, 8, generator=generator)
        y = torch.randint(0, 4, (16,), generator=generator)
        for engine in engines:
            loss = torch.nn.functional.cross_entropy(engine(x.to(world.device)), y.to(world.device))
            engine.backward(loss)
            engine.step()
    for a, b in zip(*(e.module.parameters() for e in engines), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
