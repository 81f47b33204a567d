"""Running a plan: here, one run after another, or one run per SLURM array element.

Each run keeps its state in ``RUN_DIR/experiment.json`` (:class:`~.state.RunState`), with every
attempt (exit status, wall and CPU seconds, the load average when it started, when it ended,
the CPU). A run that is complete (:func:`~deitlt_scale.experiments.plan.is_complete`) is
skipped; an interrupted one is started again with the same run directory and resumes from its
newest checkpoint. A run directory trained with another configuration is refused rather than
mixed into the results.

``deitlt experiment run`` stops starting runs on SIGTERM or Ctrl-C and passes SIGTERM to the run
in progress (the trainer checkpoints and exits 75); the same command resumes. A failed run is
reported and the runs that do not depend on it go on; the exit status is then 1.
"""

from __future__ import annotations

import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from deitlt_scale.errors import UserError
from deitlt_scale.experiments.plan import Plan, Run, config_difference, is_complete, trained_config
from deitlt_scale.experiments.reuse import Reuse
from deitlt_scale.experiments.state import RunState

EXIT_REQUEUE = 75  # a run stopped by a signal after a checkpoint: run again to resume


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def last_line(log: Path) -> str:
    """The last non-empty line of ``log`` (where a failed command says why)."""
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def check_configuration(run: Run) -> RunState:
    """The run's state, new or recorded; refuses a directory trained with another config."""
    current = trained_config(run)
    state = RunState.read(run)
    if state is None:
        return RunState(list(run.argv), current)
    changed = None if state.config is None else config_difference(state.config, current)
    if changed is not None:
        raise UserError(
            f"{run.run_dir} was trained with another configuration than {run.key} asks for now "
            f"({changed}: the grid, its recipes or the options changed); delete that directory "
            "or use another --out"
        )
    state.argv, state.config = list(run.argv), current
    return state


class _Attempt:
    """Records one attempt of ``run`` in its state file, around the work."""

    def __init__(self, run: Run, state: RunState) -> None:
        self.run, self.state = run, state

    def __enter__(self) -> _Attempt:
        s = self.state
        s.state, s.error = "running", ""
        s.host, s.pid = socket.gethostname(), os.getpid()
        s.slurm_job = _slurm_job()
        self.load = round(os.getloadavg()[0], 2)
        self.started, self.t0, self.cpu0 = _now(), time.perf_counter(), _cpu_seconds()
        s.write(self.run)
        return self

    def finish(self, code: int, stopped: bool = False) -> None:
        """Record the attempt's end; ``stopped``: a signal asked for it (whatever the code)."""
        s, run = self.state, self.run
        s.attempts.append({
            "started": self.started, "ended": _now(), "exit": code, "host": s.host,
            "wall_s": round(time.perf_counter() - self.t0, 2),
            "cpu_s": round(_cpu_seconds() - self.cpu0, 2), "load_before": self.load,
            "cpu": cpu_model(),
        })  # fmt: skip
        if code == 0:
            s.state = "done"
        elif code == EXIT_REQUEUE or stopped:
            s.state = "stopped"
        else:
            s.state, s.error = "failed", last_line(run.log) or f"exit status {code}"
        s.write(run)

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None and self.state.state == "running":
            self.finish(1)


def cpu_model() -> str:
    """The CPU's name with its family and model numbers: machines that share a marketing name
    ("Intel(R) Xeon(R) Processor") run at different speeds, and wall times must say which."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f", family {fields['cpu family']} model {fields['model']}"
    return name


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _slurm_job() -> str:
    job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if job and task:
        return f"{job}_{task}"
    return os.environ.get("SLURM_JOB_ID", "")


# --------------------------------------------------------------------------------------------
# Here


class _Stop:
    """SIGTERM / Ctrl-C: start nothing new; the run in progress gets SIGTERM and checkpoints."""

    def __init__(self) -> None:
        self.requested = False
        self.child: subprocess.Popen | None = None

    def __call__(self, signum: int, _frame: object) -> None:
        self.requested = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)


def deitlt_command(argv: tuple[str, ...] | list[str], log: Path, stop: _Stop | None = None) -> int:
    """``deitlt ARGV`` in a child process, its output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deitlt_scale.cli", *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as out:
        out.write(f"\n$ deitlt {' '.join(argv)}\n")
        out.flush()
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        if stop is not None:
            stop.child = child
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # the child got SIGINT too and stops cleanly
                if stop is not None:
                    stop(signal.SIGINT, None)


