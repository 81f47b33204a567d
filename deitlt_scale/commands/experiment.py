"""`deitlt experiment run|status|report|submit`: grids of runs declared in experiments/*.yaml.

    deitlt experiment run experiments/paper_tables.yaml --out runs/paper-tables
    deitlt experiment status runs/paper-tables
    deitlt experiment report runs/paper-tables --publish docs
    deitlt experiment submit experiments/paper_tables.yaml --out /shared/paper-tables

See docs/experiments.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "run a grid of teachers and students (experiments/*.yaml) here or on SLURM; report it"


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    run = sub.add_parser(
        "run",
        help="train every run of a grid here, one after another (resumable)",
        description="Train every run of GRID here, teachers first; a complete run is skipped, "
        "an interrupted one resumes. SIGTERM/Ctrl-C: the run in progress checkpoints and the "
        "command exits 75; run it again to resume.",
    )
    _grid_arguments(run)
    run.set_defaults(_action=_run)

    submit = sub.add_parser(
        "submit",
        help="submit a grid to SLURM: one array per teacher and per row, rows after teachers",
        description="Submit the incomplete runs of GRID as SLURM job arrays (task id = seed): "
        "the data preparation if needed, one array per teacher, one per row whose elements wait "
        "for their own teacher's element (--dependency=aftercorr). Each element is a "
        "requeue-safe job (slurm/experiment.sh, slurm/common.sh). Resubmit one failed element "
        "with --only ROW --seeds S.",
    )
    _grid_arguments(submit)
    submit.add_argument(
        "--max-parallel", type=int, default=None, metavar="N", help="running elements per array"
    )
    submit.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="an sbatch option for every job, e.g. --sbatch=--partition=gpu (repeatable)",
    )
    submit.add_argument(
        "--dry-run", action="store_true", help="print the sbatch commands, submit nothing"
    )
    submit.set_defaults(_action=_submit)

    status = sub.add_parser("status", help="every run of a grid: pending/running/done/failed")
    status.add_argument("out", type=Path, help="the grid's output directory")
    status.set_defaults(_action=_status)

    report = sub.add_parser(
        "report",
        help="tables, claims, plots and provenance of a finished grid",
        description="Write OUT/report/ (page.md, summary.md, results.json, plots) from the runs "
        "of OUT; with --publish DOCS also DOCS/data/GRID.json, the page, its plots and the "
        "README summary block.",
    )
    report.add_argument("out", type=Path, help="the grid's output directory")
    report.add_argument(
        "--publish", type=Path, default=None, metavar="DOCS", help="the docs folder to publish to"
    )
    report.add_argument(
        "--partial",
        action="store_true",
        help="report a grid still running: the teachers and rows whose every seed is complete "
        "(not publishable)",
    )
    report.set_defaults(_action=_report)

    element = sub.add_parser(
        "element",
        help="train one run of a planned grid in this process (what a SLURM array element runs)",
    )
    element.add_argument("out", type=Path, help="the grid's output directory")
    element.add_argument("run", help="the run's key, e.g. rows/deitlt-seed3")
    element.set_defaults(_action=_element)


def _grid_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid", type=Path, help="grid file, e.g. experiments/paper_tables.yaml")
    parser.add_argument("--out", type=Path, required=True, help="output directory of the grid")
    parser.add_argument("--seeds", type=int, nargs="+", default=(), help="(default: the grid's)")
    parser.add_argument(
        "--only", nargs="+", default=(), metavar="ROW", help="these rows (and their teachers)"
    )
    parser.add_argument(
        "--set", nargs="+", default=(), metavar="K=V", help="overrides of every student run"
    )
    parser.add_argument(
        "--teacher-set", nargs="+", default=(), metavar="K=V", help="overrides of every teacher"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="shorten the student recipes to N epochs, keeping warm-up and DRW in proportion",
    )
    parser.add_argument(
        "--teacher-epochs", type=int, default=None, help="the same for the teacher recipes"
    )
    parser.add_argument(
        "--reuse",
        type=Path,
        action="append",
        default=[],
        metavar="OTHER",
        help="copy a run from OTHER, another grid's output directory, where a complete run there "
        "trained exactly what it would train (same data, configuration and teacher); repeatable",
    )


def _plan(args: argparse.Namespace):
    """The plan of ``--out`` with the selected runs added, and the selected runs."""
    from deitlt_scale.errors import UserError
    from deitlt_scale.experiments import grid as grid_mod
    from deitlt_scale.experiments.plan import Options, extend

    for flag in ("epochs", "teacher_epochs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    options = Options(
        seeds=tuple(args.seeds),
        only=tuple(args.only),
        student_set=tuple(args.set),
        teacher_set=tuple(args.teacher_set),
        epochs=args.epochs,
        teacher_epochs=args.teacher_epochs,
    )
    plan, selected = extend(grid_mod.load(args.grid), args.out, options)
    if plan.dropped:
        print(f"{plan.out}: {', '.join(plan.dropped)} no longer in {args.grid}: left out of "
              "the plan and the report (their directories are kept)", flush=True)  # fmt: skip
    typed = _typed()
    if typed not in plan.command.split("; "):  # the page names every command that ran the grid
        plan.command = f"{plan.command}; {typed}" if plan.command else typed
    return plan, selected


def _typed() -> str:
    import shlex
    import sys

    return "deitlt " + shlex.join(sys.argv[1:])


def _run(args: argparse.Namespace) -> int:
    from deitlt_scale.experiments.runner import run_plan

    plan, selected = _plan(args)
    plan.save()
    print(f"{plan.grid.name}: {len(selected)} of its {len(plan.runs)} runs, into {plan.out}",
          flush=True)  # fmt: skip
    return run_plan(plan, selected, args.reuse)


def _submit(args: argparse.Namespace) -> int:
    import shlex

    from deitlt_scale.experiments.reuse import Reuse
    from deitlt_scale.experiments.slurm import submit

    plan, selected = _plan(args)
    repo = Path(__file__).resolve().parents[2]
    if not args.dry_run:
        plan.save()
    if args.reuse and args.dry_run:
        print("--reuse: nothing is copied on a dry run; the runs it would copy are listed too")
    elif args.reuse:  # copied now, so that only what is left is submitted
        taker = Reuse(plan, args.reuse)
        for run in selected:
            if (source := taker.take(run)) is not None:
                print(f"{run.key}: copied from {source}", flush=True)
    done = submit(plan, selected, repo, args.max_parallel, args.sbatch, args.dry_run)
    for s in done:
        what = s.name if s.stage == "data" else f"{s.stage}/{s.name} seeds {list(s.seeds)}"
        print(f"{s.job}  {what}: {shlex.join(s.command)}", flush=True)
    if not done:
        print(f"nothing to submit: the selected runs of {plan.out} are complete", flush=True)
    return 0


def _status(args: argparse.Namespace) -> int:
    from deitlt_scale.experiments.plan import read
    from deitlt_scale.experiments.status import status_table

    print(status_table(read(args.out)))
    return 0


def _report(args: argparse.Namespace) -> int:
    from deitlt_scale.experiments import publish, report, results
    from deitlt_scale.experiments.plan import read

    plan = read(args.out)
    command = plan.command
    if args.publish is not None:
        command += f"; then {_typed()}"
    if args.partial and args.publish is not None:
        from deitlt_scale.errors import UserError

        raise UserError(
            "--partial and --publish do not go together: a partial report is not published"
        )
    doc = results.collect(plan, command, partial=args.partial)
    out = plan.out / "report"
    results.save(doc, out / "results.json")
    page = report.Report(doc)
    (out / "page.md").write_text(page.page())
    (out / "summary.md").write_text(page.summary() + "\n")
    report.write_plots(doc, out / "plots")
    print(page.summary(), flush=True)
    print(f"report: {out / 'page.md'}", flush=True)
    if args.publish is not None:
        for path in publish.publish(doc, args.publish):
            print(f"published {path}", flush=True)
    return 0


def _element(args: argparse.Namespace) -> int:
    from deitlt_scale.experiments.plan import read
    from deitlt_scale.experiments.runner import run_element

    return run_element(read(args.out), args.run)


def run(args: argparse.Namespace) -> int:
    return int(args._action(args) or 0)
