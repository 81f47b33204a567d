"""`deitlt experiment`: grid files, plans, the local runner, status and the report.

The end-to-end tests run a shrunk grid for real (every run a `deitlt` process on the embedded
digits: two teachers, a student row, its plain-loop control and a row that starts from the
student's weights, two seeds, a few optimizer steps each), stop it with SIGTERM mid-way, resume
it, and report it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from slurm_cluster import slurm_cluster_fixture  # noqa: F401  (the session's SLURM cluster)

from deitlt_scale.errors import UserError
from deitlt_scale.experiments import grid as grid_mod
from deitlt_scale.experiments import publish as publish_mod
from deitlt_scale.experiments import report as report_mod
from deitlt_scale.experiments.plan import Options, expand, extend
from deitlt_scale.strict import ConfigError

REPO = Path(__file__).resolve().parent.parent
GRIDS = sorted((REPO / "experiments").glob("*.yaml"))
RECIPE = str(REPO / "recipes" / "tiny_digits.yaml")
TEACHER = str(REPO / "recipes" / "teacher_digits.yaml")

# A grid as small as the machinery allows: every kind of row, two teachers, two seeds.
TINY_GRID = {
    "title": "A tiny grid",
    "data": ["digits-lt", "--val-per-class", "all"],
    "seeds": [0, 1],
    "teachers": {
        "ldam": {"recipe": TEACHER, "label": "LDAM"},
        "ce": {"recipe": TEACHER, "overrides": ["distill.teacher_loss=ce", "optim.sam_rho=0"]},
    },
    "rows": {
        "student": {"recipe": RECIPE, "teacher": "ldam", "section": "S", "label": "students"},
        "other": {"recipe": RECIPE, "teacher": "ce", "section": "S"},
        "control": {"recipe": RECIPE, "kind": "control", "controls": "student",
                    "teacher": "ldam", "section": "S"},
        "stage": {"recipe": RECIPE, "teacher": "ldam", "init_from": "student", "section": "T",
                  "overrides": ["train.epochs=1", "schedule.warmup_epochs=0",
                                "distill.drw_epoch=0"]},
        "again": {"reuses": "student", "section": "T"},
    },
    "claims": [{"statement": "the student beats the other", "source": "here",
                "better": {"runs": "student", "head": "mean"},
                "worse": {"runs": "other", "head": "mean"}}],
    "report": {"sections": ["S", "T"], "heads_row": "student", "per_class_row": "student",
               "checkpoints_row": "student", "page": "tiny.md",
               "headline": [{"runs": "student", "head": "mean", "label": "the student"}]},
}  # fmt: skip
SHRINK = [
    "--epochs", "2", "--teacher-epochs", "2",
    "--set", "model.embed_dim=48", "model.depth=2", "train.micro_batch=16",
    "data.epoch_multiple=16", "train.max_steps=60", "checkpoint.every_steps=4",
    "eval.every_epochs=1",
    "tracking.enabled=false", "data.num_threads=1",
    "--teacher-set", "train.max_steps=3", "tracking.enabled=false", "data.num_threads=1",
]  # fmt: skip


def write_grid(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def deitlt(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deitlt_scale.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------
# Grid files


@pytest.mark.parametrize("path", GRIDS, ids=[p.stem for p in GRIDS])
def test_every_grid_file_of_the_project_loads(path: Path) -> None:
    grid = grid_mod.load(path)
    assert grid.rows and grid.seeds
    plan = expand(grid, Path("/nowhere"), Options())
    assert {r.key for r in plan.runs} >= {f"rows/{n}-seed{grid.seeds[0]}" for n in
                                          grid.trained_rows()}  # fmt: skip


def test_the_paper_grid_checks_the_papers_fourteen_claims_on_five_seeds() -> None:
    grid = grid_mod.load(REPO / "experiments" / "paper_tables.yaml")
    assert len(grid.claims) == 14 and len(grid.seeds) >= 5


def test_the_in_distribution_teacher_sees_the_students_augmentation() -> None:
    """ce_strong's overrides restate recipes/tiny_digits.yaml's augmentation: a change to one
    without the other would make row deit_indist something else than the paper's."""
    grid = grid_mod.load(REPO / "experiments" / "paper_tables.yaml")
    from deitlt_scale import config as config_mod

    student = config_mod.load(RECIPE).data.augment
    teacher = config_mod.load(TEACHER, list(grid.teachers["ce_strong"].overrides)).data.augment
    for key in ("crop", "pad", "hflip", "scale", "randaugment_ops", "randaugment_magnitude",
                "random_erasing", "color_jitter"):  # fmt: skip
        assert getattr(teacher, key) == getattr(student, key), key


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda g: g["rows"]["student"].update(overides=[]), "unknown key rows.student.overides"),
        (lambda g: g["rows"]["other"].update(teacher="nope"), "rows.other.teacher names 'nope'"),
        (lambda g: g["claims"][0]["worse"].update(runs="ghost"), "'ghost' is not a row"),
        (lambda g: g["rows"]["control"].update(overrides=["optim.lr=1"]),
         "rows.control.controls must name a train row with the same recipe"),
        (lambda g: g["rows"]["stage"].update(init_from="again"),
         "rows.stage.init_from must name a trained row listed before it"),
        (lambda g: g.update(seeds=[1, 1]), "seeds must be distinct"),
        (lambda g: g["rows"]["other"].update(recipe="missing.yaml"),
         "rows.other.recipe missing.yaml does not exist"),
        (lambda g: g["report"].update(select={"kept": "ghost", "why": "cheaper"}),
         "report.select.kept names 'ghost', which is not a row"),
        (lambda g: g["report"].update(select={"kept": "other"}),
         "report.select.kept needs report.select.why"),
    ],
)  # fmt: skip
def test_a_grid_that_is_wrong_is_refused_naming_what(tmp_path, change, message) -> None:
    tree = json.loads(json.dumps(TINY_GRID))
    change(tree)
    path = write_grid(tmp_path / "bad.yaml", tree)
    with pytest.raises(ConfigError) as err:
        grid_mod.load(path)
    assert message in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# Plans


