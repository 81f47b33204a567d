"""The training loop: a DeepSpeed student (or teacher) engine fed by DALI, one objective, resume.

Randomness is a pure function of (seed, rank, step, micro-step): the data order of an epoch comes
from (seed, epoch, rank), mixup from a per-micro-step seed, and the torch generator (drop path) is
re-seeded per micro-step. Resuming from a checkpoint therefore needs only the step counter, and a
killed-and-resumed run follows the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deitlt_scale import config as config_mod
from deitlt_scale import tasks
from deitlt_scale.config import Config
from deitlt_scale.data import meta as meta_mod
from deitlt_scale.engine import checkpoint, selection
from deitlt_scale.engine.distributed import World, deepspeed_config
from deitlt_scale.engine.evaluate import EvalResult, evaluate_run, format_table, write_json_atomic
from deitlt_scale.engine.warm_start import warm_start
from deitlt_scale.steps import resolve_steps
from deitlt_scale.tracking.writer import MetricWriter

EXIT_REQUEUE = 75  # stopped by a signal after a complete checkpoint: requeue and resume
EXIT_NONFINITE = 3
# RUN_DIR/train_summary.json: the finished run's training throughput and mean train metrics, over
# every attempt (each checkpoint carries the sums so far: StepWindow.totals)
SUMMARY_FILE = "train_summary.json"


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    best_metric: float = -math.inf
    best_step: int = -1

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "best_metric": self.best_metric, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.best_metric = float(state["best_metric"])
        self.best_step = int(state["best_step"])


class Trainer:
    """Build with :meth:`build`, then :meth:`train`. Every method runs on every rank."""

    def __init__(self, cfg: Config, world: World, meta: meta_mod.DatasetMeta | None = None) -> None:
        """``meta`` overrides reading ``cfg.data.shards/meta.json`` (benchmarks on synthetic data)."""
        self.cfg, self.world = cfg, world
        self._given_meta = meta
        self.run_dir = Path(cfg.runtime.run_dir)
        self.state = TrainState()
        self._stop_signal: int | None = None
        self._flags_pending: tuple[torch.Tensor, Any] | None = None
        self._step_skipped = False
        self.window: StepWindow | None = None  # created by the first train_step
        self._carried: dict[str, Any] | None = None  # the resumed checkpoint's StepWindow.totals

    # ---------------------------------------------------------------- build
    def build(self, with_data: bool = True) -> Trainer:
        """Build every part; ``with_data=False`` skips the DALI loaders (synthetic benchmarks)."""
        from deitlt_scale.engine import components

        cfg, world = self.cfg, self.world
        self.meta = self._given_meta or meta_mod.load(cfg.data.shards)
        self.num_classes = self.meta.num_classes
        self.steps = resolve_steps(cfg, self.meta.num_samples("train"), world.world_size)
        self.peak_lr = components.peak_lr(cfg, world.world_size)
        self.ds_config = deepspeed_config(cfg, world.world_size)
        self.resume_from = (
            checkpoint.latest_checkpoint(self.run_dir) if cfg.checkpoint.resume else None
        )
        if self._resume_needs_universal():
            # The newest checkpoint was written by another number of processes.
            self.ds_config["checkpoint"] = {"load_universal": True}
        self.compute_dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
        self.task = tasks.create(cfg, self.meta, world.device)
        torch.manual_seed(cfg.train.seed)  # the same initial weights for the same seed
        model = self.task.build_model()
        # A later stage (e.g. at a higher resolution) starts from a trained run's weights.
        init_note = warm_start(model, cfg.train.init_from)
        if init_note is not None and world.is_main:
            print(init_note, flush=True)
        self.model_spec = self.task.model_spec()
        if cfg.model.compile:
            model = torch.compile(model, mode=cfg.model.compile_mode)
        self.engine = components.build_engine(
            model, cfg.optim, self.ds_config, self.peak_lr, world.device
        )
        self.train_loader = self.eval_loader = self.val_loader = None
        if with_data:
            self.train_loader = components.build_train_loader(
                cfg, self.meta, self.steps, world, views=self.task.train_views()
            )
            self.eval_loader = components.build_eval_loader(cfg, self.meta, world)
            self.val_loader = selection.build_val_loader(cfg, self.meta, world)
        return self

    def describe(self) -> str:
        cfg, w, s = self.cfg, self.world, self.steps
        return "\n".join(
            [
                f"run dir      {self.run_dir}",
                f"task         {self.task.name}  data {self.meta.dataset} ({self.meta.num_samples('train')} train"
                f" / {self.meta.num_samples('eval')} eval images, {self.num_classes} classes)",
                f"world        {w.world_size} process(es) on {w.device.type} ({w.backend}), rank {w.rank}",
                f"batch        {cfg.train.micro_batch} per process x {cfg.train.grad_accum} accumulation"
                f" x {w.world_size} = {cfg.train.micro_batch * cfg.train.grad_accum * w.world_size} global",
                f"schedule     {s.steps_per_epoch} steps/epoch, {s.total} steps, warm-up {s.warmup},"
                f" DRW from step {s.drw_start}, peak lr {self.peak_lr:.3g}",
                f"deepspeed    ZeRO {cfg.deepspeed.zero_stage}, bf16 {cfg.deepspeed.bf16},"
                f" compile {cfg.model.compile_mode if cfg.model.compile else 'off'}",
                f"trains       {self.task.describe()}",
            ]
        )

    # ---------------------------------------------------------------- loop
    def train(self, tracker: MetricWriter) -> int:
        """Run to the end (0), or stop on a signal after a checkpoint (EXIT_REQUEUE)."""
        self.tracker = tracker
        self._install_signal_handlers()
        self._resume()
        s = self.steps
        while self.state.step < s.total:
            epoch, first = divmod(self.state.step, s.steps_per_epoch)
            batches = iter(
                self.train_loader.epoch(epoch, start=s.first_micro_batch(self.state.step))
            )
            for _ in range(first, min(s.steps_per_epoch, s.total - epoch * s.steps_per_epoch)):
                if self.train_step(batches):
                    self._save(epoch)
                    return EXIT_REQUEUE
                if self._should_save_midepoch():
                    self._save(epoch)
            self._end_of_epoch(epoch)
        self.finish_steps()
        window = self.window
        if window is None and self._carried:  # resumed after its last step: the saved sums
            window = StepWindow(self.world.device, carried=self._carried)
        if self.world.is_main and window is not None:
            write_json_atomic(self.run_dir / SUMMARY_FILE, window.summary(self.world.world_size))
        return 0

    def finish_steps(self) -> None:
        """Read the last step's flags now (raises NonFiniteLoss); call after the last step."""
        if self.window is not None:  # None: nothing left to train after resuming
            self._check_flags(final=True)

    def train_step(self, batches: Iterator[Any]) -> bool:
        """One optimizer step over its micro-batches (``grad_accum``, fewer in an epoch's last
        step: :meth:`Steps.micro_batches_in_step`); True when a stop was requested."""
        if self.window is None:
            self.window = StepWindow(self.world.device, carried=self._carried)
        step, window = self.state.step, self.window
        started = time.perf_counter()
        self._set_lr(step)
        self._step_skipped = False
        count = self.steps.micro_batches_in_step(step)
        for micro in range(count):
            t0 = time.perf_counter()
            batch = next(batches)
            window.data_time += time.perf_counter() - t0
            window.add(self.train_micro_step(batch, step, micro, count))
            window.images += int(batch.labels.shape[0])
            window.run_images += int(batch.labels.shape[0])
        self.state.step = step + 1
        window.steps += 1
        window.run_steps += 1
        stop = self._check_flags()
        window.step_seconds += time.perf_counter() - started
        if self.state.step % self.cfg.train.log_every == 0:
            self._log(window.flush(self.state.step, self.world.world_size))
        return stop

    def train_micro_step(
        self, batch: Any, step: int, micro: int, count: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Forward, loss and backward of micro-batch ``micro`` of the ``count`` that optimizer
        step ``step`` accumulates (default ``grad_accum``); the engine steps after the last."""
        cfg, task = self.cfg, self.task
        seed = mix_seed(cfg.train.seed, self.world.rank, step, micro)
        torch.manual_seed(seed)  # drop path and any other torch randomness
        drw = self.steps.drw_start is not None and step >= self.steps.drw_start
        mb = task.inputs(batch, seed, drw)
        # On CUDA the teacher runs on a side stream while the student's forward runs.
        teacher = task.teacher.launch(mb.images) if task.teacher is not None else None
        out = task.forward(self.engine, mb, self.compute_dtype)
        parts = task.loss(out, mb, teacher.wait() if teacher is not None else None, drw)
        loss = parts["loss"]
        if cfg.train.on_nonfinite == "skip" and self._any_rank_nonfinite(loss):
            # Keep every rank's collectives aligned: a zero-gradient backward from the
            # parameters alone (activations may hold NaN), so this micro-batch adds nothing.
            loss = sum(p.sum() for p in self.engine.module.parameters() if p.requires_grad) * 0.0
            parts = {"loss": loss.detach(), "skipped": torch.ones((), device=loss.device)}
            self._step_skipped = True
        accum = cfg.train.grad_accum
        count = accum if count is None else count
        # The boundary is set explicitly: DeepSpeed's own micro-step counter assumes groups of
        # grad_accum, and an epoch's last group may be shorter.
        self.engine.set_gradient_accumulation_boundary(micro == count - 1)
        if count != accum:
            # DeepSpeed divides by grad_accum; a short group's gradient is the mean over the
            # micro-batches it really has.
            loss = loss * (accum / count)
        self.engine.backward(loss)
        if cfg.optim.sam_rho > 0:
            self._sam_second_pass(mb, step, drw)
        if self._step_skipped and micro == count - 1:
            # lr 0 leaves the weights as they are (weight decay is scaled by lr too).
            for group in self.engine.optimizer.param_groups:
                group["lr"] = 0.0
        self.engine.step()
        if not self._step_skipped:
            task.after_micro_step(self.engine, out, mb)
        return {k: v.detach() for k, v in parts.items()}

    # ---------------------------------------------------------------- pieces
    def _sam_second_pass(self, mb: tasks.MicroBatch, step: int, drw: bool) -> None:
        """SAM: the gradient at the perturbed weights replaces the first pass's."""
        from deitlt_scale.optim import rho_at, sam_perturb, sam_restore

        optim = self.cfg.optim
        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        rho = rho_at(step, optim, self.steps.steps_per_epoch)
        undo = sam_perturb(params, rho, optim.sam_adaptive)
        self.engine.optimizer.zero_grad()
        out = self.task.forward(self.engine, mb, self.compute_dtype, again=True)
        self.engine.backward(self.task.loss(out, mb, None, drw)["loss"])
        sam_restore(params, undo)

    def _set_lr(self, step: int) -> None:
        from deitlt_scale.optim import scheduled_lr

        lr = scheduled_lr(
            step,
            self.cfg.schedule,
            peak=self.peak_lr,
            steps_per_epoch=self.steps.steps_per_epoch,
            total_steps=self.steps.scheduled,
        )
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # layer-wise lr decay, if any
        self._lr = lr

    def _any_rank_nonfinite(self, loss: torch.Tensor) -> bool:
        flag = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.world.world_size > 1:
            torch.distributed.all_reduce(flag)
        return bool(flag.item())

    def _check_flags(self, final: bool = False) -> bool:
        """All-reduced [non-finite, stop] flags, read one step late so no step waits on the device."""
        window = self.window
        # torch.full, not torch.tensor: no blocking host-to-device copy on CUDA.
        stop = torch.full((), float(self._stop_signal is not None), device=self.world.device)
        flags = torch.stack([window.nonfinite.clamp(max=1), stop])
        window.nonfinite.zero_()
        if self.world.world_size > 1:
            torch.distributed.all_reduce(flags)
        previous = self._flags_pending
        self._flags_pending = (flags.to("cpu", non_blocking=True), _record_event(flags.device))
        checks = [previous, self._flags_pending] if final else [previous]
        for entry in checks:
            if entry is None:
                continue
            pending, copied = entry
            if copied is not None:
                copied.synchronize()  # long finished: it was queued a whole step ago
            self._raise_if_nonfinite(pending)
            if pending[1] > 0:
                return True
        return False

    def _raise_if_nonfinite(self, pending: torch.Tensor) -> None:
        if pending[0] > 0 and self.cfg.train.on_nonfinite == "stop":
            last = checkpoint.latest_checkpoint(self.run_dir)
            raise NonFiniteLoss(
                f"non-finite loss at or before step {self.state.step}; last good checkpoint: "
                f"{last.path if last else 'none'} (set train.on_nonfinite=skip to skip such batches)"
            )

    def _end_of_epoch(self, epoch: int) -> None:
        cfg, done = self.cfg, self.state.step >= self.steps.total
        if (epoch + 1) % cfg.eval.every_epochs == 0 or done:
            chooser = self.run_eval()
            metric = chooser.metrics[self.task.headline]
            if metric > self.state.best_metric:
                self.state.best_metric, self.state.best_step = metric, self.state.step
                self._save(epoch, best=True)
                if self.world.is_main:
                    split = selection.selection_split(self.meta)
                    eval_dir, step = self.run_dir / "eval", self.state.step
                    selection.record_selection(eval_dir, split, self.task.headline, step, metric)
                    # The eval split's figures of the best checkpoint, beside latest.json's
                    # figures of the final one.
                    write_json_atomic(
                        eval_dir / "best.json",
                        {"step": step, "selected_on": split, "metrics": self._test_result.metrics},
                    )
        if (epoch + 1) % cfg.checkpoint.every_epochs == 0 or done:
            self._save(epoch)

    def _should_save_midepoch(self) -> bool:
        every = self.cfg.checkpoint.every_steps
        return (
            every > 0
            and self.state.step % every == 0
            and self.state.step % self.steps.steps_per_epoch != 0
        )

    def run_eval(self) -> EvalResult:
        """Evaluate the live model on the eval split and, when the dataset has one, the val
        split (all ranks); rank 0 writes and logs both. Returns the result the best checkpoint
        is chosen on: the val split's, else the eval split's (as the reference does)."""
        eval_dir, step = self.run_dir / "eval", self.state.step
        self.engine.eval()
        try:
            if self.task.classifies:
                result = evaluate_run(
                    self.predict, self.eval_loader, self.meta, self.world, eval_dir, step
                )
                chooser = selection.evaluate_selection(
                    self.predict, self.val_loader, result, self.meta, self.world, eval_dir, step
                )
            else:
                result = self._evaluate_split(self.eval_loader, eval_dir)
                chooser = result
                if self.val_loader is not None:
                    chooser = self._evaluate_split(self.val_loader, eval_dir / selection.VAL_DIR)
        finally:
            self.engine.train()
        self._test_result = result
        if self.world.is_main and chooser is not result:
            self.tracker.log_metrics({f"val/{k}": v for k, v in chooser.metrics.items()}, step)
        if self.world.is_main:
            table = format_table(result) if self.task.classifies else json.dumps(result.metrics)
            print(f"[step {self.state.step}] eval\n{table}", flush=True)
            self.tracker.log_metrics(
                {f"eval/{k}": v for k, v in result.metrics.items()}, self.state.step
            )
        return chooser

    def _evaluate_split(self, batches: Any, out_dir: Path) -> EvalResult:
        """A task without classes measures the split its own way (MAE: the reconstruction
        loss); rank 0 writes ``out_dir/latest.json`` as evaluation does."""
        metrics = self.task.evaluate_split(self.engine, batches, self.world)
        if self.world.is_main:
            write_json_atomic(
                out_dir / "latest.json", {"step": self.state.step, "metrics": metrics}
            )
        return EvalResult(metrics, {}, [])

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per reported head through the engine's forward (ZeRO-3 gathers parameters)."""
        return self.task.predict(self.engine, images.to(self.compute_dtype))

    def _save(self, epoch: int, best: bool = False) -> None:
        if self._flags_pending is not None:
            # Never write a checkpoint from a step whose loss was not finite.
            pending, copied = self._flags_pending
            if copied is not None:
                copied.synchronize()
            self._raise_if_nonfinite(pending)
        client = {
            "train_state": self.state.state_dict(),
            "config_hash": config_mod.config_hash(self.cfg),
            "world_size": self.world.world_size,
            # Lets deepspeed.checkpoint.ds_to_universal convert it for another world size.
            "universal_checkpoint_info": {"universal_checkpoint_version": 0.4},
            # So that the run's summary covers every attempt, not only the one that finishes.
            "train_totals": (
                self.window.totals(self.world.world_size) if self.window else self._carried
            ),
        }
        where = dict(
            step=self.state.step,
            epoch=epoch,
            world_size=self.world.world_size,
            client_state=client,
            is_main=self.world.is_main,
        )
        if best:
            checkpoint.save_best(self.engine, self.run_dir, **where)
        else:
            tag = checkpoint.step_tag(self.state.step)
            keep = self.cfg.checkpoint.keep_last
            checkpoint.save(self.engine, self.run_dir, tag, keep_last=keep, **where)

    def _resume_needs_universal(self) -> bool:
        ref = self.resume_from
        return (
            ref is not None
            and ref.world_size != self.world.world_size
            and self.cfg.deepspeed.zero_stage > 0  # ZeRO-0 optimizer state is not partitioned
        )

    def _resume(self) -> None:
        ref = self.resume_from
        if ref is None:
            return
        if self._resume_needs_universal():
            ref = checkpoint.to_universal(ref, self.world.is_main)
        client = checkpoint.load(self.engine, ref)
        if client.get("config_hash") != config_mod.config_hash(self.cfg) and self.world.is_main:
            print(
                f"warning: the config differs from the one that wrote {ref.path}", file=sys.stderr
            )
        self.state.load_state_dict(client["train_state"])
        self._carried = client.get("train_totals")  # absent from checkpoints of older versions
        if self.world.is_main:
            print(f"resumed from {ref.path} at step {self.state.step}", flush=True)

    def _log(self, metrics: dict[str, float]) -> None:
        metrics["train/lr"] = self._lr
        metrics["train/epoch"] = self.state.step / self.steps.steps_per_epoch
        if self.world.is_main:
            self.tracker.log_metrics(metrics, self.state.step)

    def _install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self._stop_signal = signum

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, handler)


