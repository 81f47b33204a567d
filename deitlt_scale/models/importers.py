"""Convert published teacher checkpoints (METHOD.md 3.1) into the project's teacher file.

Formats (all PyTorch pickles, read with ``torch.load(weights_only=True)``, never executing code):

* ``paco``: a PaCo/MoCo training checkpoint, ``{"state_dict": ...}`` whose keys (usually under
  a ``module.`` prefix) are ``encoder_q.*`` (the ResNet with an MLP projection ``encoder_q.fc.*``),
  ``linear.*`` (the K-way classifier on the pooled feature), ``encoder_k.*``, ``linear_k.*`` and the
  ``queue*`` buffers. The teacher is ``encoder_q`` minus its projection, with ``linear`` as the
  classifier; everything else is training state and is dropped.
* ``ldam``: an LDAM-DRW(-SAM) checkpoint, ``{"model": ...}`` or ``{"state_dict": ...}``, classifier
  named ``linear`` or ``fc``, optionally a cosine ``NormedLinear`` (detected: no bias).
* ``torchvision``: a bare state dict (or one under ``state_dict``/``model``) in the teacher's own
  layout, e.g. torchvision's ResNet-50.
* ``timm``: a state dict (bare, or under ``state_dict``/``model``, as timm's and DeiT's training
  scripts save it) of the timm model ``--arch`` (e.g. ``regnety_160``, the DeiT baseline's
  teacher). Its input size and normalisation default to timm's pretrained_cfg of that name.

A ``module.`` prefix is stripped from the keys that carry it, and only from those.
"""

from __future__ import annotations

import argparse
import pickle
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deitlt_scale.errors import UserError
from deitlt_scale.models.teacher_file import (
    INFO,
    WEIGHTS,
    TeacherInfo,
    load_state_strict,
    load_teacher,
    save_teacher,
)
from deitlt_scale.models.teachers import (
    CLASSIFIER,
    FEATURE_DIM,
    TEACHER_ARCHS,
    create_teacher_arch,
    is_timm_arch,
    timm_input_config,
)

FORMATS = ("paco", "ldam", "torchvision", "timm")

# Benign classes some training scripts store next to the weights; anything else that would make
# the unpickler call into Python code is refused.
_SAFE_GLOBALS = [argparse.Namespace]