def test_the_plan_gives_each_row_its_seeds_teacher_and_start(tmp_path) -> None:
    grid = grid_mod.load(write_grid(tmp_path / "tiny.yaml", TINY_GRID))
    plan = expand(grid, tmp_path / "out", Options())
    keys = [r.key for r in plan.runs]
    assert keys[:4] == ["teachers/ldam-seed0", "teachers/ldam-seed1", "teachers/ce-seed0",
                        "teachers/ce-seed1"]  # fmt: skip
    assert "rows/again-seed0" not in keys  # reuses row student: trained once
    runs = plan.by_key()
    out = (tmp_path / "out").resolve()
    stage = runs["rows/stage-seed1"]
    assert stage.needs == ("teachers/ldam-seed1", "rows/student-seed1")
    assert f"train.init_from={out / 'rows' / 'student-seed1'}:latest" in stage.overrides
    assert f"teacher.path={out / 'teachers' / 'ldam-seed1' / 'teacher'}" in stage.overrides
    assert "train.seed=1" in stage.overrides and stage.verb == ("train",)
    control = runs["rows/control-seed0"]
    assert control.argv[:2] == ("bench", "control") and control.argv[-2:] == ("--side", "plain")
    only = expand(grid, tmp_path / "out", Options(only=("again",)))
    assert [r.key for r in only.runs] == ["teachers/ldam-seed0", "teachers/ldam-seed1",
                                          "rows/student-seed0", "rows/student-seed1"]  # fmt: skip


def test_epochs_shorten_a_recipe_keeping_warm_up_and_drw_in_proportion(tmp_path) -> None:
    grid = grid_mod.load(write_grid(tmp_path / "tiny.yaml", TINY_GRID))
    run = expand(grid, tmp_path / "o", Options(epochs=24)).by_key()["rows/student-seed0"]
    assert {"train.epochs=24", "schedule.warmup_epochs=0.5", "distill.drw_epoch=21"} <= set(
        run.overrides
    )


def test_a_plan_grows_with_new_seeds_and_refuses_other_training_options(tmp_path) -> None:
    grid = grid_mod.load(write_grid(tmp_path / "tiny.yaml", TINY_GRID))
    out = tmp_path / "out"
    plan, selected = extend(grid, out, Options(seeds=(0,), only=("student",)))
    plan.save()
    assert [r.key for r in selected] == ["teachers/ldam-seed0", "rows/student-seed0"]
    plan, selected = extend(grid, out, Options(seeds=(1,), only=("student",)))
    plan.save()
    assert [r.key for r in selected] == ["teachers/ldam-seed1", "rows/student-seed1"]
    assert [r.key for r in plan.runs] == ["teachers/ldam-seed0", "teachers/ldam-seed1",
                                          "rows/student-seed0", "rows/student-seed1"]  # fmt: skip
    assert plan.options.seeds == (0, 1)
    with pytest.raises(UserError, match="planned from .* with other options"):
        extend(grid, out, Options(seeds=(0,), epochs=3))


