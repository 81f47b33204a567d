"""`deitlt export`: export a trained student as safetensors + config.json that timm loads."""

from __future__ import annotations

import argparse
import sys

HELP = "export a trained student as safetensors + config.json that timm loads"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="RUN_DIR|CHECKPOINT_DIR",
        help="a run directory, its checkpoints/ directory, or one checkpoint tag directory",
    )
    parser.add_argument("--out", required=True, help="output directory (must be new or empty)")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="weight dtype of model.safetensors (default fp32, the master weights)",
    )
    parser.add_argument(
        "--ema",
        action="store_true",
        help="export the EMA weights saved in the checkpoint (an error when it holds none)",
    )
    parser.add_argument(
        "--tag",
        default="latest",
        help="checkpoint to export: latest (newest COMPLETE, default), best, or step_XXXXXXXX",
    )
    parser.add_argument(
        "--register",
        metavar="NAME",
        default=None,
        help="also log the export to the run's MLflow run and register it as a version of NAME",
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow URI for --register (default: the run's tracking.uri, $MLFLOW_TRACKING_URI, "
        "or RUN_DIR/mlflow.db)",
    )


def run(args: argparse.Namespace) -> int:
    from deitlt_scale.export import export

    # Consolidating ZeRO shards shows DeepSpeed's own progress bars on stderr.
    result = export(
        args.source,
        args.out,
        tag=args.tag,
        dtype=args.dtype,
        ema=args.ema,
        register=args.register,
        tracking_uri=args.tracking_uri,
    )
    ref = result.checkpoint
    print(
        f"exported {ref.path} (step {ref.step}, ZeRO-{result.zero_stage}"
        f"{', EMA' if result.ema else ''}, {result.dtype}, {result.num_tensors} tensors) "
        f"-> {result.out_dir}",
        file=sys.stderr,
    )
    if result.registered:
        print(f"registered in MLflow as {result.registered}", file=sys.stderr)
    print(result.out_dir)
    return 0
