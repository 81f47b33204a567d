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

import contextlib
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
from typing import TYPE_CHECKING, Any

from deitlt_scale.engine.distributed import barrier
from deitlt_scale.errors import UserError

if TYPE_CHECKING:
    import torch

CHECKPOINTS = "checkpoints"
EMA_KEY = "ema"  # client-state key of EMA weights, when a run keeps them
_PREFIXES = ("module.", "_orig_mod.")  # DeepSpeed/DDP and torch.compile wrappers
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
    """One COMPLETE DeepSpeed checkpoint directory ``path`` (= ``root / tag``)."""

    tag: str
    path: Path
    step: int
    epoch: int | None
    world_size: int  # processes that wrote it (0 when not recorded)
    run_dir: Path | None = None  # the run directory holding it, when it is one

    @property
    def root(self) -> Path:
        """The directory handed to ``engine.save_checkpoint`` / ``load_checkpoint``."""
        return self.path.parent


def _complete_ref(path: Path, run_dir: Path | None = None) -> CheckpointRef | None:
    info = read_marker(path / COMPLETE)
    if info is None:
        return None
    epoch = info.get("epoch")
    return CheckpointRef(
        path.name,
        path,
        int(info["step"]),
        None if epoch is None else int(epoch),
        int(info.get("world_size", 0)),
        run_dir,
    )


def complete_checkpoints(run_dir: str | Path) -> list[CheckpointRef]:
    """Complete step checkpoints of a run (``step_*``, the ones retention prunes), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    refs = [ref for p in root.glob("step_*") if (ref := _complete_ref(p)) is not None]
    return sorted(refs, key=lambda r: r.step)


def newest_complete(root: Path, run_dir: Path | None = None) -> CheckpointRef | None:
    """The latest checkpoint under a checkpoints directory: the COMPLETE ``step_*`` or
    ``best_step_*`` with the highest step (a ``step_*`` tag wins a tie). Resume, eval, export and
    analysis all mean this by "latest"."""
    found = []
    for pattern in ("step_*", f"{BEST}_step_*"):
        for path in root.glob(pattern):
            if (ref := _complete_ref(path, run_dir)) is not None:
                found.append(((ref.step, ref.tag.startswith("step_"), ref.tag), ref))
    return max(found, key=lambda item: item[0])[1] if found else None


def latest_checkpoint(run_dir: str | Path) -> CheckpointRef | None:
    """The checkpoint a run resumes from (see :func:`newest_complete`), or None."""
    return newest_complete(Path(run_dir) / CHECKPOINTS, Path(run_dir))


def find_checkpoint(source: str | Path, tag: str | None = None) -> CheckpointRef:
    """Resolve a run directory, a checkpoints directory or one tag directory to a checkpoint.

    ``tag``: ``None`` or ``"latest"`` picks :func:`newest_complete`; ``"best"`` the newest
    complete ``best_step_*``; ``"step_00001234"`` (or any tag) names one, which must be COMPLETE.
    Raises :class:`CheckpointError` saying what exists instead.
    """
    source = Path(source)
    if not source.exists():
        raise CheckpointError(
            f"{source} does not exist; pass a run directory or a checkpoint directory"
        )
    if (source / CHECKPOINTS).is_dir():
        run_dir: Path | None = source
        root = source / CHECKPOINTS
    elif (source / COMPLETE).exists() or list(source.glob("*model_states.pt")):
        if tag not in (None, "latest", source.name):
            raise CheckpointError(
                f"{source} is checkpoint {source.name!r} but --tag {tag} was given"
            )
        root, tag = source.parent, source.name
        run_dir = root.parent
    elif source.is_dir() and any(p.is_dir() for p in source.iterdir()):
        run_dir, root = source.parent, source
    else:
        raise CheckpointError(
            f"{source} holds no DeepSpeed checkpoints; pass RUN_DIR, RUN_DIR/{CHECKPOINTS} or "
            f"RUN_DIR/{CHECKPOINTS}/<tag>"
        )
    if run_dir is not None and not (run_dir / "config.yaml").is_file():
        run_dir = None
    if tag in (None, "latest"):
        found = newest_complete(root, run_dir)
        if found is None:
            raise CheckpointError(
                f"no {COMPLETE} checkpoint in {root} (a save that did not finish is never used); "
                "train until a checkpoint is written"
            )
        return found
    if tag == BEST and (newest_best := best_dir(root)) is not None:
        tag = newest_best.name
    ref = _complete_ref(root / tag, run_dir)
    if ref is None:
        if not (root / tag).is_dir():
            known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise CheckpointError(
                f"checkpoint tag {tag!r} not found in {root}; available: {', '.join(known) or 'none'}"
            )
        raise CheckpointError(
            f"checkpoint {root / tag} is incomplete (no valid {COMPLETE} marker, the save did not "
            "finish); pick another with --tag"
        )
    return ref


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
    return CheckpointRef(out.name, out, ref.step, ref.epoch, ref.world_size, ref.run_dir)


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


# --------------------------------------------------------------------------------------------
# Reading weights (export, eval, analysis)


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DeepSpeed/DDP ``module.`` and torch.compile ``_orig_mod.`` prefixes (any order)."""
    out = {}
    for key, value in state.items():
        name = key
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix) :]
                    changed = True
        if name in out:
            raise CheckpointError(f"two checkpoint tensors map to {name!r} after removing prefixes")
        out[name] = value
    return out


