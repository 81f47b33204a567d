"""DeepSpeed checkpoints with a completion marker, auto-resume and retention.

Layout: ``RUN_DIR/checkpoints/<tag>/`` is a DeepSpeed checkpoint (every rank writes its shards);
``<tag>/COMPLETE`` is written by rank 0 after a barrier, i.e. only once all shards are on disk.
Resume only ever considers tags with a COMPLETE marker, so a kill during a save loses at most the
steps since the previous checkpoint and never yields a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deitlt_scale.engine.distributed import barrier

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
BEST = "best"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class CheckpointRef:
    tag: str
    path: Path
    step: int
    epoch: int
    world_size: int


def complete_checkpoints(run_dir: str | Path) -> list[CheckpointRef]:
    """Complete step checkpoints of a run, oldest first ("best" excluded)."""
    root = Path(run_dir) / CHECKPOINTS
    refs = []
    for marker in root.glob(f"step_*/{COMPLETE}"):
        info = read_marker(marker)
        if info is not None:
            refs.append(
                CheckpointRef(
                    marker.parent.name,
                    marker.parent,
                    int(info["step"]),
                    int(info["epoch"]),
                    int(info.get("world_size", 0)),
                )
            )
    return sorted(refs, key=lambda r: r.step)


def latest_checkpoint(run_dir: str | Path) -> CheckpointRef | None:
    refs = complete_checkpoints(run_dir)
    return refs[-1] if refs else None


def find_checkpoint(run_dir: str | Path, tag: str) -> CheckpointRef | None:
    """``tag`` is "latest", "best" or a step tag; None when absent or incomplete."""
    if tag == "latest":
        return latest_checkpoint(run_dir)
    path = Path(run_dir) / CHECKPOINTS / tag
    info = read_marker(path / COMPLETE)
    if info is None:
        return None
    return CheckpointRef(
        tag, path, int(info["step"]), int(info["epoch"]), int(info.get("world_size", 0))
    )


def save(
    engine: Any,
    run_dir: str | Path,
    tag: str,
    *,
    step: int,
    epoch: int,
    world_size: int,
    client_state: dict[str, Any],
    is_main: bool,
    keep_last: int | None = None,
) -> Path:
    """Save on all ranks (collective), then mark complete and prune. Must run on every rank."""
    root = Path(run_dir) / CHECKPOINTS
    path = root / tag
    if is_main:
        # Re-saving a tag (e.g. "best"): unmark it first so a kill mid-save leaves it incomplete.
        (path / COMPLETE).unlink(missing_ok=True)
    barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    barrier()  # every rank's shards are written before the marker
    if is_main:
        _fsync_tree(path)
        marker = {"step": step, "epoch": epoch, "world_size": world_size, "time": time.time()}
        tmp = path / f".{COMPLETE}.partial"
        tmp.write_text(json.dumps(marker))
        _fsync_file(tmp)
        tmp.replace(path / COMPLETE)
        if keep_last is not None:
            prune(run_dir, keep_last)
    barrier()
    return path


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete step checkpoints; drop older and stale partial ones."""
    refs = complete_checkpoints(run_dir)
    for ref in refs[:-keep_last]:
        shutil.rmtree(ref.path, ignore_errors=True)
    newest = refs[-1].step if refs else -1
    for path in (Path(run_dir) / CHECKPOINTS).glob("step_*"):
        if not (path / COMPLETE).exists() and _tag_step(path.name) < newest:
            shutil.rmtree(path, ignore_errors=True)
    for path in (Path(run_dir) / CHECKPOINTS).glob("universal_step_*"):
        if _tag_step(path.name.removeprefix("universal_")) < newest:
            shutil.rmtree(path, ignore_errors=True)


def to_universal(ref: CheckpointRef, is_main: bool) -> CheckpointRef:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (once), so that a run can
    resume on another number of processes. Must run on every rank; rank 0 converts."""
    out = ref.path.with_name(f"universal_{ref.tag}")
    if is_main and not (out / COMPLETE).exists():
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        cmd = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
            "--input_folder", str(ref.path), "--output_folder", str(partial),
            "--num_extract_workers", "1", "--num_merge_workers", "1",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = " ".join(done.stderr.strip().splitlines()[-1:])
            raise RuntimeError(f"converting {ref.path} to a universal checkpoint failed: {tail}")
        shutil.copy(ref.path / COMPLETE, partial / COMPLETE)
        shutil.rmtree(out, ignore_errors=True)
        partial.replace(out)
    barrier()
    return CheckpointRef(out.name, out, ref.step, ref.epoch, ref.world_size)


def load(engine: Any, ref: CheckpointRef) -> dict[str, Any]:
    """Load model, optimizer and client state on every rank; returns the client state."""
    _, client_state = engine.load_checkpoint(
        str(ref.path.parent), tag=ref.tag, load_module_strict=True, load_lr_scheduler_states=False
    )
    if client_state is None:
        raise RuntimeError(f"checkpoint {ref.path} could not be loaded")
    return client_state


def _tag_step(name: str) -> int:
    try:
        return int(name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def read_marker(marker: Path) -> dict[str, Any] | None:
    """The COMPLETE marker's content, or None when absent or unreadable (= not complete)."""
    try:
        data = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("step"), int) else None


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            _fsync_file(file)
