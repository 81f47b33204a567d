"""``deitlt experiment status OUT``: where every run of a grid stands, from its state file."""

from __future__ import annotations

import os
import socket
import statistics

from deitlt_scale.experiments.plan import Plan, Run, is_complete
from deitlt_scale.experiments.state import RunState


def run_status(run: Run) -> tuple[str, RunState | None]:
    """``done | running | stopped | failed | interrupted | pending``; ``interrupted``: marked
    running by a process of this host that is gone (killed without a word)."""
    state = RunState.read(run)
    if is_complete(run):
        return "done", state
    if state is None:
        return "pending", None
    if state.state == "running" and state.host == socket.gethostname() and not state.slurm_job:
        try:
            os.kill(state.pid, 0)
        except ProcessLookupError:
            return "interrupted", state
        except PermissionError:
            pass
    return ("pending" if state.state == "done" else state.state), state


def status_table(plan: Plan) -> str:
    """One line per run: key, status, attempts, recorded wall seconds, and a note: for a failed
    run the last line of its log, for a copied one where from; then the count per status."""
    lines = [f"{'run':<34}{'status':<13}{'attempts':>9}{'wall s':>9}  note"]
    counts: dict[str, int] = {}
    statuses = [(run, *run_status(run)) for run in plan.runs]
    for run, status, state in statuses:
        counts[status] = counts.get(status, 0) + 1
        attempts = len(state.attempts) if state else 0
        wall = f"{state.wall_s:.0f}" if state else "-"
        where = f" ({state.slurm_job or state.host})" if status == "running" and state else ""
        note = state.error if state and status == "failed" else ""
        if state and state.reused_from and status == "done":
            note = f"copied from {state.reused_from}"
        lines.append(f"{run.key:<34}{status + where:<13}{attempts:>9}{wall:>9}  {note}".rstrip())
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    left = time_left(statuses)
    if left:
        lines.append(left)
    return "\n".join(lines)


def time_left(statuses: list[tuple[Run, str, RunState | None]]) -> str:
    """About how long the runs not done will take here, one after another: each the median wall
    time of its row's done runs, or of its stage's when none of its row is done. Empty when
    everything is done or nothing is to go by. ``statuses``: (run, :func:`run_status`) of each."""
    done: dict[tuple[str, str], list[float]] = {}
    todo: list[Run] = []
    for run, status, state in statuses:
        if status == "done" and state is not None and state.attempts:
            done.setdefault((run.stage, run.name), []).append(state.wall_s)
        elif status != "done":
            todo.append(run)
    if not todo:
        return ""
    per_stage = {
        stage: [w for (s, _), walls in done.items() if s == stage for w in walls]
        for stage in ("teachers", "rows")
    }
    seconds, guessed = 0.0, 0
    for run in todo:
        walls = done.get((run.stage, run.name)) or per_stage[run.stage]
        if not walls:
            return f"{len(todo)} runs not done; no done run of their stage to estimate from"
        guessed += (run.stage, run.name) not in done
        seconds += statistics.median(walls)
    hours, minutes = divmod(round(seconds / 60), 60)
    basis = "the median wall time of the done runs of each row"
    if guessed:
        basis += f"; {guessed} of them from their stage's, as none of their row is done"
    return f"{len(todo)} runs not done: about {hours} h {minutes:02d} min here ({basis})"