def _model_states_file(ckpt: Path) -> Path:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (ckpt / name).is_file():
            return ckpt / name
    raise CheckpointError(f"{ckpt} has no DeepSpeed model states file (mp_rank_00_model_states.pt)")


def _load_pickle(path: Path) -> dict[str, Any]:
    import torch

    # DeepSpeed's format is pickled Python objects (configs, optimizer state): scanned first,
    # so that a file referring to anything beyond tensors and DeepSpeed's state classes is
    # refused before it is unpickled. The export itself is pickle-free.
    check_pickles(path.parent)
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a DeepSpeed model states file")
    return state


def zero_stage_of(ckpt: Path) -> int:
    """The ZeRO stage a checkpoint was written with (from the saved DeepSpeed config)."""
    states = _load_pickle(_model_states_file(ckpt))
    stage = (states.get("ds_config") or {}).get("zero_optimization", {}).get("stage")
    if stage is None:
        stage = 1 if list(ckpt.glob("*optim_states.pt")) else 0
    return int(stage)


def consolidate(ckpt: Path) -> tuple[dict[str, torch.Tensor], int]:
    """The full student state dict of one checkpoint directory (fp32 for ZeRO 1-3) and its stage.

    ZeRO 1-3 and bf16 runs read the fp32 master partitions of every rank; stage 0 without an
    optimizer partition file reads the module states as saved.
    """
    stage = zero_stage_of(ckpt)
    if stage >= 1 or list(ckpt.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 reports progress on stdout; keep stdout for the command's own output.
        with contextlib.redirect_stdout(sys.stderr):
            check_pickles(ckpt)
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:
        state = dict(_load_pickle(_model_states_file(ckpt))["module"])
    return strip_prefixes(state), stage


def ema_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The EMA weights saved in the checkpoint's client state, or an CheckpointError."""
    import torch

    states = _load_pickle(_model_states_file(ckpt))
    ema = states.get(EMA_KEY)
    if isinstance(ema, dict) and isinstance(ema.get("state_dict"), dict):
        ema = ema["state_dict"]
    if not isinstance(ema, dict) or not ema:
        raise CheckpointError(
            f"checkpoint {ckpt} holds no EMA weights (no '{EMA_KEY}' in its client state); "
            "export without --ema, or train with EMA enabled"
        )
    if not all(isinstance(v, torch.Tensor) for v in ema.values()):
        raise CheckpointError(f"checkpoint {ckpt}: client state '{EMA_KEY}' is not a state dict")
    return strip_prefixes({k: v.float() for k, v in ema.items()})


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{what} does not match the model it should load into: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