@dataclass(frozen=True)
class ImportReport:
    out: Path
    info: TeacherInfo
    kept: int  # tensors in the teacher file
    dropped: tuple[str, ...]  # top-level key groups left out (encoder_k, queue, ...)
    max_abs_diff: float  # between the source tensors' logits and the reloaded file's


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; a file that would need to run code to
    load (a pickled function or class outside the allow-list) is a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise UserError(
                f"checkpoint {path} refers to {found.group(1)}, which loading would have to "
                "import or call; refusing to unpickle code. Re-save only its tensors where you "
                "trust the file (see docs/teachers.md)"
            ) from None
        raise UserError(
            f"checkpoint {path} cannot be read without executing code or is not a PyTorch "
            "checkpoint; re-save only its tensors where you trust the file (see docs/teachers.md)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        msg = " ".join(str(err).split())[:200]
        raise UserError(f"checkpoint {path} is not a readable PyTorch checkpoint: {msg}") from None


def _tensor_dict(obj: Any, keys: tuple[str, ...], where: str) -> dict[str, Tensor]:
    """The state dict inside a checkpoint: under the first of ``keys`` present, else ``obj``."""
    if isinstance(obj, dict):
        for key in keys:
            if key in obj:
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise UserError(
            f"{where} holds no state dict (looked for {', '.join(repr(k) for k in keys)} "
            "and a bare mapping of tensors); check --format"
        )
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state or not all(isinstance(k, str) for k in state):
        raise UserError(f"{where} holds no named tensors; check --format")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def convert_state(
    fmt: str, checkpoint: Any, arch: str, where: str
) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """Map a loaded checkpoint to the teacher's key layout.

    Returns ``(state, dropped)``: the teacher state dict (classifier renamed to ``linear`` for
    resnet32 or ``fc`` for resnet50) and the sorted top-level names of what was left out.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "timm":
        if not is_timm_arch(arch):
            raise UserError(
                f"--format timm needs a timm model name as --arch, got {arch!r}"
                + (
                    " (import it with --format paco, ldam or torchvision)"
                    if arch in TEACHER_ARCHS
                    else ""
                )
            )
        return _tensor_dict(checkpoint, ("state_dict", "model"), where), ()
    if arch not in TEACHER_ARCHS:
        raise UserError(
            f"--format {fmt} needs --arch {' or '.join(TEACHER_ARCHS)}, got {arch!r}"
            + (" (a timm model: use --format timm)" if is_timm_arch(arch) else "")
        )
    classifier = CLASSIFIER[arch]
    if fmt == "paco":
        src = _tensor_dict(checkpoint, ("state_dict", "model"), where)
        if not any(k.startswith("encoder_q.") for k in src):
            raise UserError(
                f"{where} has no encoder_q.* keys, so it is not a PaCo/MoCo checkpoint; "
                "try --format ldam or --format torchvision"
            )
        if "linear.weight" not in src:
            raise UserError(f"{where} has no linear.weight (the PaCo classifier); check --format")
        state, dropped = {}, set()
        for key, value in src.items():
            if key.startswith("encoder_q.fc."):
                dropped.add("encoder_q.fc")  # the MoCo projection head, unused at inference
            elif key.startswith("encoder_q."):
                state[key[len("encoder_q.") :]] = value
            elif key.startswith("linear."):
                state[classifier + key[len("linear") :]] = value
            else:
                dropped.add(key.split(".")[0])
        return state, tuple(sorted(dropped))
    keys = ("model", "state_dict") if fmt == "ldam" else ("state_dict", "model")
    src = _tensor_dict(checkpoint, keys, where)
    state = {}
    for key, value in src.items():
        head, _, rest = key.partition(".")
        # LDAM-style checkpoints name the classifier linear (CIFAR) or fc (ImageNet layouts).
        if fmt == "ldam" and head in ("linear", "fc") and rest in ("weight", "bias"):
            key = f"{classifier}.{rest}"
        state[key] = value
    return state, ()


def _classifier_check(state: dict[str, Tensor], arch: str, num_classes: int, where: str) -> bool:
    """Checks the classifier's class count; returns whether it is a cosine NormedLinear."""
    if is_timm_arch(arch):
        # timm's own classifier; a wrong class count fails the strict load, naming the tensor.
        return False
    name = CLASSIFIER[arch]
    weight = state.get(f"{name}.weight")
    if weight is None or weight.ndim != 2:
        raise UserError(f"{where} has no 2-D classifier {name}.weight for --arch {arch}")
    normed = f"{name}.bias" not in state
    # nn.Linear stores (classes, features); NormedLinear stores (features, classes).
    classes, feat = (weight.shape[1], weight.shape[0]) if normed else tuple(weight.shape)
    if feat != FEATURE_DIM[arch]:
        raise UserError(
            f"{where}: classifier {name}.weight has shape {tuple(weight.shape)}, i.e. "
            f"{feat}-d features, but --arch {arch} pools {FEATURE_DIM[arch]}-d features; "
            "check --arch"
        )
    if classes != num_classes:
        raise UserError(
            f"{where}: classifier {name}.weight has shape {tuple(weight.shape)}, i.e. {classes} "
            f"classes, but --num-classes is {num_classes}"
        )
    return normed


def import_checkpoint(
    fmt: str,
    checkpoint: str | Path,
    arch: str,
    num_classes: int,
    input_size: int | None,
    out: str | Path,
    label_space: str = "original",
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    overwrite: bool = False,
) -> ImportReport:
    """Convert ``checkpoint`` and write a verified teacher directory at ``out``.

    Verification: strict shapes, a forward pass on a fixed random batch of ``input_size`` px, and
    logits of the reloaded teacher file equal to those of the network built from the source
    tensors. The directory appears only once verification has passed.

    ``input_size`` and ``mean``/``std`` of a timm teacher default (``None``) to timm's
    pretrained_cfg of ``arch``; the other formats need ``input_size``.
    """
    from deitlt_scale.data.shards import sha256_file

    checkpoint, out = Path(checkpoint), Path(out)
    if fmt == "timm" and is_timm_arch(arch) and None in (input_size, mean, std):
        size, timm_mean, timm_std = timm_input_config(arch)
        input_size = size if input_size is None else input_size
        mean = timm_mean if mean is None else mean  # type: ignore[assignment]
        std = timm_std if std is None else std  # type: ignore[assignment]
    if input_size is None:
        raise UserError(f"--format {fmt} needs --input-size (32 for CIFAR teachers, 224 otherwise)")
    if input_size < 8:
        raise UserError(f"--input-size must be at least 8 pixels, got {input_size}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the teacher")
    if (out / INFO).exists() and not overwrite:
        raise UserError(f"{out} already holds a teacher; pass --overwrite or choose another --out")
    where = f"checkpoint {checkpoint}"
    state, dropped = convert_state(fmt, read_checkpoint(checkpoint), arch, where)
    normed = _classifier_check(state, arch, num_classes, where)
    model = create_teacher_arch(arch, num_classes, normed)
    load_state_strict(model, state, where, f"{arch} with {num_classes} classes")
    model.eval()

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, input_size, input_size, generator=gen)
    with torch.no_grad():
        expected = model(x)
    if expected.shape != (2, num_classes) or not torch.isfinite(expected).all():
        raise UserError(f"{where}: the converted teacher gives non-finite or misshaped logits")

    info = TeacherInfo(
        arch=arch,
        num_classes=num_classes,
        input_size=input_size,
        normed=normed,
        label_space=label_space,  # type: ignore[arg-type]
        source=f"{fmt}:{checkpoint.name} sha256={sha256_file(checkpoint)}",
    )
    if mean is not None:
        info = replace(info, mean=tuple(float(v) for v in mean))  # type: ignore[arg-type]
    if std is not None:
        info = replace(info, std=tuple(float(v) for v in std))  # type: ignore[arg-type]
    TeacherInfo.from_json(info.to_json(), "the teacher description")  # same checks as loading

    staging = out.with_name(f".{out.name}.importing")
    shutil.rmtree(staging, ignore_errors=True)
    save_teacher(staging, model, info)
    reloaded, _ = load_teacher(staging)
    with torch.no_grad():
        got = reloaded(x)
    diff = (got - expected).abs().max().item()
    if not torch.equal(got, expected):
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(
            f"{where}: the written teacher file does not reproduce the source logits "
            f"(max difference {diff:.3g}); nothing was written"
        )
    # Weights first, description last: a directory with teacher.json is always complete.
    out.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, INFO):
        (staging / name).replace(out / name)
    staging.rmdir()
    return ImportReport(out, info, len(state), dropped, diff)
