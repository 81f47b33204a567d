"""Two measurements beyond the paper on the embedded dataset, several seeds, resumable.

    .venv/bin/python scripts/beyond_paper.py --out runs/stage --seeds 0 1 2

1. A higher-resolution final stage: the DeiT-LT student of recipes/tiny_digits.yaml at 32 px, then
   a short stage from its final weights at 48 px (``train.init_from``, ``data.image_size=48``),
   against the same short stage at 32 px (the same extra steps from the same weights).
2. Model selection: the same 32 px runs train on a dataset prepared with a val split, so each
   records its final checkpoint (``eval/latest.json``), the checkpoint chosen on val
   (``eval/best.json``) and, at every eval, the test split's per-class accuracy
   (``eval/per_class_stepNNNNNNNN.csv``), from which the reference's choice (the eval with the
   best test accuracy) is read.

Every run is a ``deitlt`` command; a finished run is not repeated (the trainer resumes from the
run's newest checkpoint, and a finished run has nothing left to train). Prints markdown tables:
Overall/Head/Mid/Tail in percent (paper index groups), mean ± sample standard deviation (n - 1)
over seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEADS = ("cls", "dist", "mean")
GROUPS = ("head", "mid", "tail")
CONVENTION = "paper"  # the paper's index groups (digits: 0-2, 3-6, 7-9)
HEADLINE = "mean/overall"  # what the trainer selects on (the DeiT-LT task's headline)
VAL_PER_CLASS = 8
RUNS = ("base", "cont32", "hr48")
EVAL_EVERY = 5  # epochs; 20 evals over the recipe's 100 epochs: the pool the selections draw from

# The short final stage (both resolutions): 5 epochs (a twentieth of the 32 px run), a tenth of its
# peak lr with no warm-up (the weights are trained; a warm-up would spend most of the stage),
# cosine down to the recipe's min_lr. The 32 px run ended in its DRW phase, so the stage
# re-weights from its first step and, as the recipe does during DRW, trains without mixup.
STAGE = (
    "train.epochs=5",
    "optim.lr=1.0e-4",
    "schedule.warmup_epochs=0",
    "schedule.min_lr=1.0e-5",
    "distill.drw_epoch=0",
    "eval.every_epochs=5",
    "checkpoint.every_epochs=5",
)


def finished(run_dir: Path) -> bool:
    """True when ``run_dir`` evaluated its last step: the total of its saved config (one process)."""
    from deitlt_scale import config

    latest_json, saved = REPO / run_dir / "eval" / "latest.json", REPO / run_dir / "config.yaml"
    if not (latest_json.is_file() and saved.is_file()):
        return False
    cfg = config.load(saved)
    meta = json.loads((REPO / cfg.data.shards / "meta.json").read_text())
    total = config.resolve_steps(cfg, sum(meta["train_counts"]), 1).total
    return json.loads(latest_json.read_text())["step"] == total


def start(log: Path, *args: object) -> subprocess.Popen:
    """Start ``deitlt ARGS`` from the repository root, its output appended to ``log``."""
    cmd = [sys.executable, "-m", "deitlt_scale.cli", *map(str, args)]
    print("+ deitlt " + " ".join(map(str, args)), flush=True)
    with log.open("a") as out:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def wait(procs: Sequence[subprocess.Popen]) -> None:
    """Wait for every command; exit naming the first that failed."""
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, proc.args))}")


def deitlt(log: Path, *args: object) -> None:
    """Run ``deitlt ARGS`` to the end (see :func:`start`)."""
    wait([start(log, *args)])


def latest(run_dir: Path) -> dict[str, float]:
    """The final checkpoint's test metrics (fractions)."""
    return json.loads((run_dir / "eval" / "latest.json").read_text())["metrics"]


def best(run_dir: Path) -> tuple[int, str, dict[str, float]]:
    """(step, split it was selected on, test metrics) of the run's best checkpoint."""
    record = json.loads((run_dir / "eval" / "best.json").read_text())
    return int(record["step"]), str(record["selected_on"]), record["metrics"]


