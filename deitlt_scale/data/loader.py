"""Iterators over the DALI graphs of :mod:`deitlt_scale.data.dali`, yielding :class:`Batch`.

Data order (train): the reference's sampler, exactly (:mod:`deitlt_scale.data.epoch_plan`). Each
epoch draws a permutation of the whole training split from ``(seed, epoch)`` (the same on every
rank), repeats each sample ``data.repeated_aug`` times, and trains on
``floor(floor(N / data.epoch_multiple) * data.epoch_multiple / world)`` samples per rank, in
micro-batches of ``micro_batch`` (the last one may be smaller). Every micro-batch holds, over all
ranks, the samples the reference's micro-batch of that index holds; a rank reads each of its
samples once (:mod:`deitlt_scale.data.sample_store`: from memory, or by ``pread`` from the tars)
and feeds the encoded bytes to DALI through ``fn.external_source``. The copies of an image sit in
a random order inside the micro-batch (mixup pairs image i with image B - 1 - i). With
``data.repeated_aug_decode=per_copy`` each copy's bytes are fed in that order and decoded with
its own crop; with ``once`` each image is decoded once and augmented ``repeated_aug`` times in
separate branches, and the copies are put in order on the torch side. Either way every copy has
its own augmentation draws, seeded by ``(seed, epoch, rank)``, and every :class:`Batch` carries
the stored sample index of each image.

Each epoch runs its own pipeline, seeded with the epoch's seed. The graph is defined in Python
once per loader (a fraction of a second: RandAugment's conditionals are traced by DALI's
AutoGraph) and serialized; every epoch deserializes it with its own seed, which is a few tens of
milliseconds of C++. Defining the graph anew each epoch held the interpreter lock long enough to
slow a small recipe's training by 1.7x (digits-lt: six steps an epoch; docs/benchmarks.md). The
next epoch's pipeline is still made in a background thread while the current epoch runs. The
encoded samples reach the graph through ``feed_input`` from the pipeline's ``iter_setup`` (the
deserialized graph has no Python callback), one micro-batch per run.

Resuming (``start > 0``) rebuilds the same pipeline and runs and discards the first ``start``
micro-batches, so the samples and the augmentation draws equal those of an uninterrupted epoch.

Eval reads each rank's range in stored order; every rank yields the same number of batches
(``ceil(max range / micro_batch)``) so collective ops stay in lock-step, and positions past the
rank's range carry label -1.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from nvidia.dali import Pipeline

from deitlt_scale.config import DataConfig
from deitlt_scale.data.dali import (
    ENCODED_NAME,
    ContrastViews,
    EvalGraph,
    TrainGraph,
    shard_range,
)
from deitlt_scale.data.epoch_plan import EpochLayout, MicroBatch, epoch_plan
from deitlt_scale.data.meta import DatasetMeta
from deitlt_scale.data.sample_store import SampleStore, open_store
from deitlt_scale.data.seeds import derive_seed
from deitlt_scale.data.shard_files import ShardFiles, check_shards, shard_error
from deitlt_scale.errors import UserError

RANDAUGMENT_MSTD = 0.5  # timm "mstd0.5": Gaussian noise on the magnitude, per op


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) float32, normalised, on the target device
    labels: torch.Tensor  # (B,) int64 model labels on the same device; -1 marks eval padding
    # (B,) int64 on the CPU: the stored index of each image's sample (train batches only)
    samples: torch.Tensor | None = None
    # (B, 3, H, W): a second, independently augmented view of each image (PaCo's key view;
    # ``images`` is then the query view); None for one-view recipes
    key_images: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------
# Labels


def parse_labels(raw: torch.Tensor) -> torch.Tensor:
    """(B, LABEL_BYTES) uint8 ASCII decimal digits padded with zero bytes -> (B,) int64.

    Vectorised on whatever device ``raw`` lives on (no host sync).
    """
    present = raw != 0
    digits = (raw.to(torch.int64) - ord("0")) * present
    length = present.sum(dim=1, keepdim=True)
    position = torch.arange(raw.shape[1], device=raw.device)
    exponent = (length - 1 - position).clamp(min=0)
    return (digits * torch.pow(10, exponent)).sum(dim=1)


# --------------------------------------------------------------------------------------------
# Device


def resolve_backend(setting: str) -> Literal["cpu", "gpu"]:
    """``data.device`` -> the DALI backend; ``gpu`` without CUDA is a UserError."""
    if setting == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if setting == "gpu" and not torch.cuda.is_available():
        raise UserError("data.device=gpu but CUDA is not available; set data.device=cpu")
    if setting not in ("cpu", "gpu"):
        raise UserError(f"data.device must be auto, cpu or gpu, got {setting!r}")
    return setting  # type: ignore[return-value]


def _device_id(backend: str, device: torch.device) -> int | None:
    if backend == "cpu":
        return None
    if device.type == "cuda" and device.index is not None:
        return device.index
    return torch.cuda.current_device()


# --------------------------------------------------------------------------------------------
# Running a pipeline


def _run(
    pipe, count: int, skip: int, shards: list[ShardFiles], outputs: list[str]
) -> Iterator[tuple]:
    """Yield ``count - skip`` tuples of torch outputs after discarding ``skip`` batches."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    try:
        try:
            stream = DALIGenericIterator([pipe], outputs, size=-1, auto_reset=False)
        except RuntimeError as err:
            raise shard_error(err, shards) from None
        for step in range(count):
            try:
                out = next(stream)[0]
            except (RuntimeError, StopIteration) as err:
                raise shard_error(err, shards) from None
            if step >= skip:
                yield tuple(out[name] for name in outputs)
    finally:
        del pipe


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------
# Loaders


