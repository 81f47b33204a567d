"""`deitlt eval RUN_DIR`: Overall/Head/Mid/Tail of a checkpoint for the CLS, DIST and mean heads."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "evaluate a checkpoint: Overall/Head/Mid/Tail for the CLS, DIST and averaged heads"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory written by `deitlt train`")
    parser.add_argument(
        "--tag", default="best", help="checkpoint: best (default), latest or step_XXXXXXXX"
    )
    parser.add_argument(
        "--data", default=None, help="prepared dataset directory (default: the run's data.shards)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where the table and CSVs go (default: RUN_DIR/eval)"
    )


def run(args: argparse.Namespace) -> int:
    from deitlt_scale import config as config_mod
    from deitlt_scale.engine import checkpoint
    from deitlt_scale.engine.distributed import init_distributed, shutdown_distributed
    from deitlt_scale.engine.evaluate import format_table
    from deitlt_scale.engine.trainer import Trainer, write_eval_outputs
    from deitlt_scale.errors import UserError
    from deitlt_scale.tracking import Tracker

    run_dir: Path = args.run_dir
    recipe = run_dir / "config.yaml"
    if not recipe.is_file():
        raise UserError(f"{run_dir} holds no config.yaml: is it a run directory of `deitlt train`?")
    overrides = ["teacher.path=", "distill.type=none", "model.compile=false"]
    overrides += [f"runtime.run_dir={run_dir}", "tracking.enabled=false"]
    if args.data:
        overrides.append(f"data.shards={args.data}")
    cfg = config_mod.load(recipe, overrides)
    ref = checkpoint.find_checkpoint(run_dir, args.tag)
    if ref is None:
        raise UserError(f"{run_dir} has no complete checkpoint {args.tag!r}; try --tag latest")
    world = init_distributed(cfg.runtime.device)
    try:
        trainer = Trainer(cfg, world).build()
        checkpoint.check_pickles(ref.path)
        trainer.engine.load_checkpoint(
            str(ref.path.parent), tag=ref.tag, load_module_only=True, load_optimizer_states=False
        )
        trainer.tracker = Tracker.start(cfg.tracking, run_dir, {}, {}, rank=world.rank)
        trainer.engine.eval()
        from deitlt_scale.engine.evaluate import evaluate

        result = evaluate(
            trainer.predict,
            trainer.eval_loader,
            trainer.num_classes,
            trainer.meta.groups,
            world.device,
        )
        if world.is_main:
            out = args.out or run_dir / "eval"
            write_eval_outputs(result, out, trainer.meta, ref.step)
            print(f"checkpoint {ref.path} (step {ref.step})")
            print(format_table(result))
            print(f"per-class accuracy: {out / 'per_class_latest.csv'}")
        return 0
    finally:
        shutdown_distributed()