def per_eval(eval_dir: Path) -> dict[int, dict[str, float]]:
    """Metrics of every eval from its per-class CSV: step -> {"HEAD/overall", "HEAD/paper/G"}.

    Overall is the image-weighted accuracy; a group's figure is the mean of its classes'
    accuracies, as the trainer computes both.
    """
    out: dict[int, dict[str, float]] = {}
    for path in sorted(eval_dir.glob("per_class_step*.csv")):
        step = int(path.stem.removeprefix("per_class_step"))
        with path.open() as f:
            rows = list(csv.DictReader(f))
        metrics: dict[str, float] = {}
        total = sum(int(r["eval_count"]) for r in rows)
        for head in HEADS:
            acc = [(float(r[f"acc_{head}"]), int(r["eval_count"]), r["group_paper"]) for r in rows]
            metrics[f"{head}/overall"] = sum(a * n for a, n, _ in acc) / total
            for group in GROUPS:
                members = [a for a, n, g in acc if g == group and n > 0]
                metrics[f"{head}/{CONVENTION}/{group}"] = sum(members) / len(members)
        out[step] = metrics
    return out


def test_selected(run_dir: Path) -> tuple[int, dict[str, float]]:
    """The eval with the highest test headline (the earliest among equals): the reference's choice."""
    evals = per_eval(run_dir / "eval")
    step = max(sorted(evals), key=lambda s: evals[s][HEADLINE])
    return step, evals[step]


def check_history(run_dir: Path) -> None:
    """The last eval's CSV reproduces latest.json: the history is read as the trainer wrote it."""
    evals = per_eval(run_dir / "eval")
    final = latest(run_dir)
    last = evals[max(evals)]
    for key, value in last.items():
        if abs(value - final[key]) > 1e-5:  # the CSV holds 6 decimals
            raise SystemExit(f"{run_dir}: {key} {value} in the CSV history, {final[key]} in latest")