class _Feed:
    """The input of one epoch's pipeline: the next micro-batch's encoded samples, once per image
    (``per_copy``: in the micro-batch's order) or once per entry (``once``)."""

    def __init__(self, store: SampleStore, plan: list[MicroBatch], per_copy: bool) -> None:
        self.store, self.plan, self.per_copy = store, plan, per_copy
        self.fed = 0  # micro-batches handed to the pipeline so far

    def next_batch(self) -> list[np.ndarray]:
        if self.fed >= len(self.plan):
            raise StopIteration
        micro = self.plan[self.fed]
        self.fed += 1
        samples = micro.positions() if self.per_copy else micro.samples
        return [self.store.encoded(int(i)) for i in samples]


class _FedPipeline(Pipeline):
    """A deserialized train graph whose input is fed from ``feed`` before each run (DALI's
    ``iter_setup`` hook; StopIteration past the epoch's last micro-batch ends the epoch)."""

    feed: _Feed

    def iter_setup(self) -> None:
        self.feed_input(ENCODED_NAME, self.feed.next_batch())


class TrainLoader:
    """Strongly augmented train batches in the reference sampler's order; deterministic in
    ``(seed, epoch, rank)`` for a given world size."""

    def __init__(
        self,
        meta: DatasetMeta,
        cfg: DataConfig,
        micro_batch: int,
        micro_batches_per_epoch: int | None,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
        define_ahead: bool = True,
        views: ContrastViews | None = None,
    ) -> None:
        """``micro_batches_per_epoch``: ``Steps.micro_batches_per_epoch`` (None gives the same),
        or fewer to yield only the first ones (benchmarks). ``define_ahead=False`` defines each
        epoch's pipeline when the epoch starts (for measuring what defining it ahead saves:
        ``deitlt bench data``). ``views``: two views of each image (query in ``Batch.images``,
        key in ``Batch.key_images``) instead of the recipe's augmentation."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        if views is not None and cfg.repeated_aug != 1:
            raise UserError(
                f"data.repeated_aug={cfg.repeated_aug}: two-view (PaCo) training reads every "
                "image once per epoch; set data.repeated_aug=1"
            )
        self.shards = check_shards(meta, "train")
        self.num_samples = meta.num_samples("train")
        self.layout = EpochLayout(
            self.num_samples, world_size, micro_batch, cfg.repeated_aug, cfg.epoch_multiple
        )
        if self.layout.per_rank < 1:
            raise UserError(
                f"{meta.root}: the train split has {self.num_samples} images, fewer than the "
                f"{world_size} ranks"
            )
        available = self.layout.micro_batches
        if micro_batches_per_epoch is None:
            micro_batches_per_epoch = available
        if micro_batches_per_epoch > available:
            raise UserError(
                f"{micro_batches_per_epoch} micro-batches of {micro_batch} exceed the "
                f"{self.layout.per_rank} training images a rank trains on per epoch "
                f"({self.num_samples} over {world_size} ranks, data.epoch_multiple="
                f"{cfg.epoch_multiple}); use a smaller batch"
            )
        self.cfg = cfg
        self.micro_batch = micro_batch
        self.micro_batches_per_epoch = micro_batches_per_epoch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # Pinned here: the current CUDA device is per thread, and pipelines are also defined
            # in a background thread.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.backend = resolve_backend(cfg.device)
        self.store = open_store(self.shards, cfg.cache_mb * 2**20)
        self.labels = torch.from_numpy(self.store.labels)
        self._serialized: bytes | None = None  # the train graph, see serialized_graph()
        self._definer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dali-next-epoch")
        # (epoch, its pipeline and plan being defined)
        self._next: tuple[int, Future] | None = None
        self.define_ahead = define_ahead
        a = cfg.augment
        # DALI yields the micro-batch's images in order (no regrouping on the torch side)
        self.per_copy = cfg.repeated_aug == 1 or cfg.repeated_aug_decode == "per_copy"
        self.graph = TrainGraph(
            image_size=cfg.image_size,
            scale=tuple(a.scale),
            ratio=tuple(a.ratio),
            hflip=a.hflip,
            randaugment_ops=a.randaugment_ops,
            randaugment_magnitude=float(a.randaugment_magnitude),
            randaugment_mstd=RANDAUGMENT_MSTD,
            random_erasing=a.random_erasing,
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
            repeats=1 if self.per_copy else cfg.repeated_aug,
            crop=a.crop,
            pad=a.pad,
            color_jitter=a.color_jitter,
            views=views,
        )

    def __len__(self) -> int:
        return self.micro_batches_per_epoch

    def key(self, sample: int) -> str:
        """The WebDataset key of stored sample ``sample``."""
        return self.store.keys[sample]

    def plan(self, epoch: int) -> list[MicroBatch]:
        """What this rank reads in each micro-batch of ``epoch`` (pure; nothing is decoded)."""
        return epoch_plan(self.layout, self.seed, epoch, self.rank)[: self.micro_batches_per_epoch]

    def epoch_samples(self, epoch: int) -> list[np.ndarray]:
        """Per micro-batch, the stored sample index of each image ``epoch`` yields, in order."""
        return [mb.positions() for mb in self.plan(epoch)]

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Exactly ``micro_batches_per_epoch - start`` batches; see the module docstring."""
        if not 0 <= start <= self.micro_batches_per_epoch:
            raise ValueError(f"start={start} outside [0, {self.micro_batches_per_epoch}]")
        for shard in self.shards:  # cheap re-check: a shard replaced between epochs
            if not shard.tar.is_file() or shard.tar.stat().st_size != shard.bytes:
                raise shard_error(RuntimeError("changed since the loader was created"), self.shards)
        return self._batches(epoch, start)

    def serialized_graph(self) -> bytes:
        """The train graph, defined (in Python, once) and serialized; no CUDA is needed."""
        if self._serialized is None:
            from deitlt_scale.data.dali import train_pipeline

            pipe = train_pipeline(
                graph=self.graph,
                device=self.backend,
                batch_size=self.micro_batch,
                num_threads=self.cfg.num_threads,
                device_id=None,  # given when deserialized: defining needs no CUDA
            )
            self._serialized = pipe.serialize()
        return self._serialized

    def build_pipeline(self, epoch: int):
        return self._define(epoch)[0]

    def _define(self, epoch: int) -> tuple[object, list[MicroBatch]]:
        plan = self.plan(epoch)
        pipe = _FedPipeline.deserialize(
            serialized_pipeline=self.serialized_graph(),
            batch_size=self.micro_batch,
            num_threads=self.cfg.num_threads,
            device_id=_device_id(self.backend, self.device),
            seed=derive_seed("augment", self.seed, epoch, self.rank),
            prefetch_queue_depth=self.cfg.prefetch,
            # deserialize() defaults to the simple executor; these are the Pipeline defaults.
            exec_pipelined=True,
            exec_async=True,
            exec_dynamic=True,
        )
        pipe.feed = _Feed(self.store, plan, self.per_copy)
        return pipe, plan

    def _pipeline(self, epoch: int) -> tuple[object, list[MicroBatch]]:
        """The epoch's pipeline and plan, defined ahead in the background if the previous epoch
        ran; starts defining the next one."""
        ahead, self._next = self._next, None
        defined = ahead[1].result() if ahead is not None and ahead[0] == epoch else None
        if defined is None:
            defined = self._define(epoch)
        if self.define_ahead:
            self._next = (epoch + 1, self._definer.submit(self._define, epoch + 1))
        return defined

    def _batches(self, epoch: int, start: int) -> Iterator[Batch]:
        if start == self.micro_batches_per_epoch:
            return
        self.store.reopen()  # read the tars on disk now (checked above), not older handles
        pipe, plan = self._pipeline(epoch)
        run = _run(pipe, self.micro_batches_per_epoch, start, self.shards, ["images"])
        for step, (images,) in enumerate(run, start=start):
            yield self._assemble(images, plan[step])

    def _assemble(self, images: torch.Tensor, micro: MicroBatch) -> Batch:
        """DALI's output -> the micro-batch's images in its order: as they come (``per_copy``), or
        (E, repeats, 3, S, S) augmented entries unfolded and put in order (``once``)."""
        samples = torch.from_numpy(micro.positions())
        images = _to_device(images, self.device)
        labels = _to_device(self.labels[samples], self.device)
        if self.graph.views is not None:  # (E, 2, 3, S, S): query and key view per image
            return Batch(images[:, 0], labels, samples, key_images=images[:, 1])
        if not self.per_copy:
            order = _to_device(torch.from_numpy(micro.order), self.device)
            images = images.reshape(-1, *images.shape[-3:]).index_select(0, order)
        return Batch(images, labels, samples)


