"""Start a run from a trained run's student weights (``train.init_from``), at any image size.

The source may also be an MAE pre-training run (``deitlt pretrain``, its ``mae.json`` beside
the checkpoints): then its encoder is taken (the student's own weights under ``encoder.``), the
decoder dropped and the student's heads left as initialised; a student without a DIST token
drops the encoder's DIST token and its position embedding.

The higher-resolution final stage of long-tail ViT recipes (e.g. LiVT, CVPR 2023: 224 px, then
384 px): the new run builds its student at its own ``data.image_size`` and loads the consolidated
weights of the source checkpoint (any ZeRO stage), with the absolute position embeddings
resampled bicubically from the source patch grid to the new one. The prefix tokens' embeddings
(CLS and DIST: ``num_prefix_tokens`` rows) are kept as they are, and so are the tokens
themselves and every other weight. The frozen teacher is untouched: it is fed at its own input
size (``TeacherRunner`` resizes the student's batch). Only the weights are taken: optimizer,
schedule and step start afresh, as a new stage should.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from deitlt_scale.engine.checkpoint import consolidate, find_checkpoint, load_strict
from deitlt_scale.errors import UserError

POS_EMBED = "pos_embed"


def parse_source(spec: str) -> tuple[Path, str]:
    """``RUN_DIR`` -> (RUN_DIR, "best"); ``RUN_DIR:TAG`` -> (RUN_DIR, TAG)."""
    path, sep, tag = spec.rpartition(":")
    if not sep or not path or "/" in tag:
        return Path(spec), "best"
    return Path(path), tag


def resample_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` with its ``pos_embed`` resampled to ``model``'s patch grid (prefix rows kept).

    Both grids are square or given by the models' ``patch_embed.grid_size``; a state whose
    position embedding already fits is returned unchanged.
    """
    from timm.layers import resample_abs_pos_embed

    if POS_EMBED not in state or not hasattr(model, POS_EMBED):
        return state
    old = state[POS_EMBED]
    new_shape = model.pos_embed.shape
    if old.shape == new_shape:
        return state
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    old_tokens = old.shape[1] - prefix
    side = math.isqrt(old_tokens)
    if side * side != old_tokens or old.shape[2] != new_shape[2]:
        raise UserError(
            f"the source position embedding {tuple(old.shape)} cannot be resampled to "
            f"{tuple(new_shape)}: init_from needs the same width and a square patch grid"
        )
    grid = list(model.patch_embed.grid_size)
    resampled = resample_abs_pos_embed(
        old.float(), new_size=grid, old_size=[side, side], num_prefix_tokens=prefix
    )
    return {**state, POS_EMBED: resampled.to(old.dtype)}


MAE_SPEC = "mae.json"  # the spec file of an MAE pre-training run (tasks.MAETask.spec_file)
ENCODER = "encoder."


def encoder_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """An MAE run's state reduced to what ``model`` (a student) takes from it: the encoder's
    weights under their student names, ``model``'s own (new) heads, and no DIST token where the
    student has none."""
    encoder = {k.removeprefix(ENCODER): v for k, v in state.items() if k.startswith(ENCODER)}
    for key, value in model.state_dict().items():
        if key.startswith(("head.", "head_dist.")):
            encoder[key] = value
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if "dist_token" in encoder and prefix == 1:
        del encoder["dist_token"]
        pos = encoder[POS_EMBED]
        encoder[POS_EMBED] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)  # CLS, then patches
    elif "dist_token" not in encoder and prefix == 2:
        raise UserError(
            "train.init_from: the MAE encoder has no DIST token for this distilled student; "
            "pre-train with model.distilled=true"
        )
    return encoder


def warm_start(model: nn.Module, spec: str) -> str | None:
    """Load the student weights named by ``train.init_from`` into ``model`` (built at the new
    run's image size); returns a line saying what was loaded, or None when ``spec`` is empty.

    Raises :class:`UserError` when the source is missing or its weights do not fit ``model``
    (another architecture or class count).
    """
    if not spec:
        return None
    run_dir, tag = parse_source(spec)
    ref = find_checkpoint(run_dir, tag)
    state, _ = consolidate(ref.path)
    pretrained = (run_dir / MAE_SPEC).is_file()
    if pretrained:
        state = encoder_state(state, model)
    before = tuple(state[POS_EMBED].shape) if POS_EMBED in state else None
    state = resample_state(state, model)
    try:
        load_strict(model, state, f"train.init_from {spec} ({ref.path})")
    except RuntimeError as err:  # a shape mismatch: another width, depth or class count
        first = str(err).split("\n")[1].strip() if "\n" in str(err) else str(err)
        raise UserError(
            f"train.init_from {spec}: its student does not fit this run's ({first}); start "
            "from a run of the same architecture and dataset"
        ) from None
    after = tuple(model.pos_embed.shape) if hasattr(model, POS_EMBED) else None
    moved = f", position embeddings {before} -> {after}" if before != after else ""
    what = "MAE encoder, new heads, " if pretrained else ""
    return f"init from   {what}{ref.path} (step {ref.step}){moved}"
