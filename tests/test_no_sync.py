"""The training step never waits for the device outside logging steps.

A host sync (``loss.item()``, ``if flag:``, a blocking copy) stalls the CPU until the GPU has drained
its queue, so the next step's kernels cannot be queued while the current ones run. The trainer is
written to avoid them: losses accumulate on the device and are read only at log steps, and the
per-step flags travel by a non-blocking copy that is read one step later.

On CPU, :class:`HostSyncCounter` (a ``TorchFunctionMode``) watches every torch call of real steps
of a tiny :class:`~deitlt_scale.engine.trainer.Trainer` (real DeepSpeed engine, real frozen teacher,
synthetic batches) and records each operation that would synchronise on a GPU; calls of
DeepSpeed's ``accelerator.synchronize()`` (a no-op on its CPU accelerator) are recorded too. On CUDA
(``gpu`` tests) ``torch.cuda.set_sync_debug_mode`` reports the syncs the CUDA runtime sees.
``train.on_nonfinite=skip`` reads an all-reduced flag every micro-step by design; it is not covered.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

HOST = "_deitlt_host_resident"  # tensor attribute: the values live in host memory
TORCH_DIR = str(Path(torch.__file__).parent)
HERE = str(Path(__file__).resolve())
OVERRIDES = str(Path(torch.__file__).parent / "overrides.py")

# Methods that hand a tensor's values to Python (``.item()``, ``if t:``, ``float(t)``, printing).
VALUE_READS = frozenset(
    {
        "item", "tolist", "numpy", "__array__", "__bool__", "__float__", "__int__", "__index__",
        "__complex__", "__format__", "__repr__", "__str__", "__contains__",
    }
)  # fmt: skip
# Operations whose output shape depends on the values (the host must wait for them).
DATA_DEPENDENT = frozenset(
    {
        "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "bincount",
        "equal", "allclose", "is_nonzero",
    }
)  # fmt: skip
# Constructors whose result lives where ``device=`` says (host memory when it is not given).
FACTORIES = frozenset(
    {
        "tensor", "as_tensor", "scalar_tensor", "zeros", "ones", "empty", "full", "arange",
        "linspace", "rand", "randn", "randint", "from_numpy",
    }
)  # fmt: skip


@dataclass(frozen=True)
class SyncEvent:
    what: str
    where: tuple[str, ...]  # innermost-last "file:line function" outside torch

    def __str__(self) -> str:
        return f"{self.what}\n      at " + "\n      at ".join(self.where)


def _is_host(t: torch.Tensor) -> bool:
    return getattr(t, HOST, False)


def _tag(out: object, host: bool) -> None:
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            with contextlib.suppress(AttributeError, RuntimeError):  # subclasses may refuse
                setattr(t, HOST, host)


class HostSyncCounter(TorchFunctionMode):
    """Record every torch call that would make the host wait for the device on a GPU.

    On a CPU-only machine host and device memory are the same, so the counter tracks where each
    tensor *would* live from how it was made: constructors without ``device=`` (or with the host
    spelled ``"cpu"``), ``.cpu()``, non-blocking copies to the host, and anything computed only from
    such tensors are host-resident; everything else (parameters, batches, activations, anything
    placed on the training device) is device-resident. DeepSpeed's CPU accelerator names the
    training device ``"cpu"``, so a ``"cpu"`` spelled by DeepSpeed code means the device. Watch
    from before the trainer is built so its tensors get their provenance.

    Recorded (only while ``recording`` is set):

    * value reads of a device tensor: ``item``, ``tolist``, ``numpy``, ``bool``/``float``/``int``/
      ``index``, printing, ``in``;
    * value-dependent shapes on device tensors: ``nonzero``, boolean-mask indexing, ``unique``,
      ``masked_select``, ``bincount``, ``equal``, ``allclose``;
    * blocking copies to the host: ``.cpu()``, ``.to("cpu")`` without ``non_blocking=True``;
    * blocking copies from the host: ``torch.tensor(..., device=<device>)`` (a pageable copy that
      synchronises the stream on CUDA), ``.to(<device>)`` / ``copy_`` of a host tensor without
      ``non_blocking=True``.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.recording = False
        self.events: list[SyncEvent] = []

    # ------------------------------------------------------------------ classification
    @staticmethod
    def _caller_is_deepspeed() -> bool:
        """Whether the code that made the torch call being handled is DeepSpeed's."""
        frame = sys._getframe(1)
        while frame is not None and (
            frame.f_code.co_filename == HERE or frame.f_code.co_filename == OVERRIDES
        ):
            frame = frame.f_back
        return frame is not None and f"{os.sep}deepspeed{os.sep}" in frame.f_code.co_filename

    def _target_is_host(self, device: object) -> bool:
        """Whether a ``device=`` argument means host memory (see the class docstring)."""
        if device is None:
            return True
        if torch.device(device).type != "cpu":
            return False
        if self.device.type != "cpu":
            return True
        # A CPU run: "cpu" is ambiguous. DeepSpeed's accelerator spells the device "cpu"; project
        # code passes the training device as a torch.device (world.device, tensor.device).
        return not (isinstance(device, torch.device) or self._caller_is_deepspeed())

    def record(self, what: str) -> None:
        if not self.recording:
            return
        frames = [
            f"{Path(f.f_code.co_filename).name}:{f.f_lineno} {f.f_code.co_name}"
            for f in _frames_outside_torch()
        ]
        self.events.append(SyncEvent(what, tuple(frames[-5:])))

    # ------------------------------------------------------------------ the hook
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        all_host = bool(tensors) and all(_is_host(t) for t in tensors)
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        non_blocking = bool(kwargs.get("non_blocking", False)) or (
            name in ("to", "copy_") and any(a is True for a in args[1:])
        )
        out_host: bool | None = True if all_host else None  # None: leave the result untagged

        if name in VALUE_READS and first is not None and not _is_host(first):
            self.record(f"Tensor.{name}() reads a device tensor")
        elif name in DATA_DEPENDENT and tensors and not all_host:
            self.record(f"{name}() has a value-dependent result")
        elif name in ("__getitem__", "__setitem__") and first is not None and not _is_host(first):
            index = tree_flatten(args[1] if len(args) > 1 else None)[0]
            if any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in index
            ):
                self.record(f"boolean-mask Tensor.{name}")
        elif name == "cpu" and first is not None:
            if not _is_host(first):
                self.record("Tensor.cpu() copies to the host and waits")
            out_host = True
        elif name == "to" and first is not None:
            target = kwargs.get("device")
            if target is None:
                target = next((a for a in args[1:] if isinstance(a, str | torch.device)), None)
            if target is not None:
                to_host = self._target_is_host(target)
                if to_host and not _is_host(first) and not non_blocking:
                    self.record(f"Tensor.to({target!r}) copies to the host and waits")
                if not to_host and _is_host(first) and not non_blocking:
                    self.record(f"Tensor.to({target!r}) copies from pageable host memory")
                out_host = to_host
        elif name == "copy_" and first is not None and len(args) > 1:
            source = args[1]
            if _is_host(source) and not _is_host(first) and not non_blocking:
                self.record("Tensor.copy_() from host memory without non_blocking")
            out_host = _is_host(first)
        elif name in FACTORIES:
            target = kwargs.get("device")
            to_host = self._target_is_host(target)
            if name in ("tensor", "as_tensor") and not to_host:
                self.record(f"torch.{name}(..., device={target!r}) copies from pageable memory")
            out_host = to_host
        out = func(*args, **kwargs)
        if out_host is not None:
            _tag(out, out_host)
        return out