def cell(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """Mean ± sample standard deviation in percent; the value alone for one seed."""
    mean = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def figures(runs: Sequence[dict[str, float]], head: str) -> list[str]:
    keys = [f"{head}/overall"] + [f"{head}/{CONVENTION}/{g}" for g in GROUPS]
    return [cell([m[k] for m in runs]) for k in keys]


def resolution_table(base: list, cont: list, high: list, steps: str) -> str:
    lines = [
        "| run | head | Overall | Head | Mid | Tail |",
        "|---|---|---|---|---|---|",
    ]
    named = [
        ("32 px, final", base),
        (f"32 px, + {steps} at 32 px", cont),
        (f"32 px, + {steps} at 48 px", high),
    ]
    for name, runs in named:
        for head in HEADS:
            lines.append(f"| {name} | {head.upper() if head != 'mean' else 'mean'} | "
                         + " | ".join(figures(runs, head)) + " |")  # fmt: skip
    lines += ["", "Paired difference, 48 px stage minus 32 px stage (same seed, same start):", ""]
    lines += ["| head | Overall | Head | Mid | Tail |", "|---|---|---|---|---|"]
    for head in HEADS:
        keys = [f"{head}/overall"] + [f"{head}/{CONVENTION}/{g}" for g in GROUPS]
        diffs = [cell([h[k] - c[k] for h, c in zip(high, cont, strict=True)]) for k in keys]
        lines.append(
            f"| {head.upper() if head != 'mean' else 'mean'} | " + " | ".join(diffs) + " |"
        )
    return "\n".join(lines)


def selection_table(run_dirs: Sequence[Path]) -> str:
    final = [latest(r) for r in run_dirs]
    chosen = [best(r) for r in run_dirs]
    peeked = [test_selected(r) for r in run_dirs]
    if any(split != "val" for _, split, _ in chosen):
        raise SystemExit("a run's best checkpoint was not selected on the val split")
    final_steps = [json.loads((r / "eval" / "latest.json").read_text())["step"] for r in run_dirs]
    rows = [
        ("final checkpoint", final_steps, final),
        ("chosen on val (mean-head Overall)", [s for s, _, _ in chosen], [m for *_, m in chosen]),
        ("chosen on test (the reference)", [s for s, _ in peeked], [m for _, m in peeked]),
    ]
    lines = [
        "| checkpoint | step per seed | head | Overall | Head | Mid | Tail |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, steps, runs in rows:
        for head in HEADS:
            label = head.upper() if head != "mean" else "mean"
            lines.append(f"| {name} | {', '.join(map(str, steps))} | {label} | "
                         + " | ".join(figures(runs, head)) + " |")  # fmt: skip
    return "\n".join(lines)


def history_table(run_dirs: Sequence[Path], last: int = 6) -> str:
    """The last ``last`` evals of every run: val and test mean-head Overall, test DIST Overall."""
    lines = [
        "| run | step | val, mean head | test, mean head | test, DIST head |",
        "|---|---|---|---|---|",
    ]
    for run in run_dirs:
        test, val = per_eval(run / "eval"), per_eval(run / "eval" / "val")
        for step in sorted(test)[-last:]:
            figures = [val[step][HEADLINE], test[step][HEADLINE], test[step]["dist/overall"]]
            lines.append(
                f"| {run.name} | {step} | " + " | ".join(cell([f]) for f in figures) + " |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/stage"), help="relative to the repo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--parallel-stages", action="store_true", help="train a seed's two stages at once"
    )
    parser.add_argument("--tables-only", action="store_true", help="print tables of finished runs")
    args = parser.parse_args()
    out: Path = args.out
    (REPO / out).mkdir(parents=True, exist_ok=True)
    data, teacher = out / "digits-lt", out / "teacher"
    recipe = Path("recipes") / "tiny_digits.yaml"
    common = (
        f"data.shards={data}",
        f"teacher.path={teacher / 'teacher'}",
        "tracking.enabled=false",
    )

    def train(run: Path, *cli: object) -> list[subprocess.Popen]:
        """Start ``deitlt CLI runtime.run_dir=RUN``, unless the run is finished (or only tables
        are asked)."""
        if args.tables_only or finished(run):
            return []
        return [start(REPO / out / f"{run.name}.log", *cli, f"runtime.run_dir={run}")]

    if not args.tables_only and not (REPO / data / "meta.json").is_file():
        deitlt(REPO / out / "prepare.log", "data", "prepare", "digits-lt",
               "--val-per-class", VAL_PER_CLASS, "--out", data, "--no-progress")  # fmt: skip
    wait(train(teacher, "teacher", "train", Path("recipes") / "teacher_digits.yaml",
               f"data.shards={data}", "train.seed=0", "tracking.enabled=false"))  # fmt: skip
    for seed in args.seeds:
        base = out / f"base-seed{seed}"
        wait(train(base, "train", recipe, *common, f"train.seed={seed}",
                   f"eval.every_epochs={EVAL_EVERY}"))  # fmt: skip
        stages: list[subprocess.Popen] = []
        for size, name in ((32, "cont32"), (48, "hr48")):
            stages += train(out / f"{name}-seed{seed}", "train", recipe, *common, *STAGE,
                            f"train.seed={seed}", f"data.image_size={size}",
                            f"train.init_from={base}:latest")  # fmt: skip
            if not args.parallel_stages:
                wait(stages)
        wait(stages)

    done = [s for s in args.seeds if all(finished(out / f"{n}-seed{s}") for n in RUNS)]
    bases = [REPO / out / f"base-seed{s}" for s in args.seeds if finished(out / f"base-seed{s}")]
    for run in bases:
        check_history(run)
    print(f"\n### Higher-resolution final stage (seeds {', '.join(map(str, done))})\n")
    if done:
        print(resolution_table(
            [latest(REPO / out / f"base-seed{s}") for s in done],
            [latest(REPO / out / f"cont32-seed{s}") for s in done],
            [latest(REPO / out / f"hr48-seed{s}") for s in done],
            STAGE[0].split("=")[1] + " epochs",
        ))  # fmt: skip
    print(f"\n### Model selection (seeds {', '.join(p.name.split('seed')[1] for p in bases)})\n")
    if bases:
        print(selection_table(bases))
        print("\nThe last evals (val: 80 images, one image is 1.25 points; test: 500 images):\n")
        print(history_table(bases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
