"""A grid expanded into runs: one ``deitlt`` command per (teacher or row, seed), and their layout.

Under the output directory ``OUT``::

    OUT/plan.json                 the grid, the options and every run's command (this module)
    OUT/data/                     the prepared dataset (`deitlt data prepare` with the grid's data)
    OUT/teachers/NAME-seedS/      a teacher run (its teacher file in .../teacher)
    OUT/rows/NAME-seedS/          a student (or control) run
    OUT/*/NAME-seedS.log          its output, appended over attempts
    OUT/*/NAME-seedS/experiment.json   its state and attempts (:mod:`.runner`)

Row seed ``s`` learns from teacher seed ``s`` of its teacher, so the spread over seeds includes
the teacher's. Everything a run does is in its command: ``--set`` / ``--teacher-set`` overrides
and ``--epochs`` / ``--teacher-epochs`` (which shorten a recipe keeping its schedule's
proportions) are written into it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from deitlt_scale.errors import UserError
from deitlt_scale.experiments.grid import Grid, load

PLAN_FILE = "plan.json"
STATE_FILE = "experiment.json"
SUMMARY_FILE = "train_summary.json"  # written by a finished `deitlt train` and by the control


@dataclass(frozen=True)
class Options:
    """How a grid is run; recorded in the plan so that every later command agrees."""

    seeds: tuple[int, ...] = ()  # () = the grid's
    only: tuple[str, ...] = ()  # rows to run (and the rows they reuse); () = all
    student_set: tuple[str, ...] = ()
    teacher_set: tuple[str, ...] = ()
    epochs: int | None = None
    teacher_epochs: int | None = None


@dataclass(frozen=True)
class Run:
    stage: Literal["teachers", "rows"]
    name: str
    seed: int
    verb: tuple[
        str, ...
    ]  # ("teacher", "train") | ("train",) | ("pretrain",) | ("bench", "control")
    recipe: str
    overrides: tuple[str, ...]
    run_dir: Path
    needs: tuple[str, ...] = ()  # keys of the runs it needs: its teacher, the run it starts from

    @property
    def argv(self) -> tuple[str, ...]:
        """The `deitlt` arguments that train it."""
        flags = ("--side", "plain") if self.verb == ("bench", "control") else ()
        return (*self.verb, self.recipe, *self.overrides, *flags)

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.name}-seed{self.seed}"

    @property
    def log(self) -> Path:
        return self.run_dir.parent / f"{self.run_dir.name}.log"

    @property
    def is_teacher(self) -> bool:
        return self.stage == "teachers"


@dataclass
class Plan:
    grid: Grid
    out: Path
    options: Options
    runs: list[Run] = field(default_factory=list)
    command: str = ""  # how the grid was started, as typed
    dropped: list[str] = field(default_factory=list)  # rows and teachers the grid no longer has

    @property
    def data(self) -> Path:
        return self.out / "data"

    def seeds(self) -> tuple[int, ...]:
        return self.options.seeds or self.grid.seeds

    def by_key(self) -> dict[str, Run]:
        return {r.key: r for r in self.runs}

    def runs_of(self, stage: str, name: str) -> list[Run]:
        """The runs of row (or teacher) ``name``, in seed order."""
        return [r for r in self.runs if r.stage == stage and r.name == name]

    def save(self) -> Path:
        payload = {
            "grid": str(self.grid.path),
            "command": self.command,
            "options": asdict(self.options),
            "runs": [{**asdict(r), "run_dir": str(r.run_dir)} for r in self.runs],
        }
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / PLAN_FILE
        tmp = path.with_name(f".{PLAN_FILE}.partial")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(path)
        return path


def expand(grid: Grid, out: Path, options: Options) -> Plan:
    """Every run of ``grid`` under ``out``: the teachers the chosen rows need, then the rows."""
    unknown = [r for r in options.only if r not in grid.rows]
    if unknown:
        raise UserError(f"--only names {unknown[0]!r}; rows of {grid.name}: {', '.join(grid.rows)}")
    out = out.resolve()
    plan = Plan(grid, out, options)
    rows = grid.trained_rows(options.only)
    data = f"data.shards={plan.data}"
    for name in grid.teachers_of(rows):
        spec = grid.teachers[name]
        recipe = grid.recipe_path(spec.recipe)
        for seed in plan.seeds():
            run_dir = out / "teachers" / f"{name}-seed{seed}"
            overrides = last_wins(
                [data, f"runtime.run_dir={run_dir}", f"train.seed={seed}",
                 *scaled_schedule(recipe, options.teacher_epochs), *spec.overrides,
                 *options.teacher_set]
            )  # fmt: skip
            verb = ("teacher", "train")
            plan.runs.append(
                Run("teachers", name, seed, verb, str(recipe), tuple(overrides), run_dir)
            )
    for name in rows:
        spec = grid.rows[name]
        recipe = grid.recipe_path(spec.recipe)
        for seed in plan.seeds():
            run_dir = out / "rows" / f"{name}-seed{seed}"
            teacher, needs = [], []
            if spec.teacher is not None:
                teacher_dir = out / "teachers" / f"{spec.teacher}-seed{seed}"
                teacher = [f"teacher.path={teacher_dir / 'teacher'}"]
                needs.append(f"teachers/{spec.teacher}-seed{seed}")
            if spec.init_from is not None:
                start = out / "rows" / f"{spec.init_from}-seed{seed}"
                teacher.append(f"train.init_from={start}:latest")
                needs.append(f"rows/{spec.init_from}-seed{seed}")
            overrides = last_wins(
                [data, f"runtime.run_dir={run_dir}", f"train.seed={seed}",
                 *scaled_schedule(recipe, options.epochs), *teacher, *spec.overrides,
                 *options.student_set]
            )  # fmt: skip
            verb = {"control": ("bench", "control"), "pretrain": ("pretrain",)}.get(
                spec.kind, ("train",)
            )
            plan.runs.append(
                Run("rows", name, seed, verb, str(recipe), tuple(overrides), run_dir, tuple(needs))
            )
    return plan


def extend(grid: Grid, out: Path, options: Options) -> tuple[Plan, list[Run]]:
    """The plan of ``out`` with the runs ``options`` selects added, and those runs.

    A new directory's plan is the selection. An existing plan keeps its runs, takes the selected
    ones' commands from the grid as it is now and gains those it lacks (more seeds, another row),
    so ``--only ROW --seeds S`` runs or resubmits one run without forgetting the others; the
    options that change what a run trains (``--set``, ``--epochs``, ...) must be the plan's, or
    nothing is run."""
    selected = expand(grid, out, options)
    if not (Path(out) / PLAN_FILE).is_file():
        return selected, list(selected.runs)
    plan = read(out)
    mine, theirs = _training_options(options), _training_options(plan.options)
    if mine != theirs or plan.grid.path != grid.path:
        raise UserError(
            f"{out} was planned from {plan.grid.path} with other options ({theirs}); use the "
            "same grid and --set/--teacher-set/--epochs/--teacher-epochs, or another --out"
        )
    # A selected run takes its command from the grid as it is now, so that an edited grid is
    # what runs; the runner refuses a started run whose trained configuration that changes.
    fresh = {run.key: run for run in selected.runs}
    known = {run.key for run in plan.runs}
    plan.runs = [fresh.get(run.key, run) for run in plan.runs]
    plan.runs += [run for run in selected.runs if run.key not in known]
    order = {(stage, name): i for i, (stage, name) in enumerate(
        [("teachers", t) for t in grid.teachers] + [("rows", r) for r in grid.rows])}  # fmt: skip
    # A row (or teacher) taken out of the grid leaves the plan; its directories stay on disk.
    plan.dropped = sorted(
        {f"{r.stage}/{r.name}" for r in plan.runs if (r.stage, r.name) not in order}
    )
    plan.runs = [r for r in plan.runs if (r.stage, r.name) in order]
    plan.runs.sort(key=lambda r: (order[(r.stage, r.name)], r.seed))
    seeds = sorted(set(plan.options.seeds or grid.seeds) | set(selected.seeds()))
    only = () if not plan.options.only or not options.only else tuple(
        n for n in dict.fromkeys([*plan.options.only, *options.only]) if n in grid.rows)  # fmt: skip
    plan.options = Options(tuple(seeds), only, *_training_options(plan.options))
    return plan, list(selected.runs)


def _training_options(options: Options) -> tuple:
    return (options.student_set, options.teacher_set, options.epochs, options.teacher_epochs)


def read(out: Path) -> Plan:
    """The plan ``deitlt experiment run|submit`` wrote into ``out``."""
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        raise UserError(
            f"{out} holds no {PLAN_FILE}; start the grid there with `deitlt experiment run` "
            "or `deitlt experiment submit`"
        )
    payload = json.loads(path.read_text())
    options = payload["options"]
    options = Options(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    plan = Plan(load(payload["grid"]), Path(out).resolve(), options, command=payload["command"])
    plan.runs = [
        Run(**{**r, "verb": tuple(r["verb"]), "overrides": tuple(r["overrides"]),
               "needs": tuple(r["needs"]), "run_dir": Path(r["run_dir"])})
        for r in payload["runs"]
    ]  # fmt: skip
    return plan


def scaled_schedule(recipe: Path, epochs: int | None) -> list[str]:
    """Overrides that shorten ``recipe`` to ``epochs`` keeping the schedule's proportions:
    warm-up, DRW start (an int epoch, at most ``epochs - 1``) and step milestones scale by
    ``epochs / recipe epochs``. Nothing when ``epochs`` is None."""
    if epochs is None:
        return []
    tree = yaml.safe_load(Path(recipe).read_text())
    ratio = epochs / tree["train"]["epochs"]
    out = [f"train.epochs={epochs}"]
    sched, distill, optim = (tree.get(k) or {} for k in ("schedule", "distill", "optim"))
    if "warmup_epochs" in sched:
        out.append(f"schedule.warmup_epochs={min(sched['warmup_epochs'] * ratio, epochs):g}")
    if sched.get("milestones"):
        out.append(
            f"schedule.milestones=[{','.join(f'{m * ratio:g}' for m in sched['milestones'])}]"
        )
    if optim.get("sam_rho_milestones"):
        ms = ",".join(f"{m * ratio:g}" for m in optim["sam_rho_milestones"])
        out.append(f"optim.sam_rho_milestones=[{ms}]")
    if distill.get("drw_epoch") is not None:
        out.append(f"distill.drw_epoch={min(int(distill['drw_epoch'] * ratio), epochs - 1)}")
    return out


def last_wins(overrides: list[str]) -> list[str]:
    """``overrides`` without those a later one of the same key replaces (the config loader
    applies them in order, so the result configures the same run, stated once per key)."""
    last = {item.split("=", 1)[0]: i for i, item in enumerate(overrides)}
    return [item for i, item in enumerate(overrides) if last[item.split("=", 1)[0]] == i]


# Sections that say where a run writes and logs, not what it trains.
UNTRAINED_SECTIONS = ("runtime", "tracking", "checkpoint")


def trained_keys(cfg: Any) -> dict:
    """What ``cfg`` trains: its dotted keys, without where it writes."""
    from deitlt_scale import config as config_mod

    flat = config_mod.flatten(cfg)
    return {k: v for k, v in flat.items() if k.split(".")[0] not in UNTRAINED_SECTIONS}


def trained_config(run: Run) -> dict:
    """What the run trains: its resolved configuration, dotted keys, without where it writes."""
    from deitlt_scale import config as config_mod

    return trained_keys(config_mod.load(run.recipe, list(run.overrides)))


def config_difference(recorded: dict, current: dict) -> str | None:
    """The first key whose value differs between a recorded and the current trained config, or
    None. A key the recording lacks counts as unchanged when it now holds its default: a setting
    added to the project later, at its default, trains the same run."""
    from deitlt_scale import config as config_mod

    defaults = trained_keys(config_mod.Config())
    for key, value in current.items():
        was = recorded.get(key, defaults.get(key))
        if key not in recorded and value == defaults.get(key):
            continue
        if was != value:
            return f"{key} {was!r} -> {value!r}"
    gone = [k for k in recorded if k not in current]
    return f"{gone[0]} no longer exists" if gone else None


def is_complete(run: Run) -> bool:
    """Trained to its end: its train summary and final evaluation exist (and a teacher's file)."""
    done = (run.run_dir / SUMMARY_FILE).is_file() and (run.run_dir / "eval/latest.json").is_file()
    return done and (not run.is_teacher or (run.run_dir / "teacher").is_dir())
