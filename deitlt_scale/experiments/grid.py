"""An experiment grid as data: ``experiments/*.yaml`` (docs/experiments.md).

A grid names the teachers to train (a recipe and overrides each), the rows (a student recipe, its
overrides and which teacher it learns from), the seeds every one of them runs with, the claims to
check on the results and how to report them. Nothing in a grid is code: the runner
(:mod:`~deitlt_scale.experiments.runner`) turns it into ``deitlt`` commands. Recipe paths are
relative to the grid file. Loading is as strict as a recipe's: an unknown key, a value of the
wrong type, a row naming an unknown teacher, or a claim naming an unknown row is an error that
names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from deitlt_scale.strict import ConfigError, build_strict

HEADS = ("cls", "dist", "mean", "teacher")
GROUPS = ("overall", "head", "mid", "tail")


@dataclass(frozen=True)
class PaperFigure:
    """Published figures shown beside a row: one tuple per ``report.paper_columns`` entry,
    (overall,) or (overall, head, mid, tail), percent."""

    source: str
    figures: tuple[tuple[float, ...], ...] = ()
    note: str = ""


@dataclass(frozen=True)
class TeacherSpec:
    recipe: str
    overrides: tuple[str, ...] = ()
    label: str = ""
    note: str = ""
    paper: PaperFigure | None = None


@dataclass(frozen=True)
class RowSpec:
    """``kind: train`` runs ``deitlt train``; ``kind: pretrain`` runs ``deitlt pretrain`` (a row
    whose runs other rows start from, ``init_from``); ``kind: control`` the plain PyTorch loop of
    ``deitlt bench control --side plain`` on the same recipe, and ``controls`` names the train
    row it is compared with. ``reuses`` shows another row's runs under this row's name (trained
    once); ``init_from`` starts each seed from another row's run of that seed."""

    recipe: str = ""
    kind: Literal["train", "control", "pretrain"] = "train"
    controls: str | None = None
    teacher: str | None = None
    # Start from the final weights of this row's run of the same seed (train.init_from): a
    # later stage, e.g. at a higher resolution.
    init_from: str | None = None
    overrides: tuple[str, ...] = ()
    section: str = ""
    label: str = ""
    note: str = ""
    paper: PaperFigure | None = None
    reuses: str | None = None


@dataclass(frozen=True)
class Side:
    """A measurement: ``head``'s ``group`` accuracy in the runs of row ``runs`` (or of
    ``teacher NAME``)."""

    runs: str
    head: Literal["cls", "dist", "mean", "teacher"]
    group: Literal["overall", "head", "mid", "tail"] = "overall"

    @property
    def metric(self) -> str:
        if self.group == "overall":
            return f"{self.head}/overall"
        return f"{self.head}/paper/{self.group}"

    @property
    def label(self) -> str:
        name = {"cls": "CLS", "dist": "DIST", "mean": "mean", "teacher": "teacher"}[self.head]
        who = self.runs if self.head != "teacher" else self.runs.split()[-1]
        return f"{who} {name}, {self.group.capitalize()}"


@dataclass(frozen=True)
class ClaimSpec:
    statement: str
    source: str
    better: Side
    worse: Side
    # Where the claim does not hold here, why, from measurements the page shows (printed under
    # the claims table; a claim that holds does not print it).
    why: str = ""


@dataclass(frozen=True)
class Headline:
    """One figure of the README summary: ``label`` scores ``runs``' ``head`` (overall, tail)."""

    runs: str
    head: Literal["cls", "dist", "mean", "teacher"]
    label: str


@dataclass(frozen=True)
class Selection:
    """A sweep's choice: the row whose mean over seeds of ``metric`` on the ``split`` split is
    highest (``val``: never the eval split the tables report)."""

    metric: str = "mean/mean_class"
    split: Literal["val"] = "val"
    # The row the recipe keeps when it is not the first ranked (rows within noise of each
    # other: the cheaper or the paper's setting), and why, in the page.
    kept: str | None = None
    why: str = ""


@dataclass(frozen=True)
class ReportSpec:
    sections: tuple[str, ...] = ()  # the order of the rows' sections
    paper_columns: tuple[str, ...] = ()  # what each PaperFigure.figures entry is
    select: Selection | None = None
    heads_row: str | None = None  # `deitlt eval --fusion-weight --calibration` of its runs
    # The final, the val-chosen and the test-chosen (the reference's) checkpoints of its runs
    checkpoints_row: str | None = None
    per_class_row: str | None = None  # per-class accuracy plot of its runs
    headline: tuple[Headline, ...] = ()  # the README summary's figures
    page: str = ""  # `report --publish DOCS` writes DOCS/<page>; "" publishes no page


@dataclass(frozen=True)
class Grid:
    name: str  # the file's stem
    path: Path
    title: str
    intro: str
    data: tuple[str, ...]  # `deitlt data prepare` arguments (without --out)
    seeds: tuple[int, ...]
    teachers: dict[str, TeacherSpec]
    rows: dict[str, RowSpec]
    claims: tuple[ClaimSpec, ...]
    report: ReportSpec

    def recipe_path(self, recipe: str) -> Path:
        return (self.path.parent / recipe).resolve()

    def trained_rows(self, only: tuple[str, ...] = ()) -> list[str]:
        """The rows that train (``reuses`` rows show another's runs), restricted to ``only``
        and the rows they reuse or start from, in file order."""
        wanted = set(only or self.rows)
        while True:
            more = {x for r in wanted for x in (self.rows[r].reuses, self.rows[r].init_from) if x}
            if more <= wanted:
                break
            wanted |= more
        return [r for r, spec in self.rows.items() if r in wanted and not spec.reuses]

    def teachers_of(self, rows: list[str]) -> list[str]:
        used = {self.rows[r].teacher for r in rows}
        return [t for t in self.teachers if t in used]


