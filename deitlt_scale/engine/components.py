"""Factories for the engine-side parts of a run: the DeepSpeed engine around the task's model and
the DALI loaders. What the run trains (model, teacher, objective, targets) is the task's
(:mod:`deitlt_scale.tasks`); the cross-section checks live in :mod:`deitlt_scale.config`."""

from __future__ import annotations

from typing import Any

import torch

from deitlt_scale.config import Config, OptimConfig
from deitlt_scale.data.meta import DatasetMeta
from deitlt_scale.engine.distributed import World
from deitlt_scale.steps import Steps


def peak_lr(cfg: Config, world_size: int) -> float:
    from deitlt_scale.optim import peak_lr as scaled

    return scaled(cfg.optim, cfg.train.micro_batch, world_size)


def build_engine(
    model: torch.nn.Module, optim: OptimConfig, ds_config: dict, lr: float, device: torch.device
) -> Any:
    """``deepspeed.initialize`` around ``model`` with the project's optimizer (param groups,
    fused AdamW on CUDA); the lr is set per step by the trainer."""
    import deepspeed

    from deitlt_scale.optim import build_optimizer

    optimizer = build_optimizer(model, optim, lr, fused=optim.fused and device.type == "cuda")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    fp32 = not (engine.bfloat16_enabled() or engine.fp16_enabled())
    if engine.zero_optimization_stage() == 0 and fp32 and engine.dp_world_size == 1:
        # Without ZeRO and mixed precision the optimizer reads each parameter's .grad, and
        # DeepSpeed's gradient all-reduce over a single rank is the identity: flattening every
        # gradient into a buffer, reducing it over one process and copying it back cost the
        # embedded recipe's CPU step about 4% (docs/benchmarks.md, "Framework overhead against
        # a plain loop"). Mixed-precision optimizers keep their own gradient buffers: untouched.
        engine.enable_backward_allreduce = False
    return engine


def build_train_loader(
    cfg: Config, meta: DatasetMeta, steps: Steps, world: World, views: Any = None
) -> Any:
    """The train loader; ``views`` (a task's ``train_views``) asks for two views per image."""
    from deitlt_scale.data.loader import TrainLoader

    return TrainLoader(
        meta,
        cfg.data,
        micro_batch=cfg.train.micro_batch,
        micro_batches_per_epoch=steps.micro_batches_per_epoch,
        rank=world.rank,
        world_size=world.world_size,
        seed=cfg.train.seed,
        device=world.device,
        views=views,
    )


def build_eval_loader(cfg: Config, meta: DatasetMeta, world: World, split: str = "eval") -> Any:
    """The loader of an evaluation split (``eval``: the test split; ``val``: held out)."""
    from deitlt_scale.data.loader import EvalLoader

    return EvalLoader(
        meta,
        cfg.data,
        micro_batch=cfg.eval.micro_batch,
        rank=world.rank,
        world_size=world.world_size,
        device=world.device,
        split=split,
    )
