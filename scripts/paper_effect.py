"""The paper's effect on the embedded dataset: DeiT-LT vs the plain ViT baseline, several seeds.

    .venv/bin/python scripts/paper_effect.py --out runs/paper-effect --seeds 0 1 [--epochs N]

Runs (each as `deitlt ...`, resumable): prepare digits-lt; train the LDAM-DRW+SAM teacher and, for
comparison, the same ResNet-32 with plain cross-entropy; then for every seed a DeiT-LT student
(recipes/tiny_digits.yaml) and a plain ViT with the same student, augmentation and budget
(distill.type=none, model.distilled=false). Prints markdown tables of Overall/Head/Mid/Tail
(paper index groups and count groups) for every head, mean and spread over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GROUPS = ("overall", "head", "mid", "tail")


def deitlt(*args: object) -> None:
    cmd = [sys.executable, "-m", "deitlt_scale.cli", *map(str, args)]
    print("+ deitlt " + " ".join(map(str, args)), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "eval" / "latest.json").read_text())["metrics"]


def row(name: str, runs: list[dict[str, float]], head: str, convention: str) -> str:
    cells = []
    for group in GROUPS:
        key = f"{head}/overall" if group == "overall" else f"{head}/{convention}/{group}"
        values = [100 * m[key] for m in runs]
        spread = statistics.pstdev(values) if len(values) > 1 else 0.0
        cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f}")
    return f"| {name} | {' | '.join(cells)} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "paper-effect")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--epochs", type=int, default=None, help="student epochs (recipe's default)"
    )
    parser.add_argument("--teacher-epochs", type=int, default=None)
    args = parser.parse_args()
    out: Path = args.out.resolve()
    data = out / "digits-lt"
    if not (data / "meta.json").is_file():
        deitlt("data", "prepare", "digits-lt", "--out", data)

    teacher_extra = [f"train.epochs={args.teacher_epochs}"] if args.teacher_epochs else []
    teachers = {
        "ldam-drw-sam": [],
        "ce": ["distill.teacher_loss=ce", "optim.sam_rho=0", "distill.drw_epoch=null"],
    }
    for name, extra in teachers.items():
        deitlt(
            "teacher", "train", REPO / "recipes" / "teacher_digits.yaml",
            f"data.shards={data}", f"runtime.run_dir={out / f'teacher-{name}'}", *extra, *teacher_extra,
        )  # fmt: skip

    student_extra = [f"train.epochs={args.epochs}"] if args.epochs else []
    variants = {
        "DeiT-LT": [f"teacher.path={out / 'teacher-ldam-drw-sam' / 'teacher'}"],
        "ViT": ["distill.type=none", "model.distilled=false", "teacher.path="],
    }
    results: dict[str, list[dict[str, float]]] = {}
    for name, extra in variants.items():
        for seed in args.seeds:
            run_dir = out / f"{name.lower()}-seed{seed}"
            deitlt(
                "train", REPO / "recipes" / "tiny_digits.yaml", f"data.shards={data}",
                f"runtime.run_dir={run_dir}", f"train.seed={seed}", *extra, *student_extra,
            )  # fmt: skip
            results.setdefault(name, []).append(metrics(run_dir))

    print("\n## Teachers (ResNet-32, seed 0)\n")
    print("| teacher | Overall | Head | Mid | Tail |\n|---|---|---|---|---|")
    for name in teachers:
        print(row(name, [metrics(out / f"teacher-{name}")], "teacher", "paper"))
    for convention in ("paper", "count"):
        print(f"\n## Students, {convention} groups (mean ± spread over seeds {args.seeds})\n")
        print("| model / head | Overall | Head | Mid | Tail |\n|---|---|---|---|---|")
        for head in ("cls", "dist", "mean"):
            print(row(f"DeiT-LT {head}", results["DeiT-LT"], head, convention))
        print(row("ViT cls", results["ViT"], "cls", convention))
    return 0


if __name__ == "__main__":
    sys.exit(main())
