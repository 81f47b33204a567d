"""Export a trained student from a DeepSpeed checkpoint to a directory timm loads.

The output is timm's local-directory layout (what ``timm.models._hub.save_for_hf`` writes and
``timm.create_model("local-dir:DIR")`` reads):

* ``model.safetensors``: the student's state dict under timm's own keys (no ``module.`` or
  ``_orig_mod.`` prefixes), fp32 master weights or bf16; no pickle anywhere.
* ``config.json``: ``architecture``, ``num_classes``, ``model_args`` (patch size, width, depth,
  heads, img_size), ``label_names`` (class names per model label), ``pretrained_cfg`` with the
  preprocessing (input_size, mean, std, interpolation, crop_pct), and a ``deitlt`` section with
  the class map, head/mid/tail groups and boundaries, the dataset and the source checkpoint.
* ``README.md``: a model card (recipe, data, Overall/Head/Mid/Tail accuracy when evaluated).

Checkpoints are ``RUN_DIR/checkpoints/<tag>/`` as written by ``engine.save_checkpoint``; only tags
holding a ``COMPLETE`` marker are used. ZeRO stages 1-3 are consolidated from the fp32 master
partitions (``deepspeed.utils.zero_to_fp32``), stage 0 from the module states. EMA weights, when
the trainer keeps them, are a state dict in the checkpoint's client state under ``ema``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from deitlt_scale.engine.checkpoint import (
    CheckpointRef,
    consolidate,
    ema_state,
    find_checkpoint,
    load_strict,
    zero_stage_of,
)
from deitlt_scale.errors import UserError

if TYPE_CHECKING:
    import torch

STUDENT_FILE = "student.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
_REQUIRED_STUDENT_KEYS = ("architecture", "num_classes", "img_size", "mean", "std")
# Regularisation, not architecture: a fine-tuner chooses its own.
_TRAINING_ONLY_ARGS = ("drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate",
                       "pos_drop_rate", "patch_drop_rate")  # fmt: skip

Dtype = Literal["fp32", "bf16"]


class ExportError(UserError):
    """A checkpoint or run directory that cannot be exported; the message says why and what to do."""


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    checkpoint: CheckpointRef
    zero_stage: int
    dtype: Dtype
    ema: bool
    num_tensors: int
    registered: str | None = None  # "NAME/VERSION" when registered in MLflow


# --------------------------------------------------------------------------------------------
# Writing the export


def read_student(run_dir: Path | None, ckpt: CheckpointRef) -> dict[str, Any]:
    """``RUN_DIR/student.json``, checked for the keys the export needs."""
    if run_dir is None:
        raise ExportError(
            f"no {STUDENT_FILE} next to {ckpt.root}; export needs the run directory's "
            f"{STUDENT_FILE} (pass RUN_DIR, or keep checkpoints/ inside it)"
        )
    path = run_dir / STUDENT_FILE
    if not path.is_file():
        raise ExportError(
            f"{run_dir} has no {STUDENT_FILE}: export takes student runs of `deitlt train` "
            "(teacher runs hand on RUN_DIR/teacher instead; an MAE run of `deitlt pretrain` is "
            "exported through a student trained from it with train.init_from)"
        )
    try:
        student = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{path} is not valid JSON: {err}") from None
    missing = [k for k in _REQUIRED_STUDENT_KEYS if k not in student]
    if missing:
        raise ExportError(f"{path} lacks {', '.join(missing)}; it is written by `deitlt train`")
    return student


def build_model(student: dict[str, Any]) -> torch.nn.Module:
    """The timm student described by student.json, randomly initialised."""
    import timm

    args = {
        k: v for k, v in (student.get("model_args") or {}).items() if k not in _TRAINING_ONLY_ARGS
    }
    args.setdefault("img_size", student["img_size"])
    args["num_classes"] = student["num_classes"]
    tag = f"deitlt_{student.get('dataset') or 'custom'}"
    try:
        return timm.create_model(
            student["architecture"], pretrained_cfg_overlay={"tag": tag, "license": None}, **args
        )
    except (RuntimeError, TypeError, ValueError) as err:
        raise ExportError(
            f"student.json describes a model timm cannot build ({student['architecture']}, "
            f"{args}): {err}"
        ) from None


def export(
    source: str | Path,
    out: str | Path,
    *,
    tag: str | None = None,
    dtype: Dtype = "fp32",
    ema: bool = False,
    register: str | None = None,
    tracking_uri: str | None = None,
) -> ExportResult:
    """Export one checkpoint of a run to ``out`` (which must not exist or be empty).

    Args:
        source: RUN_DIR, RUN_DIR/checkpoints or one checkpoint tag directory.
        out: output directory; written under a temporary name and renamed when complete.
        tag: ``None``/``"latest"`` (newest COMPLETE), ``"best"`` or ``"step_XXXXXXXX"``.
        dtype: ``fp32`` (the master weights) or ``bf16`` (half the size).
        ema: export the EMA weights kept in the checkpoint instead of the trained weights.
        register: also log the export to the run's MLflow run and register it under this name.
        tracking_uri: MLflow URI for ``register`` (default: the run's tracking settings).
    """
    import torch
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    if dtype not in ("fp32", "bf16"):
        raise ExportError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not empty; choose a new directory")
    ref = find_checkpoint(source, tag)
    student = read_student(ref.run_dir, ref)
    model = build_model(student)
    if ema:
        stage = zero_stage_of(ref.path)
        state = ema_state(ref.path)
        load_strict(model, state, f"EMA weights of {ref.path}")
    else:
        state, stage = consolidate(ref.path)
        load_strict(model, state, f"checkpoint {ref.path}")
    model.eval()

    target = torch.bfloat16 if dtype == "bf16" else torch.float32
    tensors = {
        k: (v.detach().to(target) if v.is_floating_point() else v.detach()).contiguous().clone()
        for k, v in model.state_dict().items()
    }
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(tensors, str(partial / WEIGHTS_FILE), metadata={"format": "pt"})
    latest = _read_eval(ref.run_dir)
    deitlt_meta = {
        "dataset": student.get("dataset"),
        "class_map": student.get("class_map"),
        "groups": student.get("groups"),
        "boundaries": student.get("boundaries"),
        "checkpoint": {
            "run_dir": str(ref.run_dir.resolve()) if ref.run_dir else None,
            "tag": ref.tag,
            "step": ref.step,
            "epoch": ref.epoch,
            "zero_stage": stage,
            "ema": ema,
            "dtype": dtype,
        },
        "eval": latest,
    }
    model_config: dict[str, Any] = {"deitlt": deitlt_meta}
    names = list(student.get("class_names") or [])
    if names and all(names):  # a source without names gives "" per class: then none at all
        model_config["label_names"] = names
    size = int(student["img_size"])
    save_config_for_hf(
        model,
        str(partial / CONFIG_FILE),
        model_config=model_config,
        data_config={
            "input_size": (3, size, size),
            "mean": tuple(student["mean"]),
            "std": tuple(student["std"]),
            "interpolation": student.get("interpolation", "bicubic"),
            "crop_pct": student.get("crop_pct", 0.875),
        },
    )
    config = json.loads((partial / CONFIG_FILE).read_text())
    (partial / CARD_FILE).write_text(model_card(config, student, ref, _read_recipe(ref.run_dir)))
    if out.exists():
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial.replace(out)
    result = ExportResult(out, ref, stage, dtype, ema, len(tensors))
    if register:
        version = register_export(out, register, ref.run_dir, tracking_uri)
        result = ExportResult(out, ref, stage, dtype, ema, len(tensors), version)
    return result


def _read_eval(run_dir: Path | None) -> dict[str, Any] | None:
    path = run_dir / "eval" / "latest.json" if run_dir else None
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _read_recipe(run_dir: Path | None) -> dict[str, Any]:
    path = run_dir / "config.yaml" if run_dir else None
    if path is None or not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------------------------
# Model card


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, int | float) else "-"


def model_card(
    config: dict[str, Any], student: dict[str, Any], ref: CheckpointRef, recipe: dict[str, Any]
) -> str:
    """README.md for an export: what it is, how it was trained, how well, how to load it."""
    meta = config.get("deitlt", {})
    arch, args = config["architecture"], config.get("model_args", {})
    k = config["num_classes"]
    size = int(student["img_size"])
    lines = [
        f"# {arch} ({meta.get('dataset') or 'custom data'})",
        "",
        "A distilled Vision Transformer trained from scratch with DeiT-LT (CVPR 2024) on "
        "long-tailed data, exported by `deitlt export`.",
        "",
        "## Model",
        "",
        f"- Architecture: timm `{arch}` with {json.dumps(args)}",
        f"- Classes: {k} (model label order: classes by descending training count)",
        f"- Input: {size}x{size}, mean {student['mean']}, std {student['std']}, "
        f"{student.get('interpolation', 'bicubic')}, crop_pct {student.get('crop_pct', 0.875)}",
        f"- Weights: `{WEIGHTS_FILE}` ({meta.get('checkpoint', {}).get('dtype')}), "
        f"checkpoint `{ref.tag}` (step {ref.step}"
        + (f", epoch {ref.epoch}" if ref.epoch is not None else "")
        + ")"
        + (", EMA weights" if meta.get("checkpoint", {}).get("ema") else ""),
        "- Eval-mode output: the average of the CLS and DIST heads' logits.",
        "",
        "## Data",
        "",
        f"- Dataset: {meta.get('dataset') or 'unknown'}",
        f"- Head/Mid/Tail boundaries (model labels): {meta.get('boundaries')}",
        "- `config.json` holds the class names (`label_names`), the class map "
        "(`deitlt.class_map[original label] = model label`) and the groups (`deitlt.groups`).",
        "",
    ]
    if recipe:
        rows = [
            ("distillation", recipe.get("distill", {}).get("type")),
            ("alpha", recipe.get("distill", {}).get("alpha")),
            ("DRW from epoch", recipe.get("distill", {}).get("drw_epoch")),
            ("teacher", recipe.get("teacher", {}).get("path") or "none"),
            ("epochs", recipe.get("train", {}).get("epochs")),
            ("micro batch per rank", recipe.get("train", {}).get("micro_batch")),
            ("optimizer", recipe.get("optim", {}).get("name")),
            ("base lr", recipe.get("optim", {}).get("lr")),
            ("weight decay", recipe.get("optim", {}).get("weight_decay")),
            ("ZeRO stage", recipe.get("deepspeed", {}).get("zero_stage")),
            ("bf16", recipe.get("deepspeed", {}).get("bf16")),
        ]
        lines += ["## Recipe", "", "| setting | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in rows]
        lines += ["", "The full resolved configuration is the run directory's `config.yaml`.", ""]
    latest = meta.get("eval")
    if latest and isinstance(latest.get("metrics"), dict):
        metrics = latest["metrics"]
        lines += [
            "## Results",
            "",
            f"Top-1 accuracy (%) at step {latest.get('step')}; Head/Mid/Tail use the paper's "
            "class-index boundaries.",
            "",
            "| head | Overall | Head | Mid | Tail |",
            "|---|---|---|---|---|",
        ]
        for head in ("mean", "cls", "dist"):
            if f"{head}/overall" in metrics:
                cells = [metrics.get(f"{head}/overall")] + [
                    metrics.get(f"{head}/paper/{g}") for g in ("head", "mid", "tail")
                ]
                lines.append(f"| {head} | " + " | ".join(_fmt(c) for c in cells) + " |")
        lines.append("")
    lines += [
        "## Use",
        "",
        "```python",
        "import timm",
        "",
        'model = timm.create_model("local-dir:/path/to/this/directory", pretrained=True)',
        "model.eval()",
        "cfg = timm.data.resolve_data_config(model=model)",
        "transform = timm.data.create_transform(**cfg)",
        "```",
        "",
        "Fine-tune at another resolution or on new classes with "
        '`timm.create_model("local-dir:...", pretrained=True, img_size=..., num_classes=...)`; '
        "without `pretrained=True` timm builds the architecture with random weights.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# MLflow registration


def register_export(
    out: Path, name: str, run_dir: Path | None, tracking_uri: str | None = None
) -> str:
    """Log ``out`` as the run's ``model`` artifact and register it as a new version of ``name``.

    Returns ``"NAME/VERSION"``. Needs the run's ``mlflow-run-id``; the URI defaults to the run's
    tracking settings (config.yaml's ``tracking.uri``, ``$MLFLOW_TRACKING_URI``, the run's SQLite).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from deitlt_scale.config import TrackingConfig
    from deitlt_scale.tracking import read_run_id, resolve_uri

    run_id = read_run_id(run_dir) if run_dir else None
    if not run_id:
        raise ExportError(
            f"--register needs a tracked run: {run_dir or 'the run directory'} has no "
            "mlflow-run-id (train with tracking.enabled=true)"
        )
    if tracking_uri is None:
        uri_cfg = (_read_recipe(run_dir).get("tracking") or {}).get("uri")
        tracking_uri = resolve_uri(TrackingConfig(uri=uri_cfg), run_dir)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.log_artifacts(run_id, str(out), "model")
        try:
            client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id)
    except MlflowException as err:
        raise ExportError(
            f"exported to {out}, but registering {name!r} at {tracking_uri} failed: "
            f"{' '.join(str(err).split())[:300]}"
        ) from None
    return f"{name}/{version.version}"
