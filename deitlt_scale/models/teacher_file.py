"""The project's teacher file: a directory holding ``model.safetensors`` and ``teacher.json``.

``teacher.json`` describes how to rebuild and feed the network (``arch``: ``resnet32``,
``resnet50`` or a timm model name, see :mod:`deitlt_scale.models.teachers`)::

    {"arch": "resnet32", "num_classes": 10, "input_size": 32,
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "normed": false,
     "label_space": "original", "source": "paco:ckpt.pth.tar sha256=..."}

* ``input_size``: the side in pixels the teacher sees (the student batch is resized to it).
* ``mean``/``std``: the normalisation of the teacher's input, recorded for the trainer.
* ``label_space``: ``"original"`` when the logits index the raw dataset's labels (public
  checkpoints), ``"model"`` when they index frequency-ranked labels (``deitlt teacher train``).

Loading never unpickles anything: weights come from safetensors, metadata from JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from deitlt_scale.config import IMAGENET_MEAN, IMAGENET_STD
from deitlt_scale.errors import UserError
from deitlt_scale.models.teachers import (
    TEACHER_ARCHS,
    create_teacher_arch,
    freeze,
    is_teacher_arch,
    is_timm_arch,
)

WEIGHTS = "model.safetensors"
INFO = "teacher.json"
LABEL_SPACES = ("model", "original")


@dataclass(frozen=True)
class TeacherInfo:
    arch: str
    num_classes: int
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    normed: bool = False
    label_space: Literal["model", "original"] = "original"
    source: str = ""

    def to_json(self) -> dict:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_json(cls, data: object, where: str) -> TeacherInfo:
        """Validate a parsed ``teacher.json``; ``where`` names the file in error messages."""
        if not isinstance(data, dict):
            raise UserError(f"{where} must hold a JSON object, got {type(data).__name__}")
        required = ("arch", "num_classes", "input_size")
        missing = [k for k in required if k not in data]
        if missing:
            raise UserError(f"{where} lacks key {missing[0]!r}; re-create it with deitlt teacher")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{where} has unknown key {unknown[0]!r}; valid: {', '.join(known)}")
        arch, k, size = data["arch"], data["num_classes"], data["input_size"]
        if not isinstance(arch, str) or not is_teacher_arch(arch):
            raise UserError(
                f"{where}: arch {arch!r} is neither {' nor '.join(TEACHER_ARCHS)} nor a timm "
                "model name this timm knows"
            )
        for key, value in (("num_classes", k), ("input_size", size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{where}: {key} must be a positive integer, got {value!r}")
        stats = {}
        for key in ("mean", "std"):
            value = data.get(key, getattr(cls, key))
            if (
                not isinstance(value, list | tuple)
                or len(value) != 3
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            ):
                raise UserError(f"{where}: {key} must be a list of 3 numbers, got {value!r}")
            stats[key] = tuple(float(v) for v in value)
        if any(s <= 0 for s in stats["std"]):
            raise UserError(f"{where}: std must be positive, got {list(stats['std'])}")
        label_space = data.get("label_space", "original")
        if label_space not in LABEL_SPACES:
            raise UserError(
                f"{where}: label_space must be one of {', '.join(LABEL_SPACES)}, got {label_space!r}"
            )
        normed = data.get("normed", False)
        if not isinstance(normed, bool):
            raise UserError(f"{where}: normed must be true or false, got {normed!r}")
        if normed and is_timm_arch(arch):
            raise UserError(f"{where}: normed is for the ResNets only, not {arch!r}")
        return cls(
            arch=arch,
            num_classes=k,
            input_size=size,
            mean=stats["mean"],
            std=stats["std"],
            normed=normed,
            label_space=label_space,
            source=str(data.get("source", "")),
        )


def save_teacher(directory: str | Path, model: nn.Module, info: TeacherInfo) -> Path:
    """Write ``model.safetensors`` and ``teacher.json`` into ``directory`` (each atomically).

    The weights are written first, so a directory whose ``teacher.json`` exists is complete.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Contiguous fp32 CPU copies: safetensors refuses views and shared storage.
    state = {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }
    _atomic(directory / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    text = json.dumps(info.to_json(), indent=2) + "\n"
    _atomic(directory / INFO, lambda tmp: tmp.write_text(text))
    return directory


def read_info(directory: str | Path) -> TeacherInfo:
    """Parse and validate ``teacher.json`` of a teacher directory."""
    path = Path(directory) / INFO
    if not path.is_file():
        raise UserError(
            f"{path} does not exist; create a teacher with `deitlt teacher import` or "
            "`deitlt teacher train`, or point teacher.path at its directory"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    return TeacherInfo.from_json(data, str(path))


def load_teacher(
    directory: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> tuple[nn.Module, TeacherInfo]:
    """Rebuild a teacher from its directory, frozen (eval, no grad) on ``device`` in ``dtype``.

    A weights file that does not fit the described network (other arch, class count or shape)
    is a :class:`UserError` naming the file and the first mismatch.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    info = read_info(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{weights} does not exist; the teacher directory is incomplete")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise UserError(f"{weights} is not a readable safetensors file: {err}") from None
    model = create_teacher_arch(info.arch, info.num_classes, info.normed)
    load_state_strict(model, state, str(weights), f"{info.arch} with {info.num_classes} classes")
    model.to(device)
    return freeze(model, dtype, channels_last), info


def load_state_strict(
    model: nn.Module, state: dict[str, torch.Tensor], where: str, what: str
) -> None:
    """``model.load_state_dict(state, strict=True)`` with a one-line error naming the first
    missing key, unexpected key or shape mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first {unexpected[0]})")
        raise UserError(f"{where} does not fit {what}: {', '.join(parts)}")
    for key, ref in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise UserError(
                f"{where} does not fit {what}: {key} has shape {tuple(got.shape)}, "
                f"expected {tuple(ref.shape)}"
            )
    model.load_state_dict(state, strict=True)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
