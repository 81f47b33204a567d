"""Load what `deitlt analyze` looks at: a student from an export or a run directory, its teacher.

* Export directory (``deitlt export``): ``model.safetensors`` + ``config.json``, loaded with
  ``timm.create_model("local-dir:<dir>", pretrained=True)``; input size, mean and std come from
  its data config. Its training run (for the config, the teacher and the MLflow run) is the
  ``deitlt.checkpoint.run_dir`` recorded in ``config.json`` when that directory still exists.
* Run directory (``deitlt train``): ``student.json`` + ``config.yaml`` + ``checkpoints/<tag>/``.
  The newest complete checkpoint (or ``tag``) is consolidated by :mod:`deitlt_scale.export`'s
  own functions, so a run and its export give the same model.

Either way a plain timm DeiT/ViT becomes the project student (:func:`as_student`), whose
explicit-softmax path provides the attention maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from deitlt_scale.analysis.probe import Probe, as_probe
from deitlt_scale.config import Config, from_dict
from deitlt_scale.errors import UserError
from deitlt_scale.models.teacher_runner import TeacherRunner

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
RUN_STUDENT = "student.json"
RUN_CONFIG = "config.yaml"


@dataclass
class Subject:
    """A model under analysis and what it needs to be fed."""

    name: str  # label in plots and tables
    path: Path  # the export or run directory it came from
    probe: Probe
    image_size: int  # square input side in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int
    config: Config | None = None  # the training config, when known
    run_id: str | None = None  # its MLflow run, when known
    eval_crop_pct: float | None = None  # eval resize = image_size / crop_pct, when the export says
    run_dir: Path | None = None  # the training run directory, when known


def load_subject(
    path: str | Path, device: torch.device, checkpoint: str | None = None, name: str | None = None
) -> Subject:
    """Load an export directory or a run directory (see the module docstring)."""
    path = Path(path)
    if (path / EXPORT_WEIGHTS).is_file() and (path / EXPORT_CONFIG).is_file():
        if checkpoint is not None:
            raise UserError(
                f"{path} is an export (one set of weights): a checkpoint tag ({checkpoint}) "
                "only selects among a run directory's checkpoints"
            )
        subject = _load_export(path)
    elif (path / RUN_STUDENT).is_file():
        subject = _load_run(path, checkpoint)
    else:
        raise UserError(
            f"{path} is neither an export directory ({EXPORT_WEIGHTS} + {EXPORT_CONFIG}) nor a run "
            f"directory ({RUN_STUDENT}); pass the output of `deitlt export` or of `deitlt train`"
        )
    subject.probe.model.to(device)
    if name:
        subject.name = name
    return subject


def _read_config(path: Path) -> Config | None:
    if not path.is_file():
        return None
    try:
        return from_dict(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML ({' '.join(str(err).split())})") from None


def _read_run_id(directory: Path) -> str | None:
    from deitlt_scale.tracking import read_run_id

    return read_run_id(directory)


def _load_export(path: Path) -> Subject:
    import timm

    try:
        model = timm.create_model(f"local-dir:{path.resolve()}", pretrained=True)
    except (RuntimeError, KeyError, ValueError, OSError) as err:
        raise UserError(
            f"timm cannot load {path / EXPORT_CONFIG} + {EXPORT_WEIGHTS} ({err}); re-export it "
            "with `deitlt export`"
        ) from None
    data = timm.data.resolve_model_data_config(model)
    _, height, width = data["input_size"]
    if height != width:
        raise UserError(f"{path / EXPORT_CONFIG}: input size {height}x{width} is not square")
    run_dir = _export_run_dir(path)
    return Subject(
        name=path.name,
        path=path,
        probe=as_probe(as_student(model)),
        image_size=int(height),
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        num_classes=int(model.num_classes),
        config=_read_config(run_dir / RUN_CONFIG) if run_dir else None,
        run_id=_read_run_id(run_dir) if run_dir else None,
        run_dir=run_dir,
        eval_crop_pct=float(data["crop_pct"]) if data.get("crop_pct") else None,
    )


def _export_run_dir(path: Path) -> Path | None:
    """The run an export came from (``deitlt.checkpoint.run_dir`` of its config.json) when that
    directory still holds its config.yaml, else None."""
    import json

    try:
        info = json.loads((path / EXPORT_CONFIG).read_text())
        run_dir = info["deitlt"]["checkpoint"]["run_dir"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    if run_dir and (Path(run_dir) / RUN_CONFIG).is_file():
        return Path(run_dir)
    return None


def as_student(model: nn.Module) -> nn.Module:
    """The project student holding ``model``'s weights when ``model`` is a plain timm DeiT/ViT.

    Students are timm models with extra analysis views (same state_dict keys), so an exported
    student comes back as one and its attention maps come from the student's explicit-softmax
    path. Anything the student classes do not reproduce exactly (other ViT options) stays as it
    is and is read through the generic view of :mod:`deitlt_scale.analysis.probe`.
    """
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    from deitlt_scale.models.student import DistilledStudent, PlainStudent

    if type(model) is VisionTransformerDistilled:
        cls: type[nn.Module] = DistilledStudent
    elif type(model) is VisionTransformer:
        cls = PlainStudent
    else:
        return model
    try:
        student = cls(
            img_size=tuple(model.patch_embed.img_size),
            patch_size=tuple(model.patch_embed.patch_size),
            embed_dim=model.embed_dim,
            depth=len(model.blocks),
            num_heads=model.blocks[0].attn.num_heads,
            num_classes=model.num_classes,
        )
        student.load_state_dict(model.state_dict(), strict=True)
    except (RuntimeError, TypeError, AttributeError):
        return model
    # Same weights are not enough (pooling, norms and token options leave no trace in the
    # state dict): keep the student only when it computes the same logits.
    model.eval()
    student.eval()
    size = tuple(model.patch_embed.img_size)
    probe_input = torch.randn(2, model.patch_embed.proj.in_channels, *size)
    with torch.no_grad():
        same = torch.allclose(student(probe_input), model(probe_input), atol=1e-4, rtol=1e-4)
    return student if same else model


def _load_run(path: Path, tag: str | None) -> Subject:
    """The student of checkpoint ``tag`` (default: newest complete), consolidated as the export
    consolidates it, so that a run and its export analyse identically."""
    from deitlt_scale.engine.checkpoint import consolidate, find_checkpoint, load_strict
    from deitlt_scale.export import build_model, read_student

    ref = find_checkpoint(path, tag)
    student = read_student(ref.run_dir, ref)
    model = build_model(student)
    state, _ = consolidate(ref.path)
    load_strict(model, state, f"checkpoint {ref.path}")
    return Subject(
        name=f"{path.name}@{ref.tag}" if tag not in (None, "latest") else path.name,
        path=path,
        probe=as_probe(as_student(model)),
        image_size=int(student["img_size"]),
        mean=tuple(student["mean"]),
        std=tuple(student["std"]),
        num_classes=int(student["num_classes"]),
        config=_read_config(path / RUN_CONFIG),
        run_id=_read_run_id(path),
        eval_crop_pct=float(student["crop_pct"]) if student.get("crop_pct") else None,
        run_dir=path,
    )


def load_teacher_model(
    path: str | Path,
    device: torch.device,
    student_mean: tuple[float, ...],
    student_std: tuple[float, ...],
) -> TeacherRunner:
    """The frozen fp32 teacher of a teacher directory, fed as during training: at its own input
    size, the student's batch re-normalised to the teacher's statistics."""
    from deitlt_scale.models.teacher_file import load_teacher

    teacher, info = load_teacher(path, device, torch.float32, False)
    return TeacherRunner(
        teacher,
        info.input_size,
        student_mean=student_mean,
        student_std=student_std,
        teacher_mean=info.mean,
        teacher_std=info.std,
    )


def teacher_path(subject: Subject, override: str | None) -> Path | None:
    """The teacher file to use: ``override``, else the training config's ``teacher.path``.

    A relative config path is tried from the working directory, then from the directory that
    holds ``runs/`` (runs are usually started there).
    """
    if override:
        p = Path(override)
        if not p.exists():
            raise UserError(f"--teacher {override}: no such file or directory")
        return p
    if subject.config is None or not subject.config.teacher.path:
        return None
    p = Path(subject.config.teacher.path)
    candidates = [p]
    if not p.is_absolute() and subject.run_dir is not None:
        candidates.append(subject.run_dir.resolve().parent.parent / p)
    for c in candidates:
        if c.exists():
            return c
    raise UserError(
        f"teacher.path={subject.config.teacher.path} of {subject.path} was not found; "
        "pass --teacher PATH or drop entropy from --what"
    )
