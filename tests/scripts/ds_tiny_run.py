"""A tiny 2-process DeepSpeed training job that writes the trainer's run-directory layout.

Launched by the tracking and export tests with
``python -m torch.distributed.run --nproc_per_node=2 tests/scripts/ds_tiny_run.py --job ...``.
Each ``--job RUN_DIR:STAGE[:bf16][:compile][:ema][:track]`` trains the tiny distilled DeiT of
recipes/tiny_digits.yaml (patch 4, width 96, depth 4, 32 px, 10 classes) on fixed random data
for ``--steps`` optimizer steps under ZeRO stage STAGE, continuing from the newest COMPLETE
checkpoint of RUN_DIR when there is one, and leaves:

* RUN_DIR/config.yaml, RUN_DIR/student.json, RUN_DIR/eval/latest.json, RUN_DIR/eval/per_class.csv
* RUN_DIR/checkpoints/step_%08d/ (DeepSpeed checkpoint + COMPLETE, EMA in client_state with ``ema``)
* RUN_DIR/reference.safetensors: fixed eval inputs and the trained student's eval-mode logits
  (and the EMA model's, with ``ema``), the ground truth for the export tests.
* with ``track``: one MLflow run through deitlt_scale.tracking (rank 0 logs, id broadcast) at
  ``$DEITLT_TEST_TRACKING_URI`` (default: SQLite in RUN_DIR).

``--pause-after K --go-file F``: after logging step K, rank 0 writes RUN_DIR/paused and every
rank waits for F to exist (the tests stop the tracking server in between).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the launcher side (the tests) imports this module without the heavy stack
    import torch

ARCH = "deit_tiny_distilled_patch16_224"
MODEL_ARGS = {"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3, "img_size": 32}
NUM_CLASSES = 10
MICRO_BATCH = 4
EMA_DECAY = 0.5


def parse_job(text: str) -> dict:
    run_dir, stage, *flags = text.split(":")
    return {"run_dir": Path(run_dir), "stage": int(stage), "flags": set(flags)}


def newest_complete(ckpt_root: Path) -> tuple[str, int] | None:
    tags = []
    for done in ckpt_root.glob("*/COMPLETE"):
        tags.append((json.loads(done.read_text())["step"], done.parent.name))
    if not tags:
        return None
    step, tag = max(tags)
    return tag, step


def student_meta() -> dict:
    return {
        "architecture": ARCH,
        "model_args": {**MODEL_ARGS, "drop_path_rate": 0.1},
        "num_classes": NUM_CLASSES,
        "img_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "class_names": [f"digit_{i}" for i in (1, 0, 2, 3, 4, 5, 6, 7, 8, 9)],
        "class_map": [1, 0, 2, 3, 4, 5, 6, 7, 8, 9],
        "groups": {"paper": [0] * 3 + [1] * 4 + [2] * 3, "count": [0] * 2 + [1] * 5 + [2] * 3},
        "boundaries": [3, 7],
        "dataset": "tiny-random",
    }


def strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def launch(
    jobs: list[str], env: dict[str, str], *extra: str, wait: bool = True, timeout_s: float = 900
) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    """Run this script under torchrun with 2 processes (own process group, free rendezvous port).

    ``wait=False`` returns the Popen (stdout/stderr piped, text) for the caller to drive.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={port}", __file__,
        *(f"--job={job}" for job in jobs), *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    if not wait:
        return proc
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_job(job: dict, args: argparse.Namespace, rank: int, world: int) -> None:
    import deepspeed
    import timm
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from deitlt_scale import config as config_mod
    from deitlt_scale.tracking import Tracker, standard_tags

    run_dir: Path = job["run_dir"]
    stage, flags = job["stage"], job["flags"]
    bf16 = "bf16" in flags
    overrides = [
        f"model.arch={ARCH}",
        "model.patch_size=4",
        "model.embed_dim=96",
        "model.depth=4",
        "model.num_heads=3",
        "data.image_size=32",
        f"train.micro_batch={MICRO_BATCH}",
        f"deepspeed.zero_stage={stage}",
        f"deepspeed.bf16={str(bf16).lower()}",
        "deepspeed.gradient_clipping=1.0",
        f"runtime.run_dir={run_dir}",
        f"tracking.enabled={str('track' in flags).lower()}",
        f"tracking.experiment={args.experiment}",
        "tracking.uri=" + (os.environ.get("DEITLT_TEST_TRACKING_URI") or "null"),
        "teacher.path=runs/teacher_digits/teacher",
    ]
    cfg = config_mod.load(None, overrides)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_mod.dump(cfg, run_dir / "config.yaml")
        (run_dir / "student.json").write_text(json.dumps(student_meta(), indent=1))
    dist.barrier()

    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=NUM_CLASSES, drop_path_rate=0.1, **MODEL_ARGS)
    if "compile" in flags:
        # The trainer compiles before deepspeed.initialize; "eager" keeps the trace cheap on CPU
        # while giving the same `_orig_mod.` parameter names as inductor.
        model = torch.compile(model, backend="eager")
    ds_config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "train_batch_size": MICRO_BATCH * world,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.05}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    dtype = torch.bfloat16 if bf16 else torch.float32

    start_step = 0
    ema: dict[str, torch.Tensor] | None = None
    found = newest_complete(run_dir / "checkpoints")
    if found is not None:
        tag, start_step = found
        _, client = engine.load_checkpoint(str(run_dir / "checkpoints"), tag=tag)
        ema = client.get("ema")

    tracker = Tracker.start(
        cfg.tracking,
        run_dir,
        params=config_mod.flatten(cfg),
        tags=standard_tags(cfg, world, "cpu", dataset="tiny-random"),
        rank=rank,
        run_id=None,
    )
    shared = [tracker.run_id]
    dist.broadcast_object_list(shared, src=0)  # the trainer's contract: every rank knows the id
    assert shared[0] == tracker.run_id or rank != 0

    gen = torch.Generator().manual_seed(1234 + rank)
    engine.train()
    for step in range(start_step + 1, start_step + args.steps + 1):
        t0 = time.perf_counter()
        x = torch.randn(MICRO_BATCH, 3, 32, 32, generator=gen).to(dtype)
        y = torch.randint(0, NUM_CLASSES, (MICRO_BATCH,), generator=gen)
        loss = F.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
        if "ema" in flags and stage < 3:
            current = strip(
                {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
            )
            ema = (
                current
                if ema is None
                else {k: EMA_DECAY * ema[k] + (1 - EMA_DECAY) * current[k] for k in current}
            )
        loss_value = loss.detach().float()
        dist.all_reduce(loss_value)
        tracker.log_metrics(
            {
                "train/loss": loss_value.item() / world,
                "train/lr": engine.get_lr()[0],
                "train/img_per_s": MICRO_BATCH * world / (time.perf_counter() - t0),
            },
            step=step,
        )
        if args.pause_after == step:
            if rank == 0:
                (run_dir / "paused").write_text(str(step))
            while not Path(args.go_file).exists():
                time.sleep(0.2)
            dist.barrier()

    step = start_step + args.steps
    tag = f"step_{step:08d}"
    client_state = {"step": step, "epoch": 0}
    if ema is not None:
        client_state["ema"] = ema
    engine.save_checkpoint(str(run_dir / "checkpoints"), tag=tag, client_state=client_state)
    dist.barrier()
    if rank == 0:
        (run_dir / "checkpoints" / tag / "COMPLETE").write_text(
            json.dumps({"step": step, "epoch": 0})
        )

    # Ground truth for the export: the trained student's eval-mode logits on fixed inputs.
    engine.eval()
    ref_x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = engine(ref_x.to(dtype)).float()
    if rank == 0:
        tensors = {"inputs": ref_x, "logits": logits.contiguous()}
        if ema is not None:
            plain = timm.create_model(ARCH, num_classes=NUM_CLASSES, **MODEL_ARGS)
            plain.load_state_dict(ema)
            with torch.no_grad():
                tensors["ema_logits"] = plain.eval()(ref_x)
        save_file(tensors, str(run_dir / "reference.safetensors"))
        per_class = [(i, float(i % 3) / 2) for i in range(NUM_CLASSES)]
        (run_dir / "eval").mkdir(exist_ok=True)
        csv = run_dir / "eval" / "per_class.csv"
        csv.write_text("class,accuracy\n" + "".join(f"{c},{a}\n" for c, a in per_class))
        latest = {
            "step": step,
            "metrics": {
                "mean/overall": 61.5,
                "mean/paper/head": 80.0,
                "mean/paper/mid": 60.25,
                "mean/paper/tail": 40.0,
            },
        }
        (run_dir / "eval" / "latest.json").write_text(json.dumps(latest))
        tracker.log_metrics({f"eval/{k}": v for k, v in latest["metrics"].items()}, step=step)
        tracker.log_artifact(csv, "eval")
    tracker.close()
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", action="append", required=True, help="RUN_DIR:STAGE[:flags]")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--experiment", default="tiny")
    parser.add_argument("--pause-after", type=int, default=None)
    parser.add_argument("--go-file", default="")
    args = parser.parse_args()
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for text in args.job:
        run_job(parse_job(text), args, rank, world)
    dist.barrier()
    if rank == 0:
        print("ds_tiny_run: done", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