def test_a_planned_run_takes_its_command_from_the_grid_as_edited_since(tmp_path) -> None:
    out = tmp_path / "out"
    path = write_grid(tmp_path / "tiny.yaml", TINY_GRID)
    extend(grid_mod.load(path), out, Options(seeds=(0, 1), only=("other",)))[0].save()
    edited = json.loads(json.dumps(TINY_GRID))
    edited["rows"]["other"]["overrides"] = ["optim.lr=0.002"]
    grid = grid_mod.load(write_grid(path, edited))
    plan, selected = extend(grid, out, Options(seeds=(1,), only=("other",)))
    runs = plan.by_key()
    assert "optim.lr=0.002" in runs["rows/other-seed1"].overrides
    assert [r.key for r in selected] == ["teachers/ce-seed1", "rows/other-seed1"]
    assert "optim.lr=0.002" not in runs["rows/other-seed0"].overrides  # not selected this time


def test_a_row_taken_out_of_the_grid_leaves_the_plan(tmp_path) -> None:
    out = tmp_path / "out"
    path = write_grid(tmp_path / "tiny.yaml", TINY_GRID)
    extend(grid_mod.load(path), out, Options(seeds=(0,), only=("other", "student")))[0].save()
    edited = json.loads(json.dumps(TINY_GRID))
    del edited["rows"]["other"], edited["teachers"]["ce"]
    edited["claims"] = []
    plan, _ = extend(grid_mod.load(write_grid(path, edited)), out, Options(seeds=(1,)))
    assert plan.dropped == ["rows/other", "teachers/ce"]
    assert not [r.key for r in plan.runs if "other" in r.key or "/ce-" in r.key]
    assert "rows/student-seed0" in plan.by_key() and "rows/student-seed1" in plan.by_key()
    assert plan.options.only == ()


def test_a_run_is_refused_when_what_it_trains_changed_but_not_for_a_new_setting_at_default(
    tmp_path,
) -> None:
    from deitlt_scale.experiments.plan import config_difference, trained_config

    grid = grid_mod.load(write_grid(tmp_path / "tiny.yaml", TINY_GRID))
    run = expand(grid, tmp_path / "o", Options()).by_key()["rows/student-seed0"]
    recorded = trained_config(run)
    assert "runtime.run_dir" not in recorded and recorded["train.seed"] == 0
    older = {k: v for k, v in recorded.items() if k != "distill.cls_tau"}  # before it existed
    assert config_difference(older, recorded) is None
    assert config_difference(recorded, {**recorded, "optim.lr": 0.5}) == "optim.lr 0.001 -> 0.5"
    assert (
        config_difference({**recorded, "optim.gone": 1}, recorded) == "optim.gone no longer exists"
    )


