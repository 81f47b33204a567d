"""DeepSpeed checkpoints with a completion marker, auto-resume and retention.

Layout: ``RUN_DIR/checkpoints/<tag>/`` is a DeepSpeed checkpoint (every rank writes its shards);
``<tag>/COMPLETE`` is written by rank 0 after a barrier, i.e. only once all shards are on disk.
Resume only ever considers tags with a COMPLETE marker, so a kill during a save loses at most the
steps since the previous checkpoint and never yields a half-written one.

The best checkpoint so far is ``best_step_XXXXXXXX``, and the tag ``best`` names the newest
complete one: a new best is written beside the previous one, which is removed only once the new
one is complete, so a kill during that save keeps the previous best.

A save that fails for lack of space (or any other write error) removes its partial directory and
raises :class:`CheckpointError`, a one-line message naming the checkpoint, the free space and the
previous complete checkpoint, which stays intact and is what the next run resumes from.

Loading never runs code stored in a checkpoint: before DeepSpeed unpickles anything (resume,
universal conversion), :func:`check_pickles` scans every ``*.pt`` file statically and refuses any
class or function beyond torch's ``weights_only`` allow-list and DeepSpeed's own state classes.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deitlt_scale.engine.distributed import barrier
from deitlt_scale.errors import UserError

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
BEST = "best"

# Globals DeepSpeed pickles into its own checkpoints (ZeRO 1-3 and bf16 optimizer states, the
# universal format) besides what torch's weights_only unpickler allows: plain state holders whose
# construction runs no user code. Anything else in a checkpoint is refused before loading.
DEEPSPEED_GLOBALS = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)
_FULL_BELOW_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full
# What torch's zip writer raises (as RuntimeError, errno lost) when a write comes up short.
_WRITE_FAILURES = ("file write failed", "unexpected pos", "PytorchStreamWriter failed")


class CheckpointError(UserError):
    """A checkpoint that could not be written, or must not be loaded; the message is one line."""


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def best_tag(step: int) -> str:
    return f"{BEST}_{step_tag(step)}"


def best_dir(root: Path) -> Path | None:
    """The newest complete ``best_step_*`` directory under a checkpoints directory ``root``."""
    found = [
        (int(info["step"]), path)
        for path in root.glob(f"{BEST}_step_*")
        if (info := read_marker(path / COMPLETE)) is not None
    ]
    return max(found)[1] if found else None


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
    if tag == BEST:
        path = best_dir(path.parent) or path
    info = read_marker(path / COMPLETE)
    if info is None:
        return None
    return CheckpointRef(
        path.name, path, int(info["step"]), int(info["epoch"]), int(info.get("world_size", 0))
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
        # Re-saving a tag: unmark it first so a kill mid-save leaves it incomplete.
        (path / COMPLETE).unlink(missing_ok=True)
    barrier()
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as err:
        if not _is_write_failure(err):
            raise
        raise _save_failed(path, run_dir, err, is_main) from None
    barrier()  # every rank's shards are written before the marker
    if is_main:
        marker = {"step": step, "epoch": epoch, "world_size": world_size, "time": time.time()}
        tmp = path / f".{COMPLETE}.partial"
        try:
            _fsync_tree(path)
            tmp.write_text(json.dumps(marker))
            _fsync_file(tmp)
            tmp.replace(path / COMPLETE)
        except OSError as err:
            raise _save_failed(path, run_dir, err, is_main) from None
        if keep_last is not None:
            prune(run_dir, keep_last)
    barrier()
    return path


def _is_write_failure(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return True
    return any(text in str(err) for text in _WRITE_FAILURES)


def _save_failed(
    path: Path, run_dir: str | Path, err: BaseException, is_main: bool
) -> CheckpointError:
    """Remove the partial checkpoint (rank 0) and describe the failure and what survives."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = -1
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or 0 <= free < _FULL_BELOW_BYTES:
        cause = f"no space left on device ({_bytes(free)} free on {path.parent})"
        fix = "free space"
    else:
        cause = f"write error ({' '.join(str(err).split())[:200]})"
        fix = "fix the storage"
    if is_main:
        # The partial files hold no usable state; removing them gives the space back at once.
        shutil.rmtree(path, ignore_errors=True)
    previous = latest_checkpoint(run_dir)
    if previous is None:
        kept = "no complete checkpoint exists yet, so the next run starts from step 0"
    else:
        kept = (
            f"the previous checkpoint {previous.path} (step {previous.step}) is intact and the "
            "next run resumes from it"
        )
    return CheckpointError(
        f"saving checkpoint {path} failed: {cause}; {kept}; {fix}, then run the same command again"
    )


def _bytes(n: int) -> str:
    """``n`` bytes for a message: "0 bytes", "512.0 KiB", "3.2 GiB"; -1 is unknown."""
    if n < 0:
        return "unknown bytes"
    if n < 1024:
        return f"{n} bytes"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.1f} {unit}"


def save_best(engine: Any, run_dir: str | Path, **save_kwargs: Any) -> Path:
    """Save the new best checkpoint (collective, as :func:`save`), then drop the older ones."""
    path = save(engine, run_dir, best_tag(save_kwargs["step"]), **save_kwargs)
    if save_kwargs["is_main"]:
        for old in path.parent.glob(f"{BEST}_step_*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
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
    check_pickles(ref.path)  # the converter unpickles the source with weights_only=False
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


def check_pickles(path: str | Path) -> None:
    """Refuse a checkpoint directory whose ``*.pt`` files would import or call anything beyond
    tensors, plain containers and :data:`DEEPSPEED_GLOBALS` when unpickled.

    The scan reads each file's pickle opcodes without executing them (the same allow-list
    ``torch.load(weights_only=True)`` enforces); DeepSpeed then loads the vetted files itself.
    Raises :class:`CheckpointError` naming the file and the first offending global.
    """
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for file in sorted(Path(path).rglob("*.pt")):
        try:
            found = get_unsafe_globals_in_checkpoint(file)
        except (ValueError, RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
            raise CheckpointError(
                f"checkpoint file {file} cannot be checked without executing it "
                f"({' '.join(str(err).split())[:160]}); refusing to load it"
            ) from None
        unsafe = sorted(set(found) - DEEPSPEED_GLOBALS)
        if unsafe:
            raise CheckpointError(
                f"checkpoint file {file} refers to {unsafe[0]}, which loading would have to "
                "import or call; refusing to unpickle code. Load only checkpoints written by "
                "deitlt train"
            )


def load(engine: Any, ref: CheckpointRef) -> dict[str, Any]:
    """Load model, optimizer and client state on every rank; returns the client state.

    The files are vetted by :func:`check_pickles` first: DeepSpeed unpickles with
    ``weights_only=False``.
    """
    check_pickles(ref.path)
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
