"""`deitlt eval RUN_DIR`: Overall/Head/Mid/Tail of a checkpoint for the CLS, DIST and mean heads."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "evaluate a checkpoint: Overall/Head/Mid/Tail for the CLS, DIST and averaged heads"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory written by `deitlt train`")
    parser.add_argument(
        "--tag",
        default="best",
        help="checkpoint: best (default; chosen on the eval split, as the reference does), "
        "latest or step_XXXXXXXX",
    )
    parser.add_argument(
        "--data", default=None, help="prepared dataset directory (default: the run's data.shards)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where the table and CSVs go (default: RUN_DIR/eval)"
    )


def run(args: argparse.Namespace) -> int:
    from deitlt_scale.engine.distributed import init_distributed, shutdown_distributed

    cfg, ref = _resolve(args.run_dir, args.tag, args.data)
    world = init_distributed(cfg.runtime.device)
    try:
        result = evaluate_checkpoint(cfg, ref, world, args.out or args.run_dir / "eval")
        if world.is_main:
            from deitlt_scale.engine.evaluate import format_table

            out = args.out or args.run_dir / "eval"
            print(f"checkpoint {ref.path} (step {ref.step})")
            print(format_table(result))
            print(f"per-class accuracy: {out / 'per_class_latest.csv'}")
        return 0
    finally:
        shutdown_distributed()


def _resolve(run_dir: Path, tag: str, data: str | None):
    """The run's config (with ``--data``) and the checkpoint ``tag`` names; one-line errors."""
    from deitlt_scale import config as config_mod
    from deitlt_scale.engine import checkpoint
    from deitlt_scale.errors import UserError

    recipe = run_dir / "config.yaml"
    if not recipe.is_file():
        raise UserError(f"{run_dir} holds no config.yaml: is it a run directory of `deitlt train`?")
    overrides = [f"runtime.run_dir={run_dir}", "tracking.enabled=false"]
    if data:
        overrides.append(f"data.shards={data}")
    cfg = config_mod.load(recipe, overrides)
    return cfg, checkpoint.find_checkpoint(run_dir, tag)


def evaluate_checkpoint(cfg, ref, world, out_dir: Path):
    """Evaluate the weights of checkpoint ``ref`` as the training run evaluates its live model.

    The weights are consolidated from the checkpoint files (any ZeRO stage, any number of
    writers) into the task's plain model, cast to the training compute dtype: no optimizer, no
    DeepSpeed engine, no teacher.
    """
    import torch

    from deitlt_scale import tasks
    from deitlt_scale.data import meta as meta_mod
    from deitlt_scale.engine.checkpoint import consolidate, load_strict
    from deitlt_scale.engine.components import build_eval_loader
    from deitlt_scale.engine.evaluate import evaluate_run

    meta = meta_mod.load(cfg.data.shards)
    task = tasks.create(cfg, meta)
    model = task.build_model()
    state, _ = consolidate(ref.path)
    load_strict(model, state, f"checkpoint {ref.path}")
    dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
    model = model.to(device=world.device, dtype=dtype).eval()
    loader = build_eval_loader(cfg, meta, world)
    return evaluate_run(
        lambda images: task.predict(model, images.to(dtype)), loader, meta, world, out_dir, ref.step
    )
