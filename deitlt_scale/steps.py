"""Epoch-denominated durations resolved to optimizer steps: the reference's epoch (METHOD.md 1.6)
for a dataset of ``N`` training images on ``world`` ranks, once the dataset size and world size
are known (:func:`resolve_steps`)."""

from __future__ import annotations

from dataclasses import dataclass

from deitlt_scale.config import Config
from deitlt_scale.strict import ConfigError


def samples_per_rank(num_samples: int, world_size: int, multiple: int) -> int:
    """Samples one rank trains on per epoch: ``floor(floor(N / multiple) * multiple / world)``.

    The reference's RASampler truncation (METHOD.md 1.6) with ``multiple`` = 256. A split smaller
    than one ``multiple`` (whose epochs the reference leaves empty) keeps ``floor(N / world)``.
    """
    kept = (num_samples // multiple) * multiple if num_samples >= multiple else num_samples
    return kept // world_size


@dataclass(frozen=True)
class Steps:
    """Epoch-denominated durations resolved to optimizer steps (see :func:`resolve_steps`).

    Per rank an epoch is ``samples_per_rank`` samples in ``micro_batches_per_epoch`` micro-batches
    of ``micro_batch`` (the last one holds ``last_micro_batch``, possibly fewer), grouped into
    ``steps_per_epoch`` optimizer steps of ``grad_accum`` micro-batches (the last step holds what
    is left: :meth:`micro_batches_in_step`). Every rank has the same sizes.
    """

    steps_per_epoch: int
    total: int  # steps this run trains (train.max_steps may cut it short)
    scheduled: int  # steps the lr schedule spans: epochs x steps_per_epoch
    warmup: int
    drw_start: int | None  # first optimizer step of the DRW phase, None when never
    micro_batches_per_epoch: int  # per rank
    samples_per_rank: int  # per epoch
    micro_batch: int  # images in every micro-batch but the epoch's last
    grad_accum: int  # micro-batches in every optimizer step but the epoch's last

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    @property
    def last_micro_batch(self) -> int:
        """Images in the epoch's last micro-batch (``micro_batch`` when the epoch divides)."""
        return self.samples_per_rank - (self.micro_batches_per_epoch - 1) * self.micro_batch

    def micro_batches_in_step(self, step: int) -> int:
        """Micro-batches optimizer step ``step`` (global, 0-based) accumulates: ``grad_accum``,
        except the epoch's last step, which takes the rest."""
        within = step % self.steps_per_epoch
        if within < self.steps_per_epoch - 1:
            return self.grad_accum
        return self.micro_batches_per_epoch - within * self.grad_accum

    def micro_batch_size(self, step: int, micro: int) -> int:
        """Images per rank in micro-batch ``micro`` (0-based within the step) of ``step``."""
        if not 0 <= micro < self.micro_batches_in_step(step):
            raise ValueError(f"step {step} has no micro-batch {micro}")
        index = (step % self.steps_per_epoch) * self.grad_accum + micro
        if index == self.micro_batches_per_epoch - 1:
            return self.last_micro_batch
        return self.micro_batch

    def first_micro_batch(self, step: int) -> int:
        """Index within its epoch of the first micro-batch of ``step`` (for resuming)."""
        return (step % self.steps_per_epoch) * self.grad_accum


def resolve_steps(cfg: Config, train_samples: int, world_size: int) -> Steps:
    """The reference's epoch (METHOD.md 1.6), in optimizer steps.

    Per rank an epoch is ``samples_per_rank(N, world, data.epoch_multiple)`` samples, cut into
    ``ceil(samples / micro_batch)`` micro-batches (the last may be smaller) and grouped into
    ``ceil(micro_batches / grad_accum)`` optimizer steps (the last may hold fewer micro-batches).
    Warm-up, DRW start and the total are counted in these steps.
    """
    t = cfg.train
    per_rank = samples_per_rank(train_samples, world_size, cfg.data.epoch_multiple)
    if per_rank < 1:
        raise ConfigError(
            f"the {train_samples} training images are fewer than the {world_size} ranks; "
            "use fewer processes"
        )
    micro_batches = -(-per_rank // t.micro_batch)
    steps_per_epoch = -(-micro_batches // t.grad_accum)
    last = per_rank - (micro_batches - 1) * t.micro_batch
    mix = cfg.data.mixup
    mixing = mix.prob > 0 and (mix.mixup_alpha > 0 or mix.cutmix_alpha > 0)
    if mixing and last % 2:
        raise ConfigError(
            f"the last micro-batch of an epoch holds {last} images ({per_rank} per rank in "
            f"micro-batches of {t.micro_batch}), but mixup needs an even batch; change "
            "train.micro_batch, the world size or data.epoch_multiple"
        )
    if cfg.paco.enabled:
        _check_paco_batches(cfg, per_rank, last, world_size)
    total = steps_per_epoch * t.epochs
    if t.max_steps is not None:
        total = min(total, t.max_steps)
    warmup = round(cfg.schedule.warmup_epochs * steps_per_epoch)
    drw = cfg.distill.drw_epoch
    return Steps(
        steps_per_epoch=steps_per_epoch,
        total=total,
        scheduled=steps_per_epoch * t.epochs,
        warmup=warmup,
        drw_start=None if drw is None else drw * steps_per_epoch,
        micro_batches_per_epoch=micro_batches,
        samples_per_rank=per_rank,
        micro_batch=t.micro_batch,
        grad_accum=t.grad_accum,
    )


def _check_paco_batches(cfg: Config, per_rank: int, last: int, world_size: int) -> None:
    """PaCo's key queue takes whole global batches: every micro-batch full (the reference's
    ``drop_last=True``) and ``moco_k`` a multiple of the global micro-batch."""
    micro, k = cfg.train.micro_batch, cfg.paco.moco_k
    if last != micro:
        raise ConfigError(
            f"the last micro-batch of an epoch holds {last} images ({per_rank} per rank in "
            f"micro-batches of {micro}), but PaCo's queue takes full batches; set "
            f"data.epoch_multiple={micro * world_size} (micro_batch x {world_size} processes: "
            "the partial batch is dropped, as the reference's drop_last)"
        )
    if k % (micro * world_size):
        raise ConfigError(
            f"paco.moco_k={k} is not a multiple of the global micro-batch {micro * world_size} "
            f"(micro_batch {micro} x {world_size} processes); change one of them"
        )
