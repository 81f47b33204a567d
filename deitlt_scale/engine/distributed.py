"""Process-group setup from the launcher's environment, and the DeepSpeed config.

Launchers understood: torchrun (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), SLURM's srun with
one task per device (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS; the rendezvous follows the rule in
:mod:`deitlt_scale.engine.rendezvous`, shared with slurm/common.sh) and a plain single process.
NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

from deitlt_scale.config import Config, validate_world
from deitlt_scale.engine import rendezvous


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


def detect_launch() -> LaunchEnv:
    """Read rank and rendezvous from the environment (torchrun first, then SLURM)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        # The batch scripts export the same MASTER_ADDR/PORT; computing them here again from the
        # one rule also covers a bare `srun python -m deitlt_scale.cli train ...`.
        master_addr, master_port = rendezvous.rendezvous(env)
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_NTASKS"]),
            master_addr=master_addr,
            master_port=master_port,
            launcher="slurm",
        )
    return LaunchEnv(0, 0, 1, "127.0.0.1", _free_port(), "single")


def first_slurm_host(nodelist: str) -> str:
    """First host name of a SLURM node list such as ``gpu[003-006,010],cpu01`` (``gpu003``)."""
    return rendezvous.first_host(nodelist)


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from deitlt_scale.errors import UserError

            raise UserError("runtime.device=cuda but CUDA is not available; use runtime.device=cpu")
        torch.cuda.set_device(local_rank)
        torch.backends.cudnn.benchmark = True  # input shapes are fixed for a whole run
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_request: str = "auto") -> World:
    """Initialise torch.distributed (always, also for one process: DeepSpeed expects a group)."""
    import deepspeed

    launch = detect_launch()
    device = resolve_device(device_request, launch.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.update(
        RANK=str(launch.rank),
        LOCAL_RANK=str(launch.local_rank),
        WORLD_SIZE=str(launch.world_size),
        MASTER_ADDR=launch.master_addr,
        MASTER_PORT=str(launch.master_port),
    )
    if not torch.distributed.is_initialized():
        if launch.world_size == 1:
            # One process needs no rendezvous: an in-memory store, so no TCP port is claimed
            # (a port picked or inherited earlier can be taken by another process first).
            torch.distributed.init_process_group(
                backend, store=torch.distributed.HashStore(), rank=0, world_size=1
            )
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return World(launch.rank, launch.local_rank, launch.world_size, device, backend)


def shutdown_distributed() -> None:
    """Destroy the process group through DeepSpeed, which also drops the groups it cached: after
    a plain ``torch.distributed.destroy_process_group`` the next engine built in this process
    would use a destroyed group."""
    import deepspeed.comm

    if deepspeed.comm.is_initialized():
        deepspeed.comm.destroy_process_group()
    elif torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config from the typed config; the batch identity is checked here, once."""
    validate_world(cfg, world_size)
    t, ds = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer and ds.zero_stage >= 2:
        zero["offload_optimizer"] = {"device": "cpu"}
    elif ds.zero_stage in (1, 2):
        # The grad-norm pass syncs with the host every step; only clipping needs it. DeepSpeed's
        # BF16_Optimizer (ZeRO 1, bf16 weights, fp32 accumulation) refuses to run without it.
        fp32_accum_zero1 = ds.bf16 and ds.grad_accum_dtype == "fp32" and ds.zero_stage == 1
        zero["compute_grad_norm"] = ds.gradient_clipping > 0 or fp32_accum_zero1
    data_types = {"data_types": {"grad_accum_dtype": ds.grad_accum_dtype}} if ds.bf16 else {}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world_size,
        "gradient_clipping": ds.gradient_clipping,
        # bf16 has no loss scale to adjust; the trainer's own non-finite check stops a bad run
        # without the per-step host sync of DeepSpeed's overflow check.
        "bf16": {"enabled": ds.bf16, "check_grad_overflow": False},
        # The throughput timer synchronises the device on every step.
        "timers": {"throughput": {"enabled": False}},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        **data_types,  # under bf16: the dtype gradients are accumulated and reduced in
    }


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Send a small picklable value from ``src`` to every rank (e.g. the MLflow run id)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