def _frames_outside_torch():
    """The calling frames, outermost first, without torch's, pytest's and this file's."""
    frame = sys._getframe(0)
    frames = []
    while frame is not None:
        path = frame.f_code.co_filename
        machinery = any(
            part in path for part in (f"{os.sep}_pytest{os.sep}", f"{os.sep}pluggy{os.sep}")
        )
        machinery = (
            machinery or path.startswith("<frozen") or frame.f_globals.get("__name__") == "__main__"
        )
        if not path.startswith(TORCH_DIR) and path != HERE and not machinery:
            frames.append(frame)
        frame = frame.f_back
    return list(reversed(frames))


def report(events: list[SyncEvent]) -> str:
    counts = Counter(events)
    return "\n".join(f"  {n} x {event}" for event, n in counts.most_common())


# --------------------------------------------------------------------------------------------
# Fixtures


def tiny_trainer(world, teacher: Path, run_dir: Path, device: str, **overrides: object):
    """A real Trainer (DeepSpeed engine, frozen ResNet-32 teacher) of a 2-block distilled DeiT at
    32 px, built without data loaders; logging steps never come (train.log_every is huge)."""
    from deitlt_scale import config as config_mod
    from deitlt_scale.benchmarks.synthetic import synthetic_meta
    from deitlt_scale.engine.trainer import Trainer

    settings = {
        "model.arch": "deit_tiny_distilled_patch16_224",
        "model.patch_size": 8,
        "model.embed_dim": 48,
        "model.depth": 2,
        "model.num_heads": 2,
        "data.image_size": 32,
        "teacher.path": teacher,
        "train.micro_batch": 8,
        "train.epochs": 1,
        "train.log_every": 1 << 30,
        "schedule.warmup_epochs": 0,
        "checkpoint.resume": "false",
        "tracking.enabled": "false",
        "runtime.run_dir": run_dir,
        "runtime.device": device,
        **overrides,
    }
    cfg = config_mod.load(None, [f"{k}={v}" for k, v in settings.items()])
    return Trainer(cfg, world, meta=synthetic_meta(10, 8 * 16)).build(with_data=False)


