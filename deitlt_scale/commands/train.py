"""`deitlt train RECIPE [section.key=value ...]`: train a DeiT-LT student (or a teacher).

One process per device: run it under torchrun or srun for several; alone it is one process.
Exit status: 0 finished, 75 stopped by SIGUSR1/SIGTERM after a complete checkpoint (requeue and
run the same command again to resume), 3 non-finite loss, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "train a DeiT-LT student from a recipe (DeepSpeed, DALI, co-located teacher)"


def register(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, "recipes/tiny_digits.yaml", "optim.lr=1e-3 train.epochs=2")


def add_training_arguments(
    parser: argparse.ArgumentParser, recipe: str, overrides: str, epilog: str = ""
) -> None:
    """The arguments of a training verb (``train``, ``pretrain``): recipe, overrides,
    ``--dry-run``, ``--world-size``; ``recipe`` and ``overrides`` are the help's examples."""
    parser.add_argument("recipe", help=f"YAML recipe, e.g. {recipe}")
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {overrides}")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build everything, print the resolved config, world layout and batch, then exit",
    )
    add_world_size_argument(parser)
    parser.epilog = (
        "Resumes automatically from the newest complete checkpoint in runtime.run_dir. "
        "Exit status 75 means: stopped by a signal after a checkpoint; run again to resume."
        + (f" {epilog}" if epilog else "")
    )


def add_world_size_argument(parser: argparse.ArgumentParser) -> None:
    """``--world-size W`` of ``train`` and ``teacher train`` (see :func:`train_or_plan`)."""
    parser.add_argument(
        "--world-size",
        type=int,
        metavar="W",
        default=None,
        help="with --dry-run: print the layout of a job of W processes (steps/epoch, total steps, "
        "DRW step, peak lr, DeepSpeed config) from this machine, building nothing; needs only "
        "the dataset's meta.json",
    )


def run(args: argparse.Namespace) -> int:
    return train_or_plan(args, "train")


def train_or_plan(args: argparse.Namespace, command: str) -> int:
    """Train (or dry-run) the recipe; with ``--world-size``, only plan that job's layout."""
    if args.world_size is not None:
        from deitlt_scale.errors import UserError

        if not args.dry_run or args.world_size < 1:
            raise UserError("--world-size W (W >= 1) plans a job: use it with --dry-run")
        return plan_layout(args.recipe, args.overrides, args.world_size, command)
    return int(
        run_training(args.recipe, args.overrides, command=command, dry_run=args.dry_run) or 0
    )


def plan_layout(recipe, overrides, world_size: int, command: str) -> int:
    """Print what a job of ``world_size`` processes would run, without building it."""
    import yaml

    from deitlt_scale import config as config_mod
    from deitlt_scale import tasks
    from deitlt_scale.data import meta as meta_mod
    from deitlt_scale.engine.distributed import deepspeed_config
    from deitlt_scale.optim import peak_lr
    from deitlt_scale.steps import resolve_steps

    cfg = config_mod.load(recipe, overrides)
    kind = tasks.require_command(cfg, recipe, command)
    config_mod.validate_world(cfg, world_size)
    meta = meta_mod.load(cfg.data.shards)
    n = meta.num_samples("train")
    s = resolve_steps(cfg, n, world_size)
    t = cfg.train
    last = s.micro_batches_in_step(s.steps_per_epoch - 1)
    drw = "never" if s.drw_start is None else f"step {s.drw_start}"
    lines = [
        f"plan         {world_size} process(es), {kind.name} run of {recipe}",
        f"data         {meta.dataset}: {n} train images; per rank and epoch {s.samples_per_rank}"
        f" samples (repeated augmentation x{cfg.data.repeated_aug})",
        f"batch        {t.micro_batch} per process x {t.grad_accum} accumulation x {world_size}"
        f" = {t.micro_batch * t.grad_accum * world_size} global",
        f"epoch        {s.micro_batches_per_epoch} micro-batches per rank (last of"
        f" {s.last_micro_batch} images), {s.steps_per_epoch} optimizer steps (last of {last}"
        " micro-batches)",
        f"schedule     {s.total} steps, warm-up {s.warmup}, DRW from {drw},"
        f" peak lr {peak_lr(cfg.optim, t.micro_batch, world_size):.3g}",
        "deepspeed    " + json.dumps(deepspeed_config(cfg, world_size), sort_keys=True),
    ]
    print("\n".join(lines), flush=True)
    print(yaml.safe_dump(config_mod.to_dict(cfg), sort_keys=False), flush=True)
    print("dry run: nothing was built", flush=True)
    return 0