def test_status_estimates_the_time_left_from_the_done_runs_of_each_row(tmp_path) -> None:
    from deitlt_scale.experiments.state import RunState
    from deitlt_scale.experiments.status import run_status, time_left

    grid = grid_mod.load(write_grid(tmp_path / "tiny.yaml", TINY_GRID))
    plan = expand(grid, tmp_path / "out", Options(only=("student", "other")))
    runs = plan.by_key()
    assert time_left([(r, *run_status(r)) for r in plan.runs]).endswith(
        "no done run of their stage to estimate from"
    )

    def finish(key: str, wall_s: float) -> None:
        run = runs[key]
        for name in ("train_summary.json", "eval/latest.json"):
            (run.run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (run.run_dir / name).write_text("{}")
        (run.run_dir / "teacher").mkdir()
        RunState(list(run.argv), None, "done", attempts=[{"wall_s": wall_s}]).write(run)

    for key, wall in [("teachers/ldam-seed0", 60), ("teachers/ldam-seed1", 120),
                      ("teachers/ce-seed0", 30), ("rows/student-seed0", 600)]:  # fmt: skip
        finish(key, wall)
    # ce-seed1 30 s; student-seed1 600 s; other-seed0, -seed1 600 s each (their stage's median)
    assert time_left([(r, *run_status(r)) for r in plan.runs]) == (
        "4 runs not done: about 0 h 30 min here (the median wall time of the done runs of each "
        "row; 2 of them from their stage's, as none of their row is done)"
    )


def test_a_partial_report_shows_the_rows_whose_every_seed_is_done_and_is_never_published(
    tmp_path,
) -> None:
    from deitlt_scale.experiments import results
    from deitlt_scale.experiments.state import RunState

    tree = {**TINY_GRID, "report": {"sections": ["S", "T"], "page": "tiny.md",
                                    "headline": TINY_GRID["report"]["headline"]}}  # fmt: skip
    grid = grid_mod.load(write_grid(tmp_path / "tiny.yaml", tree))
    plan = expand(grid, tmp_path / "out", Options(only=("student", "other")))
    plan.data.mkdir(parents=True)
    meta = {"dataset": "digits-lt", "train_counts": [3, 2, 1], "groups": {"paper": [0, 1, 2]},
            "splits": ["train", "eval"]}  # fmt: skip
    (plan.data / "meta.json").write_text(json.dumps(meta))
    metrics = {f"{h}/{k}": 0.5 for h in ("cls", "dist", "mean", "teacher")
               for k in ("overall", "paper/head", "paper/mid", "paper/tail")}  # fmt: skip
    done = [k for k in plan.by_key() if k != "rows/other-seed1"]
    for run in (plan.by_key()[k] for k in done):
        (run.run_dir / "eval").mkdir(parents=True)
        (run.run_dir / "eval" / "latest.json").write_text(
            json.dumps({"step": 4, "metrics": metrics})
        )
        (run.run_dir / "train_summary.json").write_text("{}")
        (run.run_dir / "teacher").mkdir()
        attempt = {"wall_s": 60.0, "cpu_s": 90.0, "ended": "2026-12-07T00:00:00Z", "exit": 0}
        RunState(list(run.argv), None, "done", attempts=[attempt]).write(run)
    with pytest.raises(UserError, match="rows/other-seed1 not complete.*report --partial"):
        results.collect(plan, "cmd")
    doc = results.collect(plan, "cmd", partial=True)
    assert list(doc["rows"]) == ["student"] and set(doc["teachers"]) == {"ldam", "ce"}
    assert doc["partial"] == {"complete": 7, "runs": 8, "left_out": ["rows/other"]}
    page = report_mod.Report(doc).page()
    assert "**Partial**: 7 of the grid's 8 runs are complete; left out until all their seeds " \
           "are: rows/other." in page  # fmt: skip
    assert "| student | mean of logits | 50.0 ± 0.0 |" in page
    with pytest.raises(UserError, match="a partial report is not published"):
        publish_mod.publish(doc, tmp_path / "docs")


# --------------------------------------------------------------------------------------------
# The report, from a results document


def _doc(tmp_path: Path, better: list[float], worse: list[float]) -> dict:
    """A results document of the tiny grid (no post-hoc sections) whose rows' every figure is
    ``better`` (row student and its control) or ``worse`` (row other) per seed."""

    def run(seed: int, value: float) -> dict:
        metrics = {
            f"{h}/{k}": value
            for h in ("cls", "dist", "mean")
            for k in ("overall", "mean_class", "paper/head", "paper/mid", "paper/tail")
        }
        return {
            "seed": seed,
            "step": 4,
            "metrics": metrics,
            "val": metrics,
            "summary": {
                "images_per_s": 100.0 + seed,
                "teacher_agreement": 0.5,
                "teacher_in_mix": 0.7,
            },
            "wall_s": 60.0,
            "cpu_s": 100.0,
            "load_before": [0.1],
            "ended": "2026-12-06T00:00Z",
        }

    tree = json.loads(json.dumps(TINY_GRID))
    tree["report"] = {
        "sections": ["S", "T"],
        "page": "tiny.md",
        "headline": tree["report"]["headline"],
    }
    grid = grid_mod.as_tree(grid_mod.load(write_grid(tmp_path / "tiny.yaml", tree)))
    teacher = [{**run(s, 0.9), "metrics": {"teacher/overall": 0.9}} for s in range(len(better))]
    return {
        "format": "deitlt-experiment-results/1", "grid": grid, "options": {},
        "command": "deitlt experiment run experiments/tiny.yaml --out runs/tiny",
        "seeds": list(range(len(better))),
        "dataset": {"name": "digits-lt", "train_counts": [3, 2, 1], "groups": [0, 1, 2],
                    "val": True},
        "machine": {"arch": "x86_64", "cores": 2, "cpu": "a CPU", "gpu": None, "python": "3.11",
                    "versions": {"torch": "t", "deepspeed": "d", "timm": "m", "dali": "x"}},
        "teachers": {"ldam": teacher},
        "rows": {"student": [run(s, v) for s, v in enumerate(better)],
                 "other": [run(s, v) for s, v in enumerate(worse)],
                 "control": [run(s, v) for s, v in enumerate(better)]},
    }  # fmt: skip


@pytest.mark.parametrize(
    "better, worse, verdict",
    [
        ([0.80, 0.82, 0.81, 0.83, 0.79], [0.70, 0.71, 0.69, 0.72, 0.70], "holds"),
        ([0.70, 0.71, 0.69, 0.72, 0.70], [0.80, 0.82, 0.81, 0.83, 0.79], "fails"),
        ([0.80, 0.70, 0.82, 0.69, 0.75], [0.75, 0.76, 0.74, 0.73, 0.77], "undecided"),
        ([0.80], [0.70], "one seed"),
    ],
)
def test_a_claim_is_decided_by_the_paired_interval(tmp_path, better, worse, verdict) -> None:
    (v,) = report_mod.Report(_doc(tmp_path, better, worse)).verdicts()
    assert v.outcome == verdict
    if len(better) > 1:
        from scipy.stats import ttest_rel

        low, high = v.ci
        p = ttest_rel([100 * b for b in better], [100 * w for w in worse]).pvalue
        assert (low > 0 or high < 0) == (p < 0.05)  # the interval is the paired t-test at 5%
        assert math.isclose(v.mean, 100 * (sum(better) - sum(worse)) / len(better))


def test_the_summary_counts_the_verdicts_in_words(tmp_path) -> None:
    holds = ([0.8, 0.82, 0.81], [0.7, 0.71, 0.69])
    doc = _doc(tmp_path, *holds)
    assert (
        "Of the claim tested: 1 holds (paired 95% intervals)." in report_mod.Report(doc).summary()
    )
    claims = doc["grid"]["claims"]
    doc["grid"]["claims"] = [*claims, dict(claims[0], statement="again")]
    assert "Of the 2 claims tested: 2 hold (paired" in report_mod.Report(doc).summary()


def test_a_claim_that_does_not_hold_is_explained_under_the_table(tmp_path) -> None:
    fails, holds = ([0.7, 0.71, 0.69], [0.8, 0.82, 0.81]), ([0.8, 0.82, 0.81], [0.7, 0.71, 0.69])
    page = report_mod.Report(_doc(tmp_path, *fails)).page()
    assert "* *the student beats the other* (fails): not explained yet." in page
    doc = _doc(tmp_path, *fails)
    doc["grid"]["claims"][0]["why"] = "the other row's teacher is better (table Teachers)."
    page = report_mod.Report(doc).page()
    assert "(fails): the other row's teacher is better (table Teachers)." in page
    assert "Where a claim does not hold" not in report_mod.Report(_doc(tmp_path, *holds)).page()


def test_publishing_writes_page_data_and_readme_block_and_a_hand_edit_is_caught(tmp_path) -> None:
    doc = _doc(tmp_path, [0.8, 0.82], [0.7, 0.71])
    docs = tmp_path / "docs"
    readme = tmp_path / "README.md"
    start, _, end = publish_mod.readme_block(doc)
    readme.write_text(f"# Project\n\nbefore\n{start}\nold figures\n{end}\nafter\n")
    written = publish_mod.publish(doc, docs)
    assert docs / "data" / "tiny.json" in written and docs / "tiny.md" in written
    assert (docs / "img" / "tiny" / "rows.png").stat().st_size > 0
    text = readme.read_text()
    assert text.startswith("# Project\n\nbefore\n") and text.endswith("after\n")
    assert "the student scores 81.0 ± 1.4 overall" in text and "old figures" not in text
    assert publish_mod.check_published(docs) == []
    page = docs / "tiny.md"
    page.write_text(page.read_text().replace("81.0 ± 1.4", "85.0 ± 1.4", 1))
    (problem,) = publish_mod.check_published(docs)
    assert str(page) in problem and "deitlt experiment report" in problem
    assert "do not edit it by hand" in problem
    publish_mod.publish(doc, docs)
    readme.write_text(readme.read_text().replace("81.0", "91.0"))
    (problem,) = publish_mod.check_published(docs)
    assert "README.md" in problem and start in problem


def test_the_control_section_pairs_accuracy_and_reports_the_speed_ratio(tmp_path) -> None:
    page = report_mod.Report(_doc(tmp_path, [0.8, 0.82], [0.7, 0.71])).page()
    assert "## The project against the plain loop: student and control" in page
    assert "| mean of logits, Overall | 81.0 ± 1.4 | 81.0 ± 1.4 | +0.0 [+0.0, +0.0] |" in page
    assert "ratio project / plain per seed 1.00x, 1.00x (mean 1.00x)" in page


# --------------------------------------------------------------------------------------------
# A grid run for real


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny grid run here: started, stopped by SIGTERM during a student run, resumed to
    the end, run a third time (nothing left), then reported and published."""
    root = tmp_path_factory.mktemp("experiment")
    grid = write_grid(root / "tiny.yaml", TINY_GRID)
    out = root / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deitlt_scale.cli", "experiment", "run", str(grid), "--out",
           str(out), *SHRINK]  # fmt: skip
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    run_dir = out / "rows" / "student-seed0"
    deadline = time.monotonic() + 600
    while not list(run_dir.glob("checkpoints/step_*/COMPLETE")):  # stop once the student saved
        assert first.poll() is None and time.monotonic() < deadline, "the grid never got there"
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    lines = first.communicate(timeout=300)[0]
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    third = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    status = deitlt("experiment", "status", str(out))
    (root / "README.md").write_text("# R\n")
    report = deitlt("experiment", "report", str(out), "--publish", str(root / "docs"))
    return {"out": out, "first": (first.returncode, lines), "second": second,
            "third": third, "status": status, "report": report, "docs": root / "docs"}  # fmt: skip


@pytest.mark.slow
def test_sigterm_stops_the_grid_with_exit_75_and_a_rerun_finishes_it(tiny_run) -> None:
    code, output = tiny_run["first"]
    assert code == 75, output
    assert "rows/student-seed0: stopped" in output and "run the same command again" in output
    second = tiny_run["second"]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "teachers/ldam-seed0: complete" in second.stdout
    assert "rows/student-seed0: training" in second.stdout  # resumed, not skipped
    third = tiny_run["third"]
    assert third.returncode == 0 and "training" not in third.stdout, third.stdout


@pytest.mark.slow
def test_the_stopped_run_resumed_from_its_checkpoint_and_recorded_both_attempts(tiny_run):
    state = json.loads((tiny_run["out"] / "rows" / "student-seed0" / "experiment.json").read_text())
    assert state["state"] == "done"
    assert [a["exit"] for a in state["attempts"]] == [75, 0]
    log = (tiny_run["out"] / "rows" / "student-seed0.log").read_text()
    assert "resumed from" in log


@pytest.mark.slow
def test_status_lists_every_run_done(tiny_run) -> None:
    status = tiny_run["status"]
    assert status.returncode == 0, status.stderr
    lines = status.stdout.strip().splitlines()
    assert lines[-1] == "12 done"
    assert any(line.startswith("rows/stage-seed1") and " done " in line for line in lines)


@pytest.mark.slow
def test_the_report_publishes_every_section_from_the_runs(tiny_run) -> None:
    report = tiny_run["report"]
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-3000:]
    docs = tiny_run["docs"]
    page = (docs / "tiny.md").read_text()
    for heading in ("## S", "## T", "## Teachers", "## Cost and the teacher's labels",
                    "## The project against the plain loop: student and control",
                    "## The claims", "## The two heads of row student",
                    "## Which checkpoint: row student"):  # fmt: skip
        assert heading in page, heading
    doc = json.loads((docs / "data" / "tiny.json").read_text())
    student = doc["rows"]["student"]
    latest = json.loads((tiny_run["out"] / "rows" / "student-seed0" / "eval" / "latest.json")
                        .read_text())  # fmt: skip
    assert student[0]["metrics"]["mean/overall"] == latest["metrics"]["mean/overall"]
    assert student[0]["summary"]["steps"] >= 1 and student[0]["wall_s"] > 0
    assert "| again | mean of logits |" in page  # the reused row shows the student's runs
    assert publish_mod.check_published(docs) == []


# --------------------------------------------------------------------------------------------
# Runs taken from another grid's output directory


@pytest.fixture(scope="module")
def reused_run(tiny_run, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A second grid run with ``--reuse`` the tiny grid's output: teacher ``ldam``, row
    ``student`` and its control are the tiny grid's; teacher ``ce`` is not (another lr), so row
    ``other``, whose configuration is otherwise the tiny grid's, must train again too. Rows
    ``renamed`` and ``restage`` are ``student`` and ``stage`` under other names: ``restage``
    starts from ``renamed``, a copy of the run ``stage`` started from."""
    root = tmp_path_factory.mktemp("reuse")
    tree = {
        **TINY_GRID, "title": "A grid sharing runs",
        "teachers": {**TINY_GRID["teachers"], "ce": {
            "recipe": TEACHER, "overrides": ["distill.teacher_loss=ce", "optim.sam_rho=0",
                                             "optim.lr=0.05"]}},
        "rows": {**{k: TINY_GRID["rows"][k] for k in ("student", "other", "control")},
                 "renamed": TINY_GRID["rows"]["student"],
                 "restage": {**TINY_GRID["rows"]["stage"], "init_from": "renamed"}},
        "claims": [], "report": {"page": "shared.md"},
    }  # fmt: skip
    grid = write_grid(root / "shared.yaml", tree)
    out = root / "out"
    run = deitlt("experiment", "run", str(grid), "--out", str(out), "--seeds", "0", *SHRINK,
                 "--reuse", str(tiny_run["out"]))  # fmt: skip
    # Copies of copies: row student, from the second grid's copies of the tiny grid's runs.
    again = deitlt("experiment", "run", str(grid), "--out", str(root / "again"), "--seeds", "0",
                   "--only", "student", *SHRINK, "--reuse", str(out))  # fmt: skip
    # Run again after its teacher was copied (in the first process): the student is a copy too.
    shutil.rmtree(root / "again" / "rows" / "student-seed0")
    restart = deitlt("experiment", "run", str(grid), "--out", str(root / "again"), "--seeds", "0",
                     "--only", "student", *SHRINK, "--reuse", str(out))  # fmt: skip
    return {"out": out, "run": run, "again": again, "restart": restart}


@pytest.mark.slow
def test_reuse_copies_the_runs_another_grid_trained_and_trains_the_rest(reused_run, tiny_run):
    run = reused_run["run"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    source = tiny_run["out"]
    for key in ("teachers/ldam-seed0", "rows/student-seed0", "rows/control-seed0"):
        assert f"{key}: copied from {source / key}" in run.stdout, run.stdout
    for key, theirs in (("renamed", "student"), ("restage", "stage")):
        assert f"rows/{key}-seed0: copied from {source / 'rows' / theirs}-seed0" in run.stdout
    for key in ("teachers/ce-seed0", "rows/other-seed0"):  # another lr; another teacher
        assert f"{key}: training" in run.stdout, run.stdout
    copied = reused_run["out"] / "rows" / "student-seed0"
    state = json.loads((copied / "experiment.json").read_text())
    assert state["reused_from"] == str(source / "rows" / "student-seed0")
    assert state["state"] == "done" and [a["exit"] for a in state["attempts"]] == [75, 0]
    assert f"data.shards={reused_run['out'] / 'data'}" in state["argv"]
    original = (source / "rows" / "student-seed0" / "eval" / "latest.json").read_text()
    assert (copied / "eval" / "latest.json").read_text() == original
    again = reused_run["again"]
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "training" not in again.stdout, again.stdout
    assert again.stdout.count("copied from") == 2
    restart = reused_run["restart"]
    assert restart.returncode == 0, restart.stdout[-3000:] + restart.stderr[-3000:]
    assert "rows/student-seed0: copied from" in restart.stdout, restart.stdout


def test_reuse_refuses_a_directory_whose_runs_learned_from_other_data(tmp_path) -> None:
    from deitlt_scale.experiments.reuse import Reuse

    plans = []
    for name, data in (("mine", TINY_GRID["data"]), ("theirs", ["digits-lt"])):
        grid = grid_mod.load(write_grid(tmp_path / f"{name}.yaml", {**TINY_GRID, "data": data}))
        plan = expand(grid, tmp_path / name, Options())
        plan.save()
        plan.data.mkdir(parents=True)
        (plan.data / "meta.json").write_text('{"num_classes": 10}')
        plans.append(plan)
    with pytest.raises(UserError, match=r"--reuse .*theirs: its data is not .*mine's"):
        Reuse(plans[0], [plans[1].out])


# --------------------------------------------------------------------------------------------
# The same grid as SLURM arrays, on the real test cluster


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tiny_run, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Rows student and other (two teachers, four students) submitted to the cluster; student
    seed 1 is signalled (USR1) once it has saved a checkpoint, exits 75 and is requeued."""
    root = tmp_path_factory.mktemp("submitted")
    grid = write_grid(root / "tiny.yaml", TINY_GRID)
    out = root / "out"
    env = slurm_cluster.env({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    cmd = [
        sys.executable,
        "-m",
        "deitlt_scale.cli",
        "experiment",
        "submit",
        str(grid),
        "--out",
        str(out),
        "--only",
        "student",
        "other",
        "--sbatch=--cpus-per-task=1",
        *SHRINK,
    ]
    submitted = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    jobs = {line.split()[1].rstrip(":"): line.split()[0]
            for line in submitted.stdout.splitlines() if line.split()}  # fmt: skip
    student, element = out / "rows" / "student-seed1", f"{jobs['rows/student']}_1"
    slurm_cluster.wait_until(lambda: bool(list(student.glob("checkpoints/step_*/COMPLETE"))),
                             600, "student seed 1 to save a checkpoint", element)  # fmt: skip
    slurm_cluster.signal(element, "USR1")
    ends = {name: slurm_cluster.wait_for_end(job, 900) for name, job in jobs.items()}
    report = subprocess.run([sys.executable, "-m", "deitlt_scale.cli", "experiment", "report",
                             str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    return {"out": out, "submitted": submitted, "jobs": jobs, "ends": ends, "report": report}


@pytest.mark.slow
def test_submit_makes_one_array_per_teacher_and_row_and_every_element_completes(slurm_run):
    submitted = slurm_run["submitted"].stdout
    assert "--array=0,1" in submitted and "--dependency=aftercorr:" in submitted
    assert set(slurm_run["jobs"]) == {"data", "teachers/ldam", "teachers/ce", "rows/student",
                                      "rows/other"}  # fmt: skip
    for name, end in slurm_run["ends"].items():
        assert end.exit_code == 0, f"{name}\n{end.report}"
    status = deitlt("experiment", "status", str(slurm_run["out"]))
    assert status.stdout.strip().splitlines()[-1] == "8 done", status.stdout


@pytest.mark.slow
def test_each_student_element_starts_after_its_own_teacher_element_ended(slurm_run):
    out = slurm_run["out"]
    for row, teacher in (("student", "ldam"), ("other", "ce")):
        for seed in (0, 1):
            state = json.loads((out / "rows" / f"{row}-seed{seed}" / "experiment.json").read_text())
            taught = json.loads(
                (out / "teachers" / f"{teacher}-seed{seed}" / "experiment.json").read_text()
            )
            assert state["attempts"][0]["started"] >= taught["attempts"][-1]["ended"]
            assert state["slurm_job"].endswith(f"_{seed}")


@pytest.mark.slow
def test_the_signalled_element_was_requeued_and_resumed(slurm_run):
    state = json.loads(
        (slurm_run["out"] / "rows" / "student-seed1" / "experiment.json").read_text()
    )
    assert [a["exit"] for a in state["attempts"]] == [75, 0]
    log = (slurm_run["out"] / "rows" / "student-seed1.log").read_text()
    assert "scontrol requeue" in log and "resumed from" in log


@pytest.mark.slow
def test_the_cluster_reports_what_the_same_grid_gives_on_one_machine(slurm_run, tiny_run):
    """Every run's final figures, and so the tables and the claim, equal the local run's: the
    runs are deterministic in their seed, requeued or stopped or not."""
    assert slurm_run["report"].returncode == 0, slurm_run["report"].stderr[-3000:]
    cluster = json.loads((slurm_run["out"] / "report" / "results.json").read_text())
    here = json.loads((tiny_run["docs"] / "data" / "tiny.json").read_text())
    for stage in ("teachers", "rows"):
        for name, runs in cluster[stage].items():
            assert [r["metrics"] for r in runs] == [r["metrics"] for r in here[stage][name]], name
    claims = [report_mod.Report(doc).verdicts() for doc in (cluster, here)]
    assert [(v.differences, v.outcome) for v in claims[0]] == [
        (v.differences, v.outcome) for v in claims[1]
    ]


def test_the_provenance_names_each_cpu_the_attempts_ran_on_when_they_differ(tmp_path) -> None:
    doc = _doc(tmp_path, [0.8, 0.82], [0.7, 0.71])
    (machine,) = [line for line in report_mod.Report(doc).provenance() if "Machine" in line]
    assert "more than one CPU" not in machine  # no attempt names its CPU
    doc["machine"]["cpu"] = "cpu A"
    for stage in ("rows", "teachers"):
        for runs in doc[stage].values():
            for r in runs:
                r["cpus"] = ["cpu A"]
    (machine,) = [line for line in report_mod.Report(doc).provenance() if "Machine" in line]
    assert "more than one CPU" not in machine
    doc["rows"]["other"][0]["cpus"] = [None]  # an attempt of a version that did not record it
    (machine,) = [line for line in report_mod.Report(doc).provenance() if "Machine" in line]
    assert "1 of the 8 attempts did not record their CPU; the rest ran on" in machine
    doc["rows"]["other"][0]["cpus"] = ["cpu A"]
    doc["rows"]["other"][1]["cpus"] = ["cpu B", "cpu A"]
    (machine,) = [line for line in report_mod.Report(doc).provenance() if "Machine" in line]
    assert "(attempts per CPU: cpu A: 8; cpu B: 1)" in machine


def test_the_choice_marks_the_row_kept_and_the_first_ranked_with_the_reason(tmp_path) -> None:
    doc = _doc(tmp_path, [0.8, 0.82], [0.7, 0.71])
    select = {"metric": "mean/mean_class", "split": "val", "kept": None, "why": ""}
    doc["grid"]["report"]["select"] = select
    table = report_mod.Report(doc).selection_table()
    assert "| student | 81.0 ± 1.4 |" in table and table.count("**kept**") == 1
    assert "ranked first" not in table and "The recipe keeps" not in table
    select.update(kept="other", why="it costs half as much.")
    table = report_mod.Report(doc).selection_table()
    (kept,) = [line for line in table.splitlines() if "**kept**" in line]
    (first,) = [line for line in table.splitlines() if "ranked first" in line]
    assert kept.startswith("| other |") and first.startswith("| student |")
    assert "The recipe keeps row `other`: it costs half as much." in table
    doc["grid"]["report"]["headline"] = []  # a grid of choices: its summary names them
    assert (
        "ranks row `student` first; the recipe keeps `other`." in report_mod.Report(doc).summary()
    )
    select.update(kept=None)
    assert "ranks row `student` first." in report_mod.Report(doc).summary()
