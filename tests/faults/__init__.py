"""Fault injection on CPU with the real stack: the helpers every fault module shares.

A fault test launches `deitlt train` as a user does (tests/test_trainer.py's tiny recipe), injects
one fault (a signal, a full disk, a damaged shard, a dead tracking server, a hostile pickle...) and
checks the outcome the project guarantees. Every such test carries
``@pytest.mark.fault(description, expected)``; tests/faults/conftest.py records the outcomes and
scripts/reliability_table.py turns them into the table of docs/reliability.md.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from test_trainer import RECIPE, REPO, STEP_LINE, final_weights, losses, tiny_overrides

__all__ = [
    "RECIPE",
    "REPO",
    "Finished",
    "TrainProcess",
    "WriteTrap",
    "assert_same_weights",
    "final_weights",
    "kill_strays",
    "losses",
    "one_line_error",
    "resumed_at",
    "tiny_overrides",
    "train_env",
]

# Launcher variables a test process may have inherited; a leftover RANK would turn a single
# `deitlt train` into a torchrun rank waiting for peers.
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
WAIT_S = 300  # bound on any wait for a training process; never an assertion on speed
RESUMED = re.compile(r"^resumed from (\S+) at step (\d+)$", re.MULTILINE)
_STARTED: list[subprocess.Popen[str]] = []  # every launch, so none outlives the session


def train_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a launched `deitlt train`: one CPU thread, unbuffered, no launcher."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(extra or {})
    return env


@dataclass
class Finished:
    """What a finished (or killed) launch left: exit status and its two streams."""

    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return f"exit {self.returncode}\nSTDOUT:\n{self.stdout[-3000:]}\nSTDERR:\n{self.stderr[-3000:]}"


@dataclass
class TrainProcess:
    """A running `deitlt train`, read line by line so a fault can be injected at a given step."""

    proc: subprocess.Popen[str]
    stderr_path: Path
    lines: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, overrides: list[str], log_dir: Path, env: dict[str, str] | None = None):
        log_dir.mkdir(parents=True, exist_ok=True)
        stderr_path = log_dir / f"stderr-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "deitlt_scale.cli", "train", str(RECIPE), *overrides]
        with open(stderr_path, "w") as stderr:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=train_env(env), cwd=REPO
            )
        _STARTED.append(proc)
        return cls(proc, stderr_path)

    def wait_for_step(self, step: int) -> int:
        """Read stdout until the line of optimizer step >= ``step``; returns the step seen."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            match = STEP_LINE.match(line)
            if match and int(match.group(1)) >= step:
                return int(match.group(1))
        self.proc.wait(timeout=WAIT_S)
        raise AssertionError(f"the run ended before step {step}:\n{self.finish().describe()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> Finished:
        """SIGKILL now (nothing runs after it: no handler, no flush) and collect the output."""
        self.proc.send_signal(signal.SIGKILL)
        return self.finish()

    def finish(self) -> Finished:
        """Wait for the end (bounded) and return exit status and the whole output."""
        try:
            rest, _ = self.proc.communicate(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
        return Finished(
            self.proc.returncode, "".join(self.lines) + (rest or ""), self.stderr_path.read_text()
        )


class WriteTrap:
    """A named pipe at the path a process is about to write, so the test catches it mid-write.

    Opening a FIFO for writing blocks until a reader opens it; the test opens it, reads the first
    bytes (the write has begun, the file is half written) and kills the writer. :meth:`release`
    then leaves a regular file with exactly those bytes, as a kill during a real write does.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        self.path = path
        self.head = b""
        self._fd: int | None = None

    def wait_for_writer(self, proc: subprocess.Popen[str], chunk: int = 4096) -> bytes:
        """Block until ``proc`` opens the file and has written at least one byte into it."""
        opened: dict[str, int] = {}

        def open_reader() -> None:
            opened["fd"] = os.open(self.path, os.O_RDONLY)  # returns once the writer opened

        reader = threading.Thread(target=open_reader, daemon=True)
        reader.start()
        deadline = time.monotonic() + WAIT_S
        while reader.is_alive() and proc.poll() is None and time.monotonic() < deadline:
            reader.join(timeout=0.2)
        if reader.is_alive():  # unblock our reader; the writer never came
            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            reader.join()
            os.close(opened["fd"])
            raise AssertionError(f"no process opened {self.path} for writing")
        self._fd = opened["fd"]
        self.head = os.read(self._fd, chunk)
        return self.head

    def release(self) -> None:
        """Close the pipe (after the writer was killed) and leave the partial bytes as a file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)
        if self.head:
            self.path.write_bytes(self.head)


def kill_strays() -> None:
    """SIGKILL launches still running (a test that failed half-way); by their own PIDs."""
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _STARTED.clear()


def one_line_error(finished: Finished) -> str:
    """The error line a failed command printed last on stderr; fails on a traceback."""
    assert "Traceback" not in finished.stderr, finished.describe()
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert lines, finished.describe()
    return lines[-1]


def resumed_at(stdout: str) -> tuple[str, int] | None:
    """(checkpoint directory name, step) of the "resumed from" line, or None."""
    match = RESUMED.search(stdout)
    return (Path(match.group(1)).name, int(match.group(2))) if match else None


def assert_same_weights(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert want.keys() == got.keys()
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, f"{len(differ)} tensors differ, first {differ[0]}"