def run_training(
    recipe: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    command: str = "train",
    dry_run: bool = False,
) -> int:
    """Load the recipe, set up the process group, build, train; returns the exit status.

    ``command`` is the CLI verb that was run (``train`` or ``teacher train``): a recipe of
    another kind of run is refused with the verb it needs.
    """
    from deitlt_scale import config as config_mod
    from deitlt_scale import tasks
    from deitlt_scale.engine.distributed import broadcast_object, init_distributed
    from deitlt_scale.engine.trainer import EXIT_NONFINITE, NonFiniteLoss, Trainer

    cfg = config_mod.load(recipe, overrides)
    tasks.require_command(cfg, recipe, command)
    world = init_distributed(cfg.runtime.device)
    try:
        trainer = Trainer(cfg, world).build()
        if world.is_main:
            print(trainer.describe(), flush=True)
        if dry_run:
            if world.is_main:
                import yaml

                print(yaml.safe_dump(config_mod.to_dict(cfg), sort_keys=False), flush=True)
                print("dry run: stopping before step 1", flush=True)
            return 0
        run_dir = trainer.run_dir
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            config_mod.dump(cfg, run_dir / "config.yaml")
            spec = run_dir / trainer.task.spec_file
            spec.write_text(json.dumps(trainer.model_spec, indent=1))
        tracker = _start_tracker(cfg, trainer, world, broadcast_object)
        status = "FINISHED"
        try:
            code = trainer.train(tracker)
        except NonFiniteLoss as err:
            print(f"deitlt train: error: {err}", file=sys.stderr, flush=True)
            status, code = "FAILED", EXIT_NONFINITE
        if code == 0 and world.is_main:
            module = trainer.engine.module
            handed_on = trainer.task.save_outputs(getattr(module, "_orig_mod", module), run_dir)
            if handed_on is not None:
                print(f"{trainer.task.name} file: {handed_on}", flush=True)
        if world.is_main:
            if code == 0:
                print(f"done: {trainer.state.step} steps; outputs in {run_dir}", flush=True)
            elif code == 75:
                print(
                    f"stopped at step {trainer.state.step} after a checkpoint (exit 75)", flush=True
                )
        tracker.close("FINISHED" if code in (0, 75) else status)
        return code
    finally:
        from deitlt_scale.engine.distributed import shutdown_distributed

        shutdown_distributed()


def _start_tracker(cfg, trainer, world, broadcast_object):
    """The run's metric writer: step lines on the console plus the MLflow run, which rank 0
    creates (or continues) and whose id the other ranks learn."""
    from deitlt_scale import config as config_mod
    from deitlt_scale.tracking import ConsoleWriter, FanOut, Tracker, standard_tags

    console = ConsoleWriter(world.rank, trainer.steps.total, only=("train/",))
    tags = standard_tags(cfg, world.world_size, world.device.type, dataset=trainer.meta.dataset)
    if world.is_main:
        tracker = Tracker.start(
            cfg.tracking, trainer.run_dir, config_mod.flatten(cfg), tags, rank=0
        )
        broadcast_object(tracker.run_id)
        return FanOut(console, tracker)
    run_id = broadcast_object(None)
    tracker = Tracker.start(cfg.tracking, trainer.run_dir, {}, tags, rank=world.rank, run_id=run_id)
    return FanOut(console, tracker)
