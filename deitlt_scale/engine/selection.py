"""Which split chooses the best checkpoint: the held-out ``val`` split where the dataset has one.

The reference (and the paper) keeps the checkpoint with the best *test* accuracy, which is
selection on the test split. When ``deitlt data prepare`` held out a val split
(``--val-per-class`` or ``--val-list``), training evaluates it too and keeps the checkpoint with
the best val headline; the test split is then only reported, for the final and for that
checkpoint. Without a val split the reference's behaviour stays, and every output says so.

``RUN_DIR/eval/selection.json`` records the choice (``{"split", "metric", "step", "value"}``);
:func:`selected_on` reads it back for ``deitlt eval``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deitlt_scale.engine.evaluate import EvalResult, evaluate_run

SELECTION_FILE = "selection.json"
VAL_DIR = "val"  # RUN_DIR/eval/val: the val split's figures, written as the test split's are


def selection_split(meta: Any) -> str:
    """``"val"`` when the prepared dataset holds a val split, else ``"eval"`` (the test split)."""
    return "val" if "val" in meta.splits else "eval"


def build_val_loader(cfg: Any, meta: Any, world: Any) -> Any | None:
    """The eval loader of the val split, or None when the dataset has none."""
    if selection_split(meta) != "val":
        return None
    from deitlt_scale.engine.components import build_eval_loader

    return build_eval_loader(cfg, meta, world, split="val")


def evaluate_selection(
    predict: Any,
    val_loader: Any | None,
    test_result: EvalResult,
    meta: Any,
    world: Any,
    eval_dir: Path,
    step: int,
) -> EvalResult:
    """The result the best checkpoint is chosen on: the val split's (evaluated here, all
    ranks, written to ``eval_dir/val``) or, without a val loader, ``test_result`` itself."""
    if val_loader is None:
        return test_result
    return evaluate_run(predict, val_loader, meta, world, eval_dir / VAL_DIR, step)


def record_selection(eval_dir: Path, split: str, metric: str, step: int, value: float) -> Path:
    """Write ``selection.json`` for a new best checkpoint (rank 0)."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    path = eval_dir / SELECTION_FILE
    tmp = path.with_name(f".{SELECTION_FILE}.partial")
    tmp.write_text(json.dumps({"split": split, "metric": metric, "step": step, "value": value}))
    tmp.replace(path)
    return path


def selected_on(run_dir: Path) -> str:
    """``"val"`` or ``"eval"``: the split that chose the run's best checkpoint (``"eval"``, the
    reference's test-split selection, when training recorded nothing)."""
    path = Path(run_dir) / "eval" / SELECTION_FILE
    try:
        return str(json.loads(path.read_text())["split"])
    except (OSError, ValueError, KeyError, TypeError):
        return "eval"


def selection_note(run_dir: Path, tag: str) -> str:
    """One line for the eval output saying how the checkpoint was chosen."""
    if tag != "best":
        return f"checkpoint {tag}"
    if selected_on(run_dir) == "val":
        return "best checkpoint chosen on the val split"
    return "best checkpoint chosen on the test split, as the reference does (no val selection)"