class EvalLoader:
    """Every eval sample exactly once across ranks, centre-cropped; padding labelled -1."""

    def __init__(
        self,
        meta: DatasetMeta,
        cfg: DataConfig,
        micro_batch: int,
        rank: int,
        world_size: int,
        device: torch.device,
        split: str = "eval",  # "eval" (the test split) or "val" (held out for model selection)
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        if split not in meta.splits:
            raise UserError(
                f"{meta.root} has no {split!r} split; prepare it with `deitlt data prepare "
                "--val-per-class K` (or --val-list) to hold out a validation split"
            )
        self.shards = check_shards(meta, split)
        n = meta.num_samples(split)
        ranges = [shard_range(n, r, world_size) for r in range(world_size)]
        if n < world_size:
            raise UserError(
                f"{meta.root}: the {split} split has {n} images, fewer than the {world_size} ranks"
            )
        self.begin, self.end = ranges[rank]
        self.num_batches = max(1, math.ceil(max(e - b for b, e in ranges) / micro_batch))
        self.cfg, self.micro_batch = cfg, micro_batch
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.backend = resolve_backend(cfg.device)
        self.graph = EvalGraph(
            image_size=cfg.image_size,
            resize_shorter=math.floor(cfg.image_size / cfg.augment.eval_crop_pct + 1e-6),
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
        )

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        from deitlt_scale.data.dali import eval_pipeline

        for shard in self.shards:
            if not shard.tar.is_file() or shard.tar.stat().st_size != shard.bytes:
                raise shard_error(RuntimeError("changed since the loader was created"), self.shards)
        pipe = eval_pipeline(
            tars=[str(s.tar) for s in self.shards],
            indexes=[str(s.index) for s in self.shards],
            shard_id=self.rank,
            num_shards=self.world_size,
            graph=self.graph,
            device=self.backend,
            batch_size=self.micro_batch,
            num_threads=self.cfg.num_threads,
            device_id=_device_id(self.backend, self.device),
            seed=0,
            prefetch_queue_depth=self.cfg.prefetch,
        )
        valid = self.end - self.begin
        position = torch.arange(self.micro_batch, device=self.device)
        run = _run(pipe, self.num_batches, 0, self.shards, ["images", "labels"])
        for step, (images, raw) in enumerate(run):
            labels = parse_labels(_to_device(raw, self.device))
            labels = torch.where(position + step * self.micro_batch < valid, labels, -1)
            yield Batch(_to_device(images, self.device), labels)


__all__ = [
    "Batch",
    "EvalLoader",
    "TrainLoader",
    "parse_labels",
    "resolve_backend",
]