def synthetic_batch(device: torch.device, size: int = 32):
    from deitlt_scale.benchmarks.synthetic import DeviceBatch

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, size, size, generator=gen)
    labels = torch.randint(0, 10, (8,), generator=gen)
    return DeviceBatch(images.to(device), labels.to(device))


def run_steps(trainer, batch, count: int) -> None:
    """Trainer.train_step on a repeated device batch (train.log_every is never reached)."""
    batches = itertools.repeat(batch)
    for _ in range(count):
        trainer.train_step(batches)


# --------------------------------------------------------------------------------------------
# The counter itself


def test_counter_records_reads_and_blocking_copies_but_not_late_host_reads():
    counter = HostSyncCounter(torch.device("cpu"))
    counter.recording = True
    device = torch.device("cpu")
    weights = torch.nn.Linear(4, 2)
    with counter:
        loss = weights(torch.ones(3, 4, device=device)).sum()
        loss.item()
        _ = bool(loss > 0)
        torch.tensor(1.0, device=device)
        loss.detach().to("cpu")
        torch.ones(2, device=device)[torch.ones(2, device=device) > 0]
        recorded = len(counter.events)
        pending = loss.detach().to("cpu", non_blocking=True)
        _ = bool(pending > 0)  # a host copy read a step later is not a sync
        _ = torch.full((), 1.0, device=device) + loss  # device-side constant
        torch.zeros(3).sum().item()  # host tensors read on the host
    whats = [e.what for e in counter.events]
    assert recorded == 5, report(counter.events)
    assert len(whats) == recorded, report(counter.events[recorded:])
    assert "Tensor.item() reads a device tensor" in whats
    assert "Tensor.__bool__() reads a device tensor" in whats
    assert any(w.startswith("torch.tensor(") for w in whats)
    assert any(w.startswith("Tensor.to('cpu') copies to the host") for w in whats)


# --------------------------------------------------------------------------------------------
# The trainer


RECIPES = {
    # The paper recipes: bf16, ZeRO 1, mixup/cutmix with smoothed targets, hard distillation.
    "bf16-zero1-mixup": {"deepspeed.bf16": "true", "deepspeed.zero_stage": 1},
    # The CIFAR DRW phase in fp32 under ZeRO 2: no mixup, hard-label CE, class-weighted DIST CE.
    "fp32-zero2-drw": {
        "deepspeed.bf16": "false",
        "deepspeed.zero_stage": 2,
        "distill.drw_epoch": 0,
        "distill.no_mixup_drw": "true",
    },
}


def watch_device_synchronize(counter: HostSyncCounter, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also record calls of DeepSpeed's accelerator ``synchronize`` (``torch.cuda.synchronize`` on
    GPUs, a no-op on the CPU accelerator, so invisible to the torch function mode)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    real = accelerator.synchronize

    def synchronize(*args, **kwargs):
        counter.record("DeepSpeed accelerator.synchronize() waits for the whole device")
        return real(*args, **kwargs)

    monkeypatch.setattr(accelerator, "synchronize", synchronize)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_training_steps_and_flag_exchange_never_wait_for_the_device(
    world, random_teacher, tmp_path, monkeypatch, recipe
):
    counter = HostSyncCounter(world.device)
    watch_device_synchronize(counter, monkeypatch)
    with counter:  # from before the build, so every tensor's provenance is known
        trainer = tiny_trainer(
            world, random_teacher, tmp_path / "run", world.device.type, **RECIPES[recipe]
        )
        batch = synthetic_batch(world.device)
        run_steps(trainer, batch, count=1)  # fills one-time caches
        counter.recording = True
        run_steps(trainer, batch, count=4)  # DeepSpeed's timers start at 2
        counter.recording = False
    assert trainer.window.count == 5  # the steps ran and their losses accumulated on the device
    if counter.events:
        pytest.fail(f"host syncs in {recipe} training steps:\n{report(counter.events)}")


@pytest.mark.gpu
def test_cuda_training_steps_never_synchronise(world, random_teacher, tmp_path):
    """The CUDA runtime's own view: set_sync_debug_mode reports every synchronising call."""
    trainer = tiny_trainer(
        world, random_teacher, tmp_path / "run", "cuda", **RECIPES["bf16-zero1-mixup"]
    )
    batch = synthetic_batch(world.device)
    run_steps(trainer, batch, count=2)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_steps(trainer, batch, count=3)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where = "\n".join(f"  {w.filename}:{w.lineno}: {w.message}" for w in syncs)
    if syncs:
        pytest.fail(f"synchronising CUDA calls in training steps:\n{where}")
