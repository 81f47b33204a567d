"""`deitlt eval RUN_DIR`: Overall/Head/Mid/Tail of a checkpoint for the CLS, DIST and mean heads."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "evaluate a checkpoint: Overall/Head/Mid/Tail for the CLS, DIST and averaged heads"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir",
        type=Path,
        nargs="+",
        help="run directory written by `deitlt train`; several with --aggregate (e.g. seeds)",
    )
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
    extra = parser.add_argument_group(
        "beyond the paper",
        "post-hoc analyses of the checkpoint's logits (outputs in OUT/posthoc and MLflow); "
        "tau and w are chosen on the dataset's val split, never on the test split",
    )
    extra.add_argument(
        "--logit-adjust",
        action="store_true",
        help="sweep tau in 0..2: each head's logits minus tau * log(train prior) (Menon et al. 2021)",
    )
    extra.add_argument(
        "--calibration",
        action="store_true",
        help="ECE (15 bins), NLL and a reliability diagram (PNG) per head",
    )
    extra.add_argument(
        "--fusion-weight",
        action="store_true",
        help="sweep w in 0..1: w * CLS + (1 - w) * DIST logits (w = 0.5: the paper's mean head)",
    )
    extra.add_argument(
        "--aggregate",
        action="store_true",
        help="evaluate every RUN_DIR and report mean and standard deviation (OUT: default "
        "RUN_DIR1/../eval-aggregate)",
    )


def run(args: argparse.Namespace) -> int:
    from deitlt_scale.engine.distributed import init_distributed, shutdown_distributed
    from deitlt_scale.errors import UserError

    runs: list[Path] = args.run_dir
    if len(runs) > 1 and not args.aggregate:
        raise UserError(f"{len(runs)} run directories given: pass --aggregate to aggregate them")
    resolved = [_resolve(run_dir, args.tag, args.data) for run_dir in runs]
    world = init_distributed(resolved[0][0].runtime.device)
    try:
        flat: list[dict[str, float]] = []
        for run_dir, (cfg, ref) in zip(runs, resolved):
            out = args.out if args.out and not args.aggregate else run_dir / "eval"
            flat.append(_evaluate_one(args, run_dir, cfg, ref, world, out))
        if args.aggregate and world.is_main:
            from deitlt_scale.analysis.aggregate import aggregate, format_aggregate, write_aggregate

            agg = aggregate(flat)
            out = args.out or runs[0].parent / "eval-aggregate"
            path = write_aggregate(agg, runs, out)
            print(f"aggregate of {len(runs)} runs ({args.tag} checkpoints)")
            print(format_aggregate(agg))
            print(f"aggregate: {path}")
        return 0
    finally:
        shutdown_distributed()


def _evaluate_one(args, run_dir: Path, cfg, ref, world, out: Path) -> dict[str, float]:
    """The standard table of one run and the requested post-hoc analyses; the flat metrics."""
    from deitlt_scale.analysis.posthoc import PosthocOptions, run_posthoc
    from deitlt_scale.engine.evaluate import format_table
    from deitlt_scale.engine.posthoc import LogitRecorder

    options = PosthocOptions(args.logit_adjust, args.calibration, args.fusion_weight)
    recorder = LogitRecorder() if options.any else None
    result = evaluate_checkpoint(cfg, ref, world, out, recorder)
    metrics = dict(result.metrics)
    if world.is_main:
        from deitlt_scale.engine.selection import selection_note

        print(f"checkpoint {ref.path} (step {ref.step}); {selection_note(run_dir, args.tag)}")
        print(format_table(result))
        print(f"per-class accuracy: {out / 'per_class_latest.csv'}")
    if recorder is not None:
        test, val = recorder.logits(), recorder.val
        if world.is_main:
            meta = recorder.meta
            report = run_posthoc(
                test, val, meta.train_counts, meta.groups, options, out / "posthoc"
            )
            print("\n".join(report.lines))
            _log_mlflow(cfg, run_dir, report)
            metrics.update(report.metrics)
    return metrics


def _log_mlflow(cfg, run_dir: Path, report) -> None:
    """The post-hoc figures and files into the run's MLflow run, when it has one."""
    from deitlt_scale.analysis.tracked import open_tracker
    from deitlt_scale.tracking.mlflow_writer import read_run_id

    tracker = open_tracker(read_run_id(run_dir), cfg.tracking, run_dir)
    if tracker is None:
        return
    tracker.log_metrics({f"posthoc/{k}": v for k, v in report.metrics.items()})
    tracker.log_files(report.files, "posthoc")


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


def evaluate_checkpoint(cfg, ref, world, out_dir: Path, recorder=None):
    """Evaluate the weights of checkpoint ``ref`` as the training run evaluates its live model.

    The weights are consolidated from the checkpoint files (any ZeRO stage, any number of
    writers) into the task's plain model, cast to the training compute dtype: no optimizer, no
    DeepSpeed engine, no teacher. A :class:`~deitlt_scale.engine.posthoc.LogitRecorder` keeps
    the test logits of the same pass and collects the val split's, where the dataset has one.
    """
    import torch

    from deitlt_scale import tasks
    from deitlt_scale.data import meta as meta_mod
    from deitlt_scale.engine.checkpoint import consolidate, load_strict
    from deitlt_scale.engine.components import build_eval_loader
    from deitlt_scale.engine.evaluate import evaluate_run

    meta = meta_mod.load(cfg.data.shards)
    task = tasks.create(cfg, meta)
    if not task.classifies:
        from deitlt_scale.errors import UserError

        raise UserError(
            f"{ref.run_dir} is a {task.name} pre-training run: it classifies nothing (its "
            "reconstruction loss per split is in eval/latest.json); train a student from it with "
            f"train.init_from={ref.run_dir}:latest and evaluate that"
        )
    model = task.build_model()
    state, _ = consolidate(ref.path)
    load_strict(model, state, f"checkpoint {ref.path}")
    dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
    model = model.to(device=world.device, dtype=dtype).eval()
    loader = build_eval_loader(cfg, meta, world)

    def predict(images):
        return task.predict(model, images.to(dtype))

    if recorder is not None:
        recorder.collect_val(predict, cfg, meta, world)
        predict, loader = recorder.wrap(predict, loader)
    return evaluate_run(predict, loader, meta, world, out_dir, ref.step)