@dataclass(frozen=True)
class _File:
    """The top level of a grid file, besides its ``rows`` and ``teachers`` mappings."""

    title: str
    data: tuple[str, ...]
    seeds: tuple[int, ...]
    claims: tuple[ClaimSpec, ...] = ()
    report: ReportSpec = field(default_factory=ReportSpec)
    intro: str = ""


def load(path: str | Path) -> Grid:
    """Read and check a grid file; raises :class:`ConfigError` naming what is wrong."""
    path = Path(path)
    where = f"grid {path}"
    if not path.is_file():
        raise ConfigError(f"{where} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(tree).__name__}")
    for section in ("rows", "teachers"):
        if not isinstance(tree.get(section, {}), dict):
            raise ConfigError(f"{where}: {section} must map names to entries")
    top = build_strict(_File, {k: v for k, v in tree.items() if k not in ("rows", "teachers")})
    teachers = {
        str(name): build_strict(TeacherSpec, spec or {}, f"teachers.{name}.")
        for name, spec in (tree.get("teachers") or {}).items()
    }
    rows = {
        str(name): build_strict(RowSpec, spec or {}, f"rows.{name}.")
        for name, spec in (tree.get("rows") or {}).items()
    }
    grid = Grid(
        name=path.stem,
        path=path.resolve(),
        title=top.title,
        intro=top.intro,
        data=top.data,
        seeds=top.seeds,
        teachers=teachers,
        rows=rows,
        claims=top.claims,
        report=top.report,
    )
    _check(grid, where)
    return grid


def _check(grid: Grid, where: str) -> None:
    def fail(message: str) -> None:
        raise ConfigError(f"{where}: {message}")

    if not grid.rows:
        fail("has no rows")
    if not grid.seeds or len(set(grid.seeds)) != len(grid.seeds):
        fail(f"seeds must be distinct and at least one, got {list(grid.seeds)}")
    for name, spec in grid.teachers.items():
        if not grid.recipe_path(spec.recipe).is_file():
            fail(f"teachers.{name}.recipe {spec.recipe} does not exist")
    for name, row in grid.rows.items():
        if row.reuses is not None:
            if row.reuses not in grid.rows or grid.rows[row.reuses].reuses:
                fail(f"rows.{name}.reuses names {row.reuses!r}, which is not a trained row")
            continue
        if not row.recipe or not grid.recipe_path(row.recipe).is_file():
            fail(f"rows.{name}.recipe {row.recipe or '(none)'} does not exist")
        if row.teacher is not None and row.teacher not in grid.teachers:
            fail(f"rows.{name}.teacher names {row.teacher!r}; teachers: {', '.join(grid.teachers)}")
        if row.init_from is not None and (
            row.init_from not in grid.rows
            or grid.rows[row.init_from].reuses
            or row.init_from == name
            or list(grid.rows).index(row.init_from) > list(grid.rows).index(name)
        ):
            fail(f"rows.{name}.init_from must name a trained row listed before it, got "
                 f"{row.init_from!r}")  # fmt: skip
        if (row.kind == "control") != (row.controls is not None):
            fail(f"rows.{name}: a control row (kind: control) names the row it controls, and "
                 "only a control row does (controls: ROW)")  # fmt: skip
        if row.controls is not None:
            other = grid.rows.get(row.controls)
            same = other is not None and (other.recipe, other.teacher, other.overrides) == (
                row.recipe,
                row.teacher,
                row.overrides,
            )
            if not same or other.kind != "train":
                fail(f"rows.{name}.controls must name a train row with the same recipe, teacher "
                     f"and overrides; {row.controls!r} is not one")  # fmt: skip
    report = grid.report
    for key in ("heads_row", "per_class_row", "checkpoints_row"):
        row = getattr(report, key)
        if row is not None and row not in grid.rows:
            fail(f"report.{key} names {row!r}, which is not a row")
    if report.select and report.select.kept is not None:
        if report.select.kept not in grid.rows:
            fail(f"report.select.kept names {report.select.kept!r}, which is not a row")
        if not report.select.why:
            fail(
                "report.select.kept needs report.select.why: the reason the first-ranked row "
                "is not the one kept"
            )
    sides = [s for c in grid.claims for s in (c.better, c.worse)]
    sides += [Side(h.runs, h.head) for h in report.headline]
    for side in sides:
        if side.runs.startswith("teacher "):
            if side.runs.split(" ", 1)[1] not in grid.teachers:
                fail(f"{side.runs!r} names no teacher of this grid")
        elif side.runs not in grid.rows:
            fail(f"claim or headline side {side.runs!r} is not a row")
    for name, row in grid.rows.items():
        if row.section and report.sections and row.section not in report.sections:
            fail(f"rows.{name}.section {row.section!r} is not in report.sections")
        figures = row.paper.figures if row.paper else ()
        if figures and len(figures) != len(report.paper_columns):
            fail(f"rows.{name}.paper has {len(figures)} figures for the report's "
                 f"{len(report.paper_columns)} paper_columns")  # fmt: skip


def as_tree(grid: Grid) -> dict[str, Any]:
    """The grid as plain data (for the results file that records what was run)."""
    import dataclasses

    try:
        where = grid.path.relative_to(Path.cwd())
    except ValueError:
        where = grid.path
    return {
        "name": grid.name,
        "path": str(where),
        **{k: v for k, v in dataclasses.asdict(grid).items() if k not in ("name", "path")},
    }
