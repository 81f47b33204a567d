"""The paper's ablations (DeiT-LT, Tables 5 and 6) on the embedded dataset digits-lt, over seeds.

    .venv/bin/python scripts/paper_tables.py --out runs/paper-tables --seeds 0 1 2 \\
        [--rows vit ood ...] [--epochs N] [--teacher-epochs N] [--set K=V ...] [--teacher-set K=V ...]

Every run is a `deitlt` command, as a user would type it (`data prepare`, `teacher train`,
`train`, with dotted overrides); ROWS below lists them. Each teacher kind is trained once per
seed and seed s's teacher teaches the seed-s students, so the spread over seeds includes the
teacher's. Resumable: a run whose final evaluation exists is skipped; an interrupted one is run
again with the same run directory, and the trainer resumes from its newest checkpoint. SIGTERM
is passed on to the running `deitlt` (it checkpoints and stops); run the same command again.

Writes into --out: tables.md and tables.csv (mean and sample standard deviation over seeds of
Overall/Head/Mid/Tail, paper groups, in percent, beside the paper's published figures; then the
paper's claims checked seed by seed (CLAIMS) and, for row deitlt, the head fusion sweep and
calibration of `deitlt eval`), rows.md (the exact commands of every run), summary.md (one
paragraph for the README), plots/*.png, and per run ``paper_tables.json`` (its overrides, wall
and CPU seconds of every attempt), from which the budget line is summed. ``--publish docs``
makes docs/results.md from tables.md and puts the summary between the README's markers.

``--epochs``/``--teacher-epochs`` shorten the recipes and scale their epoch-denominated schedule
(warm-up, DRW start, step milestones) in proportion; ``--set``/``--teacher-set`` add overrides to
every student / teacher run (the test suite shrinks the grid with them). The environment is
passed on: on a CPU shared with other jobs, OMP_NUM_THREADS=1 keeps torch's threads from
oversubscribing the cores.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from deitlt_scale.analysis.accuracy import group_bands
from deitlt_scale.analysis.aggregate import Aggregate, aggregate
from deitlt_scale.analysis.claims import Claim, Side, Verdict, check, claims_markdown
from deitlt_scale.analysis.plots import plot_group_bars, plot_per_class, save_figure
from deitlt_scale.config import load as load_config
from deitlt_scale.config import resolve_steps
from deitlt_scale.data.longtail import GROUP_NAMES
from deitlt_scale.data.meta import load as load_meta

REPO = Path(__file__).resolve().parent.parent
STUDENT_RECIPE = "recipes/tiny_digits.yaml"
TEACHER_RECIPE = "recipes/teacher_digits.yaml"
PACO_RECIPE = "recipes/teacher_paco_digits.yaml"
TIMING_FILE = "paper_tables.json"  # per run: overrides and the wall/CPU seconds of each attempt
EXIT_REQUEUE = 75  # the trainer's "stopped after a checkpoint, run again"
COLUMNS = ("overall", *GROUP_NAMES)


@dataclass(frozen=True)
class PaperFigure:
    """A published figure (percent) of the paper, with where it is printed."""

    source: str  # e.g. "Table 5, row 2"
    c10: tuple[float, ...]  # CIFAR-10-LT rho=100: (overall,) or (overall, head, mid, tail)
    c100: tuple[float, ...]  # CIFAR-100-LT rho=100, same layout
    note: str = ""


@dataclass(frozen=True)
class Teacher:
    """One kind of teacher: a recipe and its overrides, trained once per seed."""

    name: str
    recipe: str
    overrides: tuple[str, ...]
    label: str
    note: str = ""
    paper: PaperFigure | None = None


@dataclass(frozen=True)
class Row:
    """One row of a paper table: the student recipe, its overrides and its teacher kind."""

    name: str
    table: int  # 5 or 6
    label: str
    teacher: str | None  # a key of TEACHERS
    overrides: tuple[str, ...]
    paper: PaperFigure | None
    note: str = ""
    reuses: str | None = None  # another row's runs (Table 6's Ti is row 5: trained once)

    @property
    def distilled(self) -> bool:
        return self.teacher is not None


def _strong_augment() -> tuple[str, ...]:
    """The student recipe's strong augmentation as teacher overrides (RandAugment, random
    erasing, crop scale), read from the recipe so the two cannot drift apart."""
    aug = yaml.safe_load((REPO / STUDENT_RECIPE).read_text())["data"]["augment"]
    lo, hi = aug["scale"]
    return (
        f"data.augment.randaugment_ops={aug['randaugment_ops']}",
        f"data.augment.randaugment_magnitude={aug['randaugment_magnitude']}",
        f"data.augment.random_erasing={aug['random_erasing']}",
        f"data.augment.scale=[{lo},{hi}]",
    )


PLAIN_CE = ("distill.teacher_loss=ce", "optim.sam_rho=0", "distill.drw_epoch=null")
NO_DRW = ("distill.drw_epoch=null",)

TEACHERS: dict[str, Teacher] = {
    "ce_strong": Teacher(
        "ce_strong",
        TEACHER_RECIPE,
        PLAIN_CE + _strong_augment(),
        "ResNet-32, plain CE, the student's strong augmentation, no SAM",
        "the student's augmentation except mixup/cutmix: teacher recipes refuse mixing "
        "(their losses take hard labels), the one difference from the student's stream",
    ),
    "ce_weak": Teacher(
        "ce_weak",
        TEACHER_RECIPE,
        PLAIN_CE,
        "ResNet-32, plain CE, weak augmentation (the teacher recipe's), no SAM",
    ),
    "ldam_drw_sam": Teacher(
        "ldam_drw_sam",
        TEACHER_RECIPE,
        (),
        "ResNet-32, LDAM-DRW + SAM (the teacher recipe)",
        paper=PaperFigure("Table 2, L-D-SAM (ResNet-32)", (81.9,), (45.4,)),
    ),
    "paco_sam": Teacher(
        "paco_sam",
        PACO_RECIPE,
        (),
        "ResNet-32, PaCo + SAM",
        paper=PaperFigure("Table 2, PaCo+SAM (ResNet-32)", (86.8,), (52.8,)),
    ),
}

# What `distill.drw_epoch=null` switches off besides the DRW weights of the DIST loss.
NO_DRW_NOTE = (
    "no DRW: distill.drw_epoch=null, which also drops the recipe's mixup-free last epochs "
    "(distill.no_mixup_drw acts in the DRW phase only)"
)
ROWS: dict[str, Row] = {
    r.name: r
    for r in (
        Row(
            "vit", 5, "ViT (no DIST token, no teacher, CE without DRW)", None,
            ("distill.type=none", "model.distilled=false", "teacher.path=", *NO_DRW),
            PaperFigure("Table 2, ViT (ViT-B)", (62.6,), (35.0,)),
            "distill.drw_epoch=null: without it the ViT's CLS loss would be DRW-weighted "
            "in the recipe's last epochs (losses.py, no-teacher models)",
        ),
        Row(
            "deit_indist", 5, "DeiT: in-distribution hard distillation, no DRW", "ce_strong",
            NO_DRW,
            PaperFigure("Table 5, row 1 (no OOD, no DRW, no SAM)", (70.2,), (31.3,),
                        "the paper's DeiT row uses a RegNetY-16GF teacher (Table 2)"),
            NO_DRW_NOTE,
        ),
        Row(
            "ood", 5, "+ OOD distillation (weakly augmented CE teacher), no DRW", "ce_weak",
            NO_DRW, PaperFigure("Table 5, row 2 (OOD)", (84.5,), (48.9,)), NO_DRW_NOTE,
        ),
        Row(
            "ood_drw", 5, "+ DRW on the DIST loss", "ce_weak", (),
            PaperFigure("Table 5, row 3 (OOD + DRW)", (87.3,), (54.5,)),
        ),
        Row(
            "deitlt", 5, "+ SAM teacher (LDAM-DRW + SAM): DeiT-LT", "ldam_drw_sam", (),
            PaperFigure("Table 2, DeiT-LT with the L-D-SAM teacher (1)", (84.8,), (52.0,),
                        "Table 5's last row (87.5 / 55.6) is the PaCo+SAM teacher's, row deitlt_paco"),
        ),
        Row(
            "deitlt_paco", 5, "DeiT-LT with the PaCo + SAM teacher", "paco_sam", (),
            PaperFigure("Table 5, row 4 = Table 2, DeiT-LT with the PaCo+SAM teacher (2)",
                        (87.5,), (55.6,)),
        ),
        Row(
            "deitlt_ti", 6, "DeiT-LT, Ti-like student (width 128, depth 4, 4 heads)",
            "ldam_drw_sam", (),
            PaperFigure("Table 6, DeiT-LT Ti", (80.8, 89.7, 75.1, 79.4), (49.3, 66.3, 50.0, 27.3),
                        "the paper's Table 6 distils from a PaCo teacher"),
            "the recipe's student: the runs of row deitlt, not trained twice",
            reuses="deitlt",
        ),
        Row(
            "deitlt_s", 6, "DeiT-LT, S-like student (width 192, depth 6, 6 heads)", "ldam_drw_sam",
            ("model.embed_dim=192", "model.depth=6", "model.num_heads=6"),
            PaperFigure("Table 6, DeiT-LT S", (85.5, 92.7, 81.5, 83.7), (54.3, 72.6, 54.8, 31.1),
                        "the paper's Table 6 distils from a PaCo teacher"),
        ),
        Row(
            "deitlt_b", 6, "DeiT-LT, B-like student (width 256, depth 8, 8 heads)", "ldam_drw_sam",
            ("model.embed_dim=256", "model.depth=8", "model.num_heads=8"),
            PaperFigure("Table 6, DeiT-LT B", (87.5, 94.5, 84.1, 85.0), (55.6, 73.1, 56.9, 32.1),
                        "the paper's Table 6 distils from a PaCo teacher"),
        ),
    )
}  # fmt: skip


def group_key(head: str, group: str) -> str:
    return f"{head}/overall" if group == "overall" else f"{head}/paper/{group}"


def _side(runs: str, head: str, group: str) -> Side:
    """The ``group`` accuracy of ``head`` in the runs of row (or "teacher NAME") ``runs``."""
    if head == "teacher":  # runs == "teacher NAME"
        return Side(
            runs, group_key(head, group), f"{runs.split()[1]} teacher, {group.capitalize()}"
        )
    name = {"cls": "CLS", "dist": "DIST", "mean": "mean"}[head]
    return Side(runs, group_key(head, group), f"{runs} {name}, {group.capitalize()}")


# The paper's claims that the rows above can test; each compares two measurements seed by seed.
CLAIMS: tuple[Claim, ...] = (
    Claim("OOD distillation beats in-distribution distillation", "Table 5, rows 1-2",
          _side("ood", "mean", "overall"), _side("deit_indist", "mean", "overall")),
    Claim("DRW on the DIST loss raises accuracy", "Table 5, rows 2-3",
          _side("ood_drw", "mean", "overall"), _side("ood", "mean", "overall")),
    Claim("DRW on the DIST loss raises the tail", "Section 3.1, Tail Expert with DRW loss",
          _side("ood_drw", "dist", "tail"), _side("ood", "dist", "tail")),
    Claim("a SAM teacher (here LDAM-DRW + SAM, against plain CE) gives a better student",
          "Table 5, rows 3-4; Section 3.2",
          _side("deitlt", "mean", "overall"), _side("ood_drw", "mean", "overall")),
    Claim("a PaCo + SAM teacher gives a better student than LDAM-DRW + SAM", "Table 2",
          _side("deitlt_paco", "mean", "overall"), _side("deitlt", "mean", "overall")),
    Claim("DeiT-LT beats the ViT trained alone", "Table 2",
          _side("deitlt", "mean", "overall"), _side("vit", "cls", "overall")),
    Claim("the DIST head is the tail expert", "Sections 3.1 and 6",
          _side("deitlt", "dist", "tail"), _side("deitlt", "cls", "tail")),
    Claim("the CLS head is the head expert", "Sections 3.1 and 6",
          _side("deitlt", "cls", "head"), _side("deitlt", "dist", "head")),
    Claim("averaging the two experts beats the CLS head", "Sections 2, 3 and 6",
          _side("deitlt", "mean", "overall"), _side("deitlt", "cls", "overall")),
    Claim("averaging the two experts beats the DIST head", "Sections 2, 3 and 6",
          _side("deitlt", "mean", "overall"), _side("deitlt", "dist", "overall")),
    Claim("an S-sized student beats a Ti-sized one", "Table 6",
          _side("deitlt_s", "mean", "overall"), _side("deitlt_ti", "mean", "overall")),
    Claim("a B-sized student beats an S-sized one", "Table 6",
          _side("deitlt_b", "mean", "overall"), _side("deitlt_s", "mean", "overall")),
    Claim("the LDAM-DRW + SAM teacher is better on the tail than plain CE", "Table 2 (teachers)",
          _side("teacher ldam_drw_sam", "teacher", "tail"),
          _side("teacher ce_weak", "teacher", "tail")),
    Claim("the PaCo + SAM teacher beats the LDAM-DRW + SAM teacher", "Table 2 (teachers)",
          _side("teacher paco_sam", "teacher", "overall"),
          _side("teacher ldam_drw_sam", "teacher", "overall")),
)  # fmt: skip


# ------------------------------------------------------------------------------------ runs


def scaled_schedule(recipe: str, epochs: int | None) -> list[str]:
    """Overrides that shorten ``recipe`` to ``epochs`` keeping the schedule's proportions:
    warm-up, DRW start (an int epoch, at most ``epochs - 1``) and step milestones scale by
    ``epochs / recipe epochs``. Nothing when ``epochs`` is None."""
    if epochs is None:
        return []
    tree = yaml.safe_load((REPO / recipe).read_text())
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


def last_wins(overrides: Sequence[str]) -> list[str]:
    """``overrides`` without those a later one of the same key replaces (the config loader
    applies them in order, so the result configures the same run, stated once per key)."""
    last = {item.split("=", 1)[0]: i for i, item in enumerate(overrides)}
    return [item for i, item in enumerate(overrides) if last[item.split("=", 1)[0]] == i]


@dataclass
class Run:
    """One `deitlt` invocation that trains into ``run_dir``."""

    kind: str  # "teacher" or a row name
    seed: int
    verb: tuple[str, ...]  # ("teacher", "train") or ("train",)
    recipe: str
    overrides: list[str]
    run_dir: Path

    @property
    def args(self) -> list[str]:
        return [*self.verb, self.recipe, *self.overrides]

    def is_complete(self) -> bool:
        """The final evaluation exists (eval/latest.json at the run's last step) and, for a
        teacher, the teacher file it hands on."""
        latest = self.run_dir / "eval" / "latest.json"
        if not latest.is_file():
            return False
        if self.verb[0] == "teacher" and not (self.run_dir / "teacher").is_dir():
            return False
        cfg = load_config(REPO / self.recipe, self.overrides)
        meta = load_meta(cfg.data.shards)
        total = resolve_steps(cfg, meta.num_samples("train"), 1).total
        return json.loads(latest.read_text())["step"] >= total


def teacher_run(
    out: Path, data: Path, teacher: Teacher, seed: int, args: argparse.Namespace
) -> Run:
    overrides = last_wins(
        [
            f"data.shards={data}",
            f"runtime.run_dir={out / 'teachers' / f'{teacher.name}-seed{seed}'}",
            f"train.seed={seed}",
            *scaled_schedule(teacher.recipe, args.teacher_epochs),
            *teacher.overrides,
            *args.teacher_set,
        ]
    )
    return Run("teacher " + teacher.name, seed, ("teacher", "train"), teacher.recipe, overrides,
               out / "teachers" / f"{teacher.name}-seed{seed}")  # fmt: skip


def student_run(out: Path, data: Path, row: Row, seed: int, args: argparse.Namespace) -> Run:
    run_dir = out / "students" / f"{row.name}-seed{seed}"
    teacher = (
        [f"teacher.path={out / 'teachers' / f'{row.teacher}-seed{seed}' / 'teacher'}"]
        if row.teacher
        else []
    )
    overrides = last_wins(
        [
            f"data.shards={data}",
            f"runtime.run_dir={run_dir}",
            f"train.seed={seed}",
            *scaled_schedule(STUDENT_RECIPE, args.epochs),
            *teacher,
            *row.overrides,
            *args.set,
        ]
    )
    return Run(row.name, seed, ("train",), STUDENT_RECIPE, overrides, run_dir)


class Interrupted(Exception):
    """SIGTERM or Ctrl-C arrived; the running `deitlt` was told to checkpoint and stop."""


_child: subprocess.Popen | None = None
_stop = False


def _on_signal(signum: int, _frame: object) -> None:
    global _stop
    _stop = True
    if _child is not None and _child.poll() is None:
        _child.send_signal(signal.SIGTERM)  # the trainer checkpoints, then exits 75


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def deitlt(args: Sequence[object], log: Path) -> tuple[int, float, float]:
    """Run ``deitlt ARGS`` (output appended to ``log``); returns (exit status, wall seconds,
    CPU seconds of the process and the children it waited for)."""
    global _child
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deitlt_scale.cli", *map(str, args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cpu0, t0 = _cpu_children(), time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ deitlt {shlex.join(map(str, args))}\n")
        f.flush()
        _child = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        while True:
            try:
                code = _child.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C: the child got SIGINT too; let it stop cleanly
                _on_signal(signal.SIGINT, None)
        _child = None
    return code, time.perf_counter() - t0, _cpu_children() - cpu0


def _read_timing(run: Run) -> dict:
    path = run.run_dir / TIMING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def execute(run: Run, label: str) -> None:
    """Train ``run`` unless it is complete; print one progress line; record the attempt."""
    timing = _read_timing(run)
    if timing and timing.get("overrides") != run.overrides:
        raise SystemExit(
            f"paper_tables: error: {run.run_dir} was trained with other overrides "
            f"({shlex.join(timing['overrides'])}); use another --out or delete that directory"
        )
    if _stop:  # a signal between two runs: start no new one
        raise Interrupted
    if run.is_complete():
        print(
            f"{label}: skipped (complete), {timing.get('wall_s', 0.0):.0f} s recorded", flush=True
        )
        return
    code, wall, cpu = deitlt(run.args, run.run_dir.parent / f"{run.run_dir.name}.log")
    timing.setdefault("command", ["deitlt", *run.args])
    timing.setdefault("overrides", run.overrides)
    attempts = timing.setdefault("attempts", [])
    attempts.append({"exit": code, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                     "ended": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})  # fmt: skip
    timing["wall_s"] = round(sum(a["wall_s"] for a in attempts), 2)
    timing["cpu_s"] = round(sum(a["cpu_s"] for a in attempts), 2)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run.run_dir / f".{TIMING_FILE}.partial"
    tmp.write_text(json.dumps(timing, indent=1) + "\n")
    tmp.replace(run.run_dir / TIMING_FILE)
    if _stop or code == EXIT_REQUEUE:
        print(f"{label}: stopped after {wall:.0f} s (exit {code})", flush=True)
        raise Interrupted
    if code != 0:
        log = run.run_dir.parent / f"{run.run_dir.name}.log"
        raise SystemExit(f"paper_tables: error: {label} failed (exit {code}); see {log}")
    print(f"{label}: done in {wall:.0f} s ({cpu:.0f} CPU s)", flush=True)


# --------------------------------------------------------------------------------- results


def metrics(run: Run) -> dict[str, float]:
    return json.loads((run.run_dir / "eval" / "latest.json").read_text())["metrics"]


def head_of(row: Row) -> tuple[str, ...]:
    """The heads a row reports: CLS, DIST and their mean for distilled rows, CLS for the ViT."""
    return ("cls", "dist", "mean") if row.distilled else ("cls",)


def _pct(a: Aggregate | None) -> tuple[float, float]:
    """(mean, std) in percent; std NaN with one seed."""
    if a is None:
        return math.nan, math.nan
    return 100 * a.mean, 100 * a.std


def _cell(a: Aggregate | None) -> str:
    mean, std = _pct(a)
    if math.isnan(mean):
        return "-"
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def _paper(p: PaperFigure | None) -> tuple[str, str]:
    if p is None:
        return "-", "-"
    return " / ".join(f"{v:.1f}" for v in p.c10), " / ".join(f"{v:.1f}" for v in p.c100)


def write_tables(
    out: Path,
    rows: Sequence[Row],
    students: Mapping[str, dict[str, Aggregate]],
    teachers: Mapping[str, dict[str, Aggregate]],
    seeds: Sequence[int],
    budget: str,
    claims: str,
    heads_section: str,
    provenance: Sequence[str],
) -> None:
    head_label = {"cls": "CLS", "dist": "DIST", "mean": "mean of logits"}
    md = [
        "# DeiT-LT ablations on digits-lt (paper Tables 5 and 6)",
        "",
        *provenance,
        "",
        f"Top-1 accuracy (%) on the balanced eval split, paper groups (head = classes 0-2, "
        f"mid = 3-6, tail = 7-9), mean ± sample standard deviation over seeds "
        f"{' '.join(map(str, seeds))}. Paper columns: the paper's published figures on "
        "CIFAR-10-LT and CIFAR-100-LT (rho = 100), Overall, or Overall / Head / Mid / Tail "
        "(Table 6), beside the head the paper reports (the mean of logits; CLS for the ViT); "
        "they are other datasets, students and budgets, shown for the direction of each effect.",
        "",
        budget,
        "",
    ]
    rows_csv: list[list[object]] = []
    for table in (5, 6):
        chosen = [r for r in rows if r.table == table]
        if not chosen:
            continue
        md += [f"## Table {table}", "",
               "| row | head | Overall | Head | Mid | Tail | paper C10-LT | paper C100-LT |",
               "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in chosen:
            agg = students[row.reuses or row.name]
            heads = head_of(row)
            for head in heads:
                shown = head == heads[-1]  # the paper reports the averaged (or only) head
                c10, c100 = _paper(row.paper) if shown else ("", "")
                cells = [_cell(agg.get(group_key(head, g))) for g in COLUMNS]
                md.append(
                    f"| {row.name} | {head_label[head]} | {' | '.join(cells)} | {c10} | {c100} |"
                )
                n = max((a.n for a in agg.values()), default=0)
                values = [v for g in COLUMNS for v in _pct(agg.get(group_key(head, g)))]
                rows_csv.append([table, row.name, head, n, *values, c10, c100,
                                 row.paper.source if row.paper and shown else ""])  # fmt: skip
        md.append("")
        for row in chosen:
            notes = [row.label]
            if row.note:
                notes.append(row.note)
            if row.paper:
                notes.append(
                    f"paper: {row.paper.source}"
                    + (f" ({row.paper.note})" if row.paper.note else "")
                )
            md.append(f"* `{row.name}`: " + "; ".join(notes))
        md.append("")
    md += ["## Teachers (ResNet-32)", "",
           "| teacher | Overall | Head | Mid | Tail | paper C10-LT | paper C100-LT |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, agg in teachers.items():
        teacher = TEACHERS[name]
        cells = [_cell(agg.get(group_key("teacher", g))) for g in COLUMNS]
        c10, c100 = _paper(teacher.paper)
        md.append(f"| {name}: {teacher.label} | {' | '.join(cells)} | {c10} | {c100} |")
        n = max((a.n for a in agg.values()), default=0)
        values = [v for g in COLUMNS for v in _pct(agg.get(group_key("teacher", g)))]
        source = teacher.paper.source if teacher.paper else ""
        rows_csv.append(["teacher", name, "teacher", n, *values, c10, c100, source])
    md.append("")
    md += [f"* `{name}`: {TEACHERS[name].note}" for name in teachers if TEACHERS[name].note]
    if claims:
        md += ["", "## The paper's claims at this scale", "",
               "Each claim compares two measurements seed by seed (same seed, same teacher "
               "seed): the difference is better minus worse in percentage points, mean ± sample "
               "standard deviation of the per-seed differences; a claim holds when every seed "
               "agrees, fails when none does, and is mixed otherwise.", "", claims]  # fmt: skip
    if heads_section:
        md += ["", f"## The two heads of row {HEADS_ROW} and their average", "",
               "`deitlt eval --tag latest --fusion-weight --calibration` of each seed's final "
               "checkpoint (the test split: digits-lt has no val split, so no weight is chosen "
               "on held-out data and none is applied above). Accuracy of the fused logits "
               "w * CLS + (1 - w) * DIST, and each head's calibration, mean ± sample std over "
               "seeds.", "", heads_section]  # fmt: skip
    md += ["", "![Overall/Head/Mid/Tail per row](plots/rows.png)", ""]
    if "deitlt" in students:
        md += ["![Per-class accuracy of row deitlt](plots/deitlt_per_class.png)", ""]
    (out / "tables.md").write_text("\n".join(md))
    header = ["table", "row", "head", "seeds"]
    header += [f"{g}_{s}" for g in COLUMNS for s in ("mean", "std")]
    header += ["paper_c10lt", "paper_c100lt", "paper_source"]
    with open(out / "tables.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows_csv:
            writer.writerow(["" if isinstance(v, float) and math.isnan(v) else
                             (f"{v:.2f}" if isinstance(v, float) else v) for v in r])  # fmt: skip


def write_rows(
    out: Path, rows: Sequence[Row], runs: Mapping[str, list[Run]], teachers: Sequence[str]
) -> None:
    md = ["# The runs of tables.md", "",
          "`deitlt` is `python -m deitlt_scale.cli`; run from the repository root. Each command "
          "resumes its run directory when re-run.", ""]  # fmt: skip
    md += [
        "## Data",
        "",
        "```bash",
        f"deitlt data prepare digits-lt --out {out / 'digits-lt'}",
        "```",
        "",
    ]
    md += ["## Teachers", ""]
    for name in teachers:
        t = TEACHERS[name]
        md += [f"### {name}: {t.label}", ""]
        if t.note:
            md += [f"Note: {t.note}.", ""]
        md += [f"Overrides of `{t.recipe}`: `{' '.join(t.overrides) or '(none)'}`", "", "```bash"]
        md += [shlex.join(["deitlt", *r.args]) for r in runs[f"teacher {name}"]]
        md += ["```", ""]
    md += ["## Students", ""]
    for row in rows:
        md += [f"### {row.name} (Table {row.table}): {row.label}", ""]
        if row.note:
            md += [f"Note: {row.note}.", ""]
        if row.reuses:
            md += [f"The runs of row `{row.reuses}`:", "", "```bash"]
            md += [shlex.join(["deitlt", *r.args]) for r in runs[row.reuses]]
            md += ["```", ""]
            continue
        teacher = f"teacher `{row.teacher}`" if row.teacher else "no teacher"
        md += [
            f"Overrides of `{STUDENT_RECIPE}`: `{' '.join(row.overrides) or '(none)'}`, {teacher}",
            "",
            "```bash",
        ]
        md += [shlex.join(["deitlt", *r.args]) for r in runs[row.name]]
        md += ["```", ""]
    (out / "rows.md").write_text("\n".join(md))


HEADS_ROW = "deitlt"  # the row whose two heads are weighed against each other
HEADS_DIR = "eval-heads"  # per run: `deitlt eval --fusion-weight --calibration` of its last step


def analyse_heads(run: Run) -> Path:
    """The head fusion sweep and calibration of ``run``'s final checkpoint, as a user gets
    them from `deitlt eval`; run once (kept in RUN_DIR/eval-heads). Returns the posthoc dir."""
    out = run.run_dir / HEADS_DIR
    posthoc = out / "posthoc"
    if not (posthoc / "posthoc.json").is_file():
        args = ["eval", run.run_dir, "--tag", "latest", "--fusion-weight", "--calibration",
                "--out", out]  # fmt: skip
        log = run.run_dir.parent / f"{run.run_dir.name}.log"
        code, _, _ = deitlt(args, log)
        if code != 0:
            raise SystemExit(f"paper_tables: error: deitlt eval of {run.run_dir} failed "
                             f"(exit {code}); see {log}")  # fmt: skip
    return posthoc


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def heads_markdown(posthoc_dirs: Sequence[Path]) -> str:
    """Row ``HEADS_ROW``'s heads weighed against each other, over its seeds: the accuracy of
    w * CLS + (1 - w) * DIST logits for every w, and each head's calibration."""
    sweeps = [
        [r for r in _read_csv(d / "fusion.csv") if r["split"] == "test"] for d in posthoc_dirs
    ]
    calib = [[r for r in _read_csv(d / "calibration.csv") if r["split"] == "test"]
             for d in posthoc_dirs]  # fmt: skip
    named = {0.0: "DIST alone", 0.5: "the paper's mean of logits", 1.0: "CLS alone"}
    lines = ["| w (CLS weight) | Overall | Head | Mid | Tail | |", "|---|---|---|---|---|---|"]
    best: list[float] = []
    for i, first in enumerate(sweeps[0]):
        w = float(first["weight"])
        cells = [_cell(aggregate([{g: float(s[i][g])} for s in sweeps])[g]) for g in COLUMNS]
        lines.append(f"| {w:.1f} | {' | '.join(cells)} | {named.get(round(w, 1), '')} |")
    for sweep in sweeps:
        best.append(float(max(sweep, key=lambda r: float(r["overall"]))["weight"]))
    lines += ["", "| head | accuracy | confidence | ECE (15 bins) | NLL (nats) |",
              "|---|---|---|---|---|"]  # fmt: skip
    for j, first in enumerate(calib[0]):
        agg = aggregate([{k: float(c[j][k]) for k in ("accuracy", "confidence", "ece")}
                         for c in calib])  # fmt: skip
        nll = aggregate([{"nll": float(c[j]["nll"])} for c in calib])["nll"]
        nll_cell = f"{nll.mean:.2f}" + ("" if math.isnan(nll.std) else f" ± {nll.std:.2f}")
        lines.append(f"| {first['predictor']} | {_cell(agg['accuracy'])} | "
                     f"{_cell(agg['confidence'])} | {_cell(agg['ece'])} | {nll_cell} |")  # fmt: skip

    def tail_at(w: float) -> str:
        values = [{"tail": float(next(r for r in sw if float(r["weight"]) == w)["tail"])}
                  for sw in sweeps]  # fmt: skip
        return _cell(aggregate(values)["tail"])

    tail = {w: tail_at(w) for w in (0.0, 0.5, 1.0)}
    lines += ["", "The w with the best overall accuracy, per seed: "
              + ", ".join(f"{w:.1f}" for w in best) + f". On the tail classes the mean of "
              f"logits scores {tail[0.5]}, between the DIST head's {tail[0.0]} and the CLS "
              f"head's {tail[1.0]}."]  # fmt: skip
    return "\n".join(lines)


def write_plots(out: Path, rows: Sequence[Row], students: Mapping[str, dict[str, Aggregate]],
                per_class_runs: Sequence[Run], data: Path) -> list[Path]:  # fmt: skip
    """``plots/rows.png`` (each row's reported head, paper groups, error bars = sample std) and,
    when ``per_class_runs`` (the seeds of one distilled row) are given,
    ``plots/{row}_per_class.png``: per-class accuracy of CLS, DIST and the mean, over seeds."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    bars: dict[str, dict[str, tuple[float, float]]] = {}
    for row in rows:
        agg, head = students[row.reuses or row.name], head_of(row)[-1]
        bars[f"{row.name} ({head})"] = {g: _pct(agg.get(group_key(head, g))) for g in COLUMNS}
    written = [plots / "rows.png"]
    save_figure(plot_group_bars(bars, "Paper groups, mean ± sample std over seeds"), written[0])
    if per_class_runs:
        meta = load_meta(data)
        accs: dict[str, list[np.ndarray]] = {"cls": [], "dist": [], "mean": []}
        for run in per_class_runs:
            with open(run.run_dir / "eval" / "per_class_latest.csv") as f:
                table = list(csv.DictReader(f))
            for head in accs:
                accs[head].append(np.array([float(r[f"acc_{head}"] or "nan") for r in table]))
        mean_acc = {h: np.nanmean(np.stack(v), axis=0) for h, v in accs.items()}
        bands = group_bands(meta.train_counts, meta.groups["paper"])
        fig = plot_per_class(meta.train_counts, mean_acc, bands, GROUP_NAMES)
        name = per_class_runs[0].kind
        fig.axes[0].set_title(f"Row {name}, mean over {len(per_class_runs)} seed(s)")
        written.append(plots / f"{name}_per_class.png")
        save_figure(fig, written[-1])
    return written


def provenance(argv: Sequence[str], runs: Sequence[Run]) -> list[str]:
    """Lines naming the command, the machine, the packages and the dates the runs ended."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor() or "unknown CPU")  # fmt: skip
    versions = ", ".join(f"{name} {_version(name)}" for name in ("torch", "deepspeed", "timm"))
    ended = sorted(a["ended"][:10] for r in runs for a in _read_timing(r).get("attempts", []))
    dates = (
        f"{ended[0]} to {ended[-1]}" if ended and ended[0] != ended[-1] else ", ".join(ended[:1])
    )
    return [
        f"Command: `python scripts/paper_tables.py {shlex.join(argv)}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({cpu}), "
        f"{'CUDA' if _cuda() else 'no GPU'}; {versions}, DALI {_dali_version()}. "
        f"Runs ended {dates or 'never'} (UTC).",
    ]


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _dali_version() -> str:
    dali = [d for d in importlib.metadata.distributions()
            if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")]  # fmt: skip
    return dali[0].version if dali else "not installed"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


SUMMARY_START = "<!-- paper-tables summary: written by scripts/paper_tables.py --publish -->"
SUMMARY_END = "<!-- end of paper-tables summary -->"


def summary(students: Mapping[str, dict[str, Aggregate]], verdicts: Sequence[Verdict],
            seeds: Sequence[int]) -> str:  # fmt: skip
    """One paragraph for the README: DeiT-LT against the ViT, and how many claims hold."""
    parts = [f"On digits-lt over {len(seeds)} seed(s)"]
    if "deitlt" in students and "vit" in students:
        parts.append(
            f", DeiT-LT's averaged prediction scores {_cell(students['deitlt'].get('mean/overall'))} "
            f"overall against {_cell(students['vit'].get('cls/overall'))} for the ViT trained "
            f"alone (tail: {_cell(students['deitlt'].get('mean/paper/tail'))} against "
            f"{_cell(students['vit'].get('cls/paper/tail'))})"
        )
    held = sum(v.outcome.startswith("holds") for v in verdicts)
    parts.append(f"; {held} of the paper's {len(verdicts)} claims tested hold on every seed.")
    return "".join(parts)


def publish(out: Path, docs: Path) -> list[Path]:
    """``docs/results.md`` from ``out/tables.md`` (its plots copied to ``docs/img/paper-tables``
    and the links pointed there) and, where ``docs/../README.md`` holds the summary markers,
    the summary between them; returns the files written."""
    images = docs / "img" / "paper-tables"
    images.mkdir(parents=True, exist_ok=True)
    for plot in sorted((out / "plots").glob("*.png")):
        shutil.copyfile(plot, images / plot.name)
    page = (out / "tables.md").read_text().replace("](plots/", "](img/paper-tables/")
    written = [_replace_file(docs / "results.md", page)]
    readme = docs.parent / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    if SUMMARY_START in text and SUMMARY_END in text:
        head, rest = text.split(SUMMARY_START, 1)
        _, tail = rest.split(SUMMARY_END, 1)
        block = (out / "summary.md").read_text().strip()
        written.append(
            _replace_file(readme, f"{head}{SUMMARY_START}\n{block}\n{SUMMARY_END}{tail}")
        )
    return written


def _replace_file(target: Path, text: str) -> Path:
    tmp = target.with_name(f".{target.name}.partial")
    tmp.write_text(text)
    tmp.replace(target)
    return target


# ------------------------------------------------------------------------------------ main


def check_recipes(rows: Sequence[Row], teachers: Sequence[str], root: Path = REPO) -> None:
    """Exit with one line naming the first teacher recipe under ``root`` that does not exist,
    and the selected rows that need it, before anything is trained."""
    for name in teachers:
        if not (root / TEACHERS[name].recipe).is_file():
            users = ", ".join(r.name for r in rows if r.teacher == name)
            raise SystemExit(
                f"paper_tables: error: row(s) {users} need the teacher recipe "
                f"{TEACHERS[name].recipe}, which does not exist; leave them out of --rows"
            )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "paper-tables")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS),
                        help="rows to run and report (default: all)")  # fmt: skip
    parser.add_argument(
        "--epochs", type=int, default=None, help="student epochs (recipe's default)"
    )
    parser.add_argument(
        "--teacher-epochs", type=int, default=None, help="teacher epochs (recipe's)"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="K=V",
                        help="overrides added to every student run, after the row's")  # fmt: skip
    parser.add_argument("--teacher-set", nargs="*", default=[], metavar="K=V",
                        help="overrides added to every teacher run, after the kind's")  # fmt: skip
    parser.add_argument("--publish", type=Path, default=None, metavar="DOCS",
                        help="also write DOCS/results.md and DOCS/img/paper-tables/ from the "
                        "tables (the repository's docs/ when publishing a full grid)")  # fmt: skip
    args = parser.parse_args(argv)
    for flag in ("epochs", "teacher_epochs"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out: Path = args.out.resolve()
    rows = [ROWS[name] for name in ROWS if name in args.rows]  # the tables' order
    trained = {r.reuses or r.name for r in rows}
    student_rows = [ROWS[n] for n in ROWS if n in trained]
    teachers = [t for t in TEACHERS if any(r.teacher == t for r in student_rows)]
    check_recipes(student_rows, teachers)
    signal.signal(signal.SIGTERM, _on_signal)
    data = out / "digits-lt"
    runs: dict[str, list[Run]] = {}
    for name in teachers:
        runs[f"teacher {name}"] = [
            teacher_run(out, data, TEACHERS[name], s, args) for s in args.seeds
        ]
    for row in student_rows:
        runs[row.name] = [student_run(out, data, row, s, args) for s in args.seeds]
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out, rows, runs, teachers)

    total = sum(len(v) for v in runs.values())
    t_start = time.perf_counter()
    try:
        if not (data / "meta.json").is_file():
            code, wall, _ = deitlt(
                ["data", "prepare", "digits-lt", "--out", data], out / "data.log"
            )
            if code != 0:
                raise SystemExit(
                    f"paper_tables: error: data prepare failed (exit {code}); see {out / 'data.log'}"
                )
            print(f"data digits-lt: done in {wall:.0f} s", flush=True)
        i = 0
        for kind, seed_runs in runs.items():
            for run in seed_runs:
                i += 1
                execute(run, f"[{i}/{total}] {kind} seed {run.seed}")
    except Interrupted:
        print("paper_tables: stopped; run the same command again to resume", flush=True)
        return EXIT_REQUEUE

    students = {name: aggregate([metrics(r) for r in runs[name]]) for name in trained}
    teacher_aggs = {
        name: aggregate([metrics(r) for r in runs[f"teacher {name}"]]) for name in teachers
    }
    all_runs = [r for v in runs.values() for r in v]
    cpu = sum(_read_timing(r).get("cpu_s", 0.0) for r in all_runs)
    wall = sum(_read_timing(r).get("wall_s", 0.0) for r in all_runs)
    steps = sorted({json.loads((r.run_dir / "eval" / "latest.json").read_text())["step"]
                    for n in trained for r in runs[n]})  # fmt: skip
    budget = (f"Budget: {'/'.join(map(str, steps))} optimizer steps per student run; "
              f"{len(all_runs)} runs, {cpu:.0f} CPU seconds and {wall:.0f} wall seconds summed "
              "over their recorded attempts (paper_tables.json per run)")  # fmt: skip
    if "deitlt" in trained:
        budget += f"; row deitlt, CLS head on the head classes: {_cell(students['deitlt'].get('cls/paper/head'))}"
    budget += "."
    per_seed = {r.name: [metrics(run) for run in runs[r.reuses or r.name]] for r in rows}
    students_by_row = {r.name: students[r.reuses or r.name] for r in rows}
    per_seed |= {f"teacher {n}": [metrics(r) for r in runs[f"teacher {n}"]] for n in teachers}
    verdicts = check(CLAIMS, per_seed)
    claims = claims_markdown(verdicts, per_seed) if verdicts else ""
    heads_section = ""
    if any(r.name == HEADS_ROW or r.reuses == HEADS_ROW for r in rows):
        heads_section = heads_markdown([analyse_heads(r) for r in runs[HEADS_ROW]])
    write_tables(out, rows, students, teacher_aggs, args.seeds, budget, claims, heads_section,
                 provenance(argv, all_runs))  # fmt: skip
    write_plots(out, rows, students, runs.get("deitlt", []), data)
    (out / "summary.md").write_text(summary(students_by_row, verdicts, args.seeds) + "\n")
    if args.publish:
        for path in publish(out, args.publish):
            print(f"paper_tables: published {path}")
    print(budget)
    print(
        f"paper_tables: {len(all_runs)} runs in {time.perf_counter() - t_start:.0f} s; "
        f"tables in {out / 'tables.md'}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
