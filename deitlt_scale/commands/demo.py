"""`deitlt demo`: the whole pipeline on the embedded long-tailed digits, on CPU, in minutes.

prepare digits-lt (with a val split) -> train an LDAM-DRW+SAM ResNet-14 teacher -> train a
DeiT-LT student by distillation -> eval table (CLS, DIST, mean; Overall/Head/Mid/Tail) -> export
for timm -> the export scored in plain timm -> plots.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HELP = "run the whole pipeline on the embedded long-tailed digits dataset, on CPU"
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("demo-out"), help="output directory (default: demo-out)"
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="student epochs (default: the recipe's)"
    )
    parser.add_argument(
        "--teacher-epochs", type=int, default=None, help="teacher epochs (default: the recipe's)"
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides for the student recipe, e.g. train.seed=1"
    )


def run(args: argparse.Namespace) -> int:
    from deitlt_scale.data import meta as meta_mod
    from deitlt_scale.data.prepare import prepare_dataset
    from deitlt_scale.data.sources import VAL_ALL
    from deitlt_scale.errors import UserError
    from deitlt_scale.experiments.plan import scaled_schedule

    out: Path = args.out.resolve()
    data, teacher_run, student_run = out / "data" / "digits-lt", out / "teacher", out / "student"
    started = time.perf_counter()

    _stage(1, "prepare the long-tailed digits shards (train, eval, and val for choices)", data)
    try:
        meta = meta_mod.load(data)
    except UserError:
        meta = prepare_dataset("digits-lt", out=data, val_per_class=VAL_ALL)
    print(
        f"    {meta.num_samples('train')} train / {meta.num_samples('eval')} eval images, "
        f"counts {meta.train_counts}"
    )

    _stage(2, "train the LDAM-DRW + SAM ResNet-14 teacher", teacher_run)
    teacher_overrides = [f"data.shards={data}", f"runtime.run_dir={teacher_run}"]
    # Shorter runs keep the recipe's schedule in proportion (warm-up, DRW), as grids shorten it.
    teacher_overrides += scaled_schedule(RECIPES / "teacher_digits.yaml", args.teacher_epochs)
    code = _deitlt("teacher", "train", RECIPES / "teacher_digits.yaml", *teacher_overrides)
    if code != 0:
        return code

    _stage(3, "train the DeiT-LT student (CLS + DIST tokens) from the teacher", student_run)
    overrides = [
        f"data.shards={data}",
        f"runtime.run_dir={student_run}",
        f"teacher.path={teacher_run / 'teacher'}",
    ]
    overrides += scaled_schedule(RECIPES / "tiny_digits.yaml", args.epochs)
    code = _deitlt("train", RECIPES / "tiny_digits.yaml", *overrides, *args.overrides)
    if code != 0:
        return code

    _stage(
        4, "evaluation (Overall / Head / Mid / Tail, both group conventions)", student_run / "eval"
    )
    print((student_run / "eval" / "table.txt").read_text())

    _stage(5, "export for timm", out / "export")
    from deitlt_scale.export import export

    # The demo owns its output folder: a re-run replaces the derived outputs (training resumes).
    shutil.rmtree(out / "export", ignore_errors=True)
    export(student_run, out / "export")

    _stage(6, "the export in plain timm: timm.create_model('local-dir:...') on the eval split",
           out / "export")  # fmt: skip
    from deitlt_scale.analysis.timm_check import score_export

    trained = json.loads((student_run / "eval" / "latest.json").read_text())["metrics"]
    scored = score_export(out / "export", data)
    print(
        f"    timm's prediction (the mean of the CLS and DIST logits): "
        f"{100 * scored['overall']:.1f} overall; the table above, row mean: "
        f"{100 * trained['mean/overall']:.1f}"
    )

    _stage(
        7, "diagnostics: attention distance, rollout, CLS/DIST divergence, rank", out / "analysis"
    )

    from deitlt_scale.cli import main as cli_main

    shutil.rmtree(out / "analysis", ignore_errors=True)
    code = cli_main(
        ["analyze", str(out / "export"), "--data", str(data), "--out", str(out / "analysis")]
    )
    if code != 0:
        return code

    minutes = (time.perf_counter() - started) / 60
    print(f"\ndemo finished in {minutes:.1f} min. Outputs:")
    for label, path in [
        ("dataset", data),
        ("teacher", teacher_run / "teacher"),
        ("student run", student_run),
        ("eval table", student_run / "eval" / "table.txt"),
        ("timm export", out / "export"),
        ("plots", out / "analysis"),
        ("MLflow store", student_run / "mlflow.db"),
    ]:
        print(f"  {label:<14}{path}")
    return 0


def _deitlt(*args: object) -> int:
    """Each training stage is its own process, as a user would run it (one process group each)."""
    return subprocess.run([sys.executable, "-m", "deitlt_scale.cli", *map(str, args)]).returncode


def _stage(number: int, title: str, where: Path) -> None:
    print(f"\n== [{number}/7] {title}  ->  {where}", flush=True)