def prepare_data(plan: Plan, stop: _Stop | None = None) -> None:
    """``deitlt data prepare`` of the grid's data into ``OUT/data``, once."""
    if (plan.data / "meta.json").is_file():
        return
    log = plan.out / "data.log"
    code = deitlt_command(["data", "prepare", *plan.grid.data, "--out", str(plan.data)], log, stop)
    if code != 0:
        raise UserError(f"data prepare failed (exit {code}): {last_line(log)}; see {log}")


def run_plan(plan: Plan, runs: list[Run] | None = None, reuse: Sequence[Path] = ()) -> int:
    """``runs`` (default: every run of ``plan``) in order; 0 when all are complete, 75 when
    stopped by a signal, 1 when some failed (the others were run). A run that a complete run
    of a ``reuse`` directory trained already is copied from there (:mod:`.reuse`)."""
    runs = plan.runs if runs is None else runs
    stop = _Stop()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    failed: set[str] = set()
    try:
        prepare_data(plan, stop)
        taker = Reuse(plan, list(reuse))
        for i, run in enumerate(runs, 1):
            label = f"[{i}/{len(runs)}] {run.key}"
            if stop.requested:
                break
            blocked = [k for k in run.needs if k in failed]
            if blocked:
                print(f"{label}: not started, {blocked[0]} failed", flush=True)
                failed.add(run.key)
                continue
            source = taker.take(run)
            if source is not None:
                print(f"{label}: copied from {source}", flush=True)
                continue
            state = check_configuration(run)
            if is_complete(run):
                print(f"{label}: complete ({state.wall_s:.0f} s recorded)", flush=True)
                continue
            print(f"{label}: training ({run.log})", flush=True)
            with _Attempt(run, state) as attempt:
                code = deitlt_command(run.argv, run.log, stop)
                attempt.finish(code, stopped=stop.requested)
            wall = state.attempts[-1]["wall_s"]
            if code == 0:
                print(f"{label}: done in {wall:.0f} s", flush=True)
            elif code == EXIT_REQUEUE or stop.requested:
                print(f"{label}: stopped after {wall:.0f} s (exit {code})", flush=True)
                break
            else:
                print(f"{label}: failed (exit {code}): {state.error}", flush=True)
                failed.add(run.key)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop.requested:
        print("stopped; run the same command again to resume", flush=True)
        return EXIT_REQUEUE
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------
# One SLURM array element


def run_element(plan: Plan, key: str) -> int:
    """The run ``key`` in this process (an element of a submitted array: ranks come from
    SLURM, and the trainer's exit status 75 asks slurm/common.sh to requeue the element)."""
    runs = plan.by_key()
    if key not in runs:
        raise UserError(f"{plan.out} has no run {key!r} in its plan")
    run = runs[key]
    missing = [k for k in run.needs if not is_complete(runs[k])]
    if missing:
        raise UserError(f"{run.key} needs {missing[0]}, which is not complete")
    if is_complete(run):
        print(f"{run.key}: complete", flush=True)
        return 0
    from deitlt_scale.cli import main as cli_main
    from deitlt_scale.engine.distributed import detect_launch

    state = check_configuration(run)
    if detect_launch().rank != 0:  # one state file: rank 0 keeps it
        return cli_main(list(run.argv))
    with _Attempt(run, state) as attempt:
        code = cli_main(list(run.argv))
        attempt.finish(code)
    return code