class StepWindow:
    """Running sums of the step's named losses on the device; read only at log steps. Sums
    over the whole run are kept beside them for :meth:`summary`: a resumed run starts them from
    the ``carried`` :meth:`totals` that its checkpoint saved."""

    def __init__(self, device: torch.device, carried: Mapping[str, Any] | None = None) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0  # micro-batches since the last flush
        self.steps = 0  # optimizer steps since the last flush
        self.images = 0  # images this rank trained on since the last flush
        self.data_time = 0.0
        self.started = time.perf_counter()
        self.nonfinite = torch.zeros((), device=device)
        self.run_sums: dict[str, torch.Tensor] = {}
        self.run_count = self.run_steps = self.run_images = 0
        self.step_seconds = 0.0  # in train_step (data waits included; evals and saves not)
        if carried:
            self.run_sums = {
                k: torch.tensor(v, dtype=torch.float32, device=device)
                for k, v in carried["sums"].items()
            }
            self.run_count, self.run_steps = carried["micro_batches"], carried["steps"]
            self.step_seconds = carried["train_seconds"]
        # All ranks' images of earlier attempts, which may have had another world size.
        self.earlier_images = carried["images"] if carried else 0

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        for key, value in parts.items():
            value = value.float()
            zero = torch.zeros((), device=self.device)
            self.sums[key] = self.sums.get(key, zero) + value
            self.run_sums[key] = self.run_sums.get(key, zero) + value
        self.nonfinite += (~torch.isfinite(parts["loss"])).float()
        self.count += 1
        self.run_count += 1

    def flush(self, step: int, world_size: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self.started
        values = {f"train/{k}": float(v) / max(self.count, 1) for k, v in self.sums.items()}
        # Every rank trains on the same number of images per step.
        values["train/images_per_s"] = self.images * world_size / max(elapsed, 1e-9)
        values["train/data_wait_fraction"] = self.data_time / max(elapsed, 1e-9)
        self.sums, self.count, self.steps, self.images, self.data_time = {}, 0, 0, 0, 0.0
        self.started = time.perf_counter()
        return values

    def all_images(self, world_size: int) -> int:
        """Images of all ranks over every attempt (each rank trains on as many per step)."""
        return self.earlier_images + self.run_images * world_size

    def totals(self, world_size: int) -> dict[str, Any]:
        """The sums over the run so far, as a checkpoint keeps them (plain numbers): images of
        all ranks, the rest this rank's."""
        return {
            "micro_batches": self.run_count,
            "steps": self.run_steps,
            "images": self.all_images(world_size),
            "train_seconds": self.step_seconds,
            "sums": {k: float(v) for k, v in self.run_sums.items()},
        }

    def summary(self, world_size: int) -> dict[str, float]:
        """The run's steps, images (all ranks), seconds in steps, images/s and the mean of every
        train metric (e.g. ``teacher_agreement``) over this rank's micro-batches, every attempt
        included (where its checkpoints carried the sums)."""
        images = self.all_images(world_size)
        means = {k: float(v) / max(self.run_count, 1) for k, v in self.run_sums.items()}
        return {
            "steps": self.run_steps,
            "images": images,
            "train_seconds": round(self.step_seconds, 3),
            "images_per_s": round(images / max(self.step_seconds, 1e-9), 2),
            **means,
        }


def _record_event(device: torch.device) -> Any:
    if device.type != "cuda":
        return None  # a CPU copy is complete when .to() returns
    event = torch.cuda.Event()
    event.record()
    return event


def mix_seed(seed: int, rank: int, step: int, micro: int) -> int:
    # A 63-bit mix of the four integers: independent streams per rank, step and micro-step.
    h = (
        seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB + micro
    ) & ((1 << 63) - 1)
    h ^= h >> 31
    return (h * 0xD6E8FEB86659FD93) & ((1 << 63) - 1)
