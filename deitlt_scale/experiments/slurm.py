"""``deitlt experiment submit``: a grid as SLURM job arrays.

The dataset, when ``OUT/data`` is not prepared yet, is one job (``slurm/prepare_data.sh``).
Each teacher is one array and each row is one array, of the seeds still to train: array task
``s`` trains seed ``s`` (``slurm/experiment.sh OUT STAGE NAME`` runs ``deitlt experiment
element``). A row's elements whose teacher (or the row they start from) is submitted in the same
call wait for that run's element: ``--dependency=aftercorr:ARRAY`` (task ``s`` after task
``s``); an element whose needs are already complete starts at once. ``--max-parallel N`` caps the running
elements of each array (``--array=...%N``). Each element is an ordinary requeue-safe job, so a
preempted element resumes from its checkpoint; a failed one is resubmitted alone with
``--only ROW --seeds S``.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deitlt_scale.errors import UserError
from deitlt_scale.experiments.plan import Plan, Run, is_complete

SCRIPT = "slurm/experiment.sh"
PREPARE = "slurm/prepare_data.sh"


@dataclass
class Submission:
    stage: str  # "data", "teachers", "rows"
    name: str
    seeds: tuple[int, ...]
    job: str  # the job id sbatch returned (a placeholder on a dry run)
    command: list[str]


def _array(seeds: Sequence[int], max_parallel: int | None) -> str:
    spec = ",".join(map(str, seeds))
    return f"{spec}%{max_parallel}" if max_parallel else spec


def _sbatch(command: list[str], dry_run: bool, cwd: Path, what: str) -> str:
    """The job id of ``command``; on a dry run a placeholder naming ``what``."""
    if dry_run:
        return f"<{what} job>"
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise UserError(f"`{shlex.join(command)}` failed: {done.stderr.strip() or done.stdout}")
    return done.stdout.strip().split(";")[0]


def submit(
    plan: Plan,
    runs: list[Run],
    repo: Path,
    max_parallel: int | None = None,
    sbatch_options: Sequence[str] = (),
    dry_run: bool = False,
) -> list[Submission]:
    """Submit the incomplete runs of ``runs``; returns what was submitted, in order."""
    if max_parallel is not None and max_parallel < 1:
        raise UserError(f"--max-parallel must be >= 1, got {max_parallel}")
    todo = [r for r in runs if not is_complete(r)]
    out: list[Submission] = []
    base = ["sbatch", "--parsable", *sbatch_options]
    data_job = ""
    if todo and not (plan.data / "meta.json").is_file():
        log = plan.out / "data.log"
        command = [*base, "--job-name=deitlt-experiment-data", f"--output={log}",
                   str(repo / PREPARE), *plan.grid.data, "--out", str(plan.data)]  # fmt: skip
        data_job = _sbatch(command, dry_run, repo, "data")
        out.append(Submission("data", "data", (), data_job, command))
    by_key = plan.by_key()
    element_job: dict[str, str] = {}  # run key -> the array job (this call) that trains it
    for stage in ("teachers", "rows"):
        groups: dict[str, list[Run]] = {}
        for run in todo:
            if run.stage == stage:
                groups.setdefault(run.name, []).append(run)
        for name, members in groups.items():
            # Elements whose unfinished needs sit in the same arrays go in one array.
            parts: dict[tuple[str, ...], list[Run]] = {}
            for run in members:
                pending = [k for k in run.needs if not is_complete(by_key[k])]
                unknown = [k for k in pending if k not in element_job]
                if unknown:
                    raise UserError(
                        f"{run.key} needs {unknown[0]}, which is neither complete nor submitted "
                        "now; submit it too (leave out --only, or name its row)"
                    )
                jobs = tuple(sorted({element_job[k] for k in pending}))
                parts.setdefault(jobs, []).append(run)
            for jobs, part in parts.items():
                depends = [f"aftercorr:{j}" for j in jobs]
                if data_job:
                    depends.append(f"afterok:{data_job}")
                seeds = tuple(r.seed for r in part)
                log = part[0].run_dir.parent / f"{name}-seed%a.log"
                if not dry_run:  # SLURM opens the log before the job runs: its folder must exist
                    log.parent.mkdir(parents=True, exist_ok=True)
                command = [
                    *base,
                    f"--array={_array(seeds, max_parallel)}",
                    f"--job-name=deitlt-{plan.grid.name}-{name}",
                    f"--output={log}",
                ]
                if depends:
                    command.append(f"--dependency={','.join(depends)}")
                command += [str(repo / SCRIPT), str(plan.out), stage, name]  # fmt: skip
                job = _sbatch(command, dry_run, repo, f"{stage}/{name}")
                element_job.update({r.key: job for r in part})
                out.append(Submission(stage, name, seeds, job, command))
    return out
