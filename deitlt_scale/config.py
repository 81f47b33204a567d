"""The typed configuration tree, loaded from a YAML recipe plus dotted command-line overrides.

Precedence: CLI overrides > recipe > dataclass defaults. Loading is strict: an unknown key or a
value of the wrong type is a :class:`ConfigError` whose one-line message names the key and lists
the valid ones. Durations in epochs are resolved to optimizer steps once, by :func:`resolve_steps`,
when the dataset size and world size are known.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from deitlt_scale.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(UserError, ValueError):
    """A recipe or override that does not fit the schema; the message is one line."""


@dataclass
class AugmentConfig:
    """Strong ("out-of-distribution") train augmentation, METHOD.md 4.2. No colour jitter."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    hflip: float = 0.5
    randaugment_ops: int = 2  # 0 switches RandAugment off
    randaugment_magnitude: int = 9  # out of 10, as timm's "m9"
    random_erasing: float = 0.25  # probability, pixel mode, one box
    eval_crop_pct: float = 224 / 256  # eval resizes the shorter side to size / crop_pct


@dataclass
class MixupConfig:
    """Mixup/CutMix in batch mode on device tensors, METHOD.md 4.3."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1


@dataclass
class DataConfig:
    shards: str = "data/digits-lt"  # directory written by `deitlt data prepare` (meta.json inside)
    image_size: int = 224  # student input size in pixels
    device: Literal["auto", "cpu", "gpu"] = "auto"  # where DALI decodes and augments
    num_threads: int = 2  # DALI CPU threads per rank
    prefetch: int = 2  # DALI prefetch queue depth
    shuffle_buffer: int = (
        1024  # DALI reader shuffle buffer (samples are pre-shuffled across shards)
    )
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)


@dataclass
class ModelConfig:
    """The student. ``arch`` is a timm distilled DeiT name or a preset of models/student.py."""

    arch: str = "deit_base_distilled_patch16_224"
    patch_size: int | None = None  # None keeps the arch's value
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    drop_path: float = 0.1
    distilled: bool = True  # False: plain ViT with a CLS token only (the ViT baseline)
    compile: bool = False
    # torch.compile mode; reduce-overhead adds CUDA graphs, max-autotune also tunes GEMM kernels
    compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = "default"


@dataclass
class TeacherConfig:
    """The frozen CNN teacher, kept outside the DeepSpeed engine."""

    path: str = ""  # teacher file from `deitlt teacher import|train`; "" means no teacher
    map_targets: bool = False  # teacher predicts original labels: map them through the class map
    dtype: Literal["bf16", "fp32"] = "bf16"
    channels_last: bool = True
    compile: bool = False
    side_stream: bool = True  # on CUDA: the teacher's forward overlaps the student's forward


@dataclass
class DistillConfig:
    """The objective, METHOD.md 5. Students use type/alpha/tau; teachers use the LDAM fields."""

    type: Literal["hard", "soft", "none"] = "hard"
    alpha: float = 0.5  # L = (1 - alpha) * L_cls + alpha * L_dist
    tau: float = 1.0  # soft distillation temperature
    drw_epoch: int | None = None  # first epoch of deferred re-weighting (0-indexed); None: never
    beta: float = 0.9999  # effective-number beta of the DRW weights
    no_mixup_drw: bool = False  # CIFAR recipes: no mixup and hard-label CE on CLS during DRW
    teacher_loss: Literal["ce", "ldam"] = "ldam"  # teacher training only
    ldam_max_margin: float = 0.5
    ldam_scale: float = 30.0
    # The CLS head's loss against the ground truth (DIST is unchanged): ce (the paper);
    # balanced_softmax: CE on z + log prior (Ren et al. 2020); logit_adjusted: CE on
    # z + cls_tau * log prior (Menon et al. 2021; cls_tau = 1 is balanced_softmax).
    cls_loss: Literal["ce", "balanced_softmax", "logit_adjusted"] = "ce"
    cls_tau: float = 1.0


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 5e-4  # base lr before scaling
    # peak lr = lr * micro_batch * world / lr_scale_batch (gradient accumulation is not counted,
    # METHOD.md 6); 0 disables the scaling.
    lr_scale_batch: int = 512
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    sam_rho: float = 0.0  # > 0 wraps the optimizer in SAM (teacher training)
    sam_adaptive: bool = False
    fused: bool = True  # on CUDA: torch's single-kernel AdamW update (ignored elsewhere)


@dataclass
class ScheduleConfig:
    """Linear warm-up then cosine to min_lr, timm CosineLRScheduler semantics (warmup_prefix=False)."""

    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5


@dataclass
class TrainConfig:
    task: Literal["student", "teacher"] = "student"
    epochs: int = 300
    micro_batch: int = 128  # per rank
    grad_accum: int = 1
    global_batch: int | None = None  # when given, must equal micro_batch * grad_accum * world
    seed: int = 0
    log_every: int = 10  # optimizer steps between metric logs (the only host syncs)
    max_steps: int | None = None  # stop early (benchmarks, smoke tests)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # Start from a trained run's student weights, e.g. a higher-resolution final stage:
    # "RUN_DIR" (its best checkpoint) or "RUN_DIR:TAG" (latest, step_XXXXXXXX); "" starts from
    # scratch. Position embeddings are resampled to data.image_size (engine/warm_start.py).
    init_from: str = ""


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 1
    bf16: bool = True
    gradient_clipping: float = 0.0  # set explicitly: DeepSpeed's default changed across versions
    offload_optimizer: bool = False


@dataclass
class CheckpointConfig:
    every_epochs: int = 1
    every_steps: int = 0  # 0: only at epoch ends
    keep_last: int = 2
    resume: bool = True  # resume from the newest complete checkpoint in the run directory


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else SQLite in the run directory
    experiment: str = "deitlt"
    run_name: str | None = None


@dataclass
class EvalConfig:
    every_epochs: int = 1
    micro_batch: int = 256


@dataclass
class RuntimeConfig:
    run_dir: str = "runs/default"
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# --------------------------------------------------------------------------------------------
# Loading


def load(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated Config from a YAML recipe and ``key.sub=value`` overrides."""
    tree: dict[str, Any] = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"recipe {path} is not valid YAML: {_one_line(err)}") from None
        if not isinstance(tree, dict):
            raise ConfigError(
                f"recipe {path} must be a mapping of sections, got {type(tree).__name__}"
            )
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set_dotted(tree, key.strip(), _parse_scalar(raw))
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def from_dict(tree: dict[str, Any]) -> Config:
    """Build a validated Config from a nested mapping (e.g. a dumped config.yaml)."""
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-data view (tuples become lists), the inverse of :func:`from_dict`."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def dump(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
    return path


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"optim.lr": 5e-4, ...}``: the config as dotted keys (for tracking params)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                out[name] = value

    walk(to_dict(cfg), "")
    return out


def config_hash(
    cfg: Config, ignore: tuple[str, ...] = ("runtime", "tracking", "checkpoint")
) -> str:
    """Short digest of what changes the training trajectory (not where it is written or logged)."""
    tree = {k: v for k, v in to_dict(cfg).items() if k not in ignore}
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def validate(cfg: Config) -> None:
    """Checks within the tree that do not need the world size or the dataset. The rules of each
    kind of run (student, ViT baseline, teacher) live with it: :func:`deitlt_scale.tasks.check`."""
    t = cfg.train
    _require(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    _require(t.micro_batch >= 1, "train.micro_batch", f"must be >= 1, got {t.micro_batch}")
    _require(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    _require(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
    mix = cfg.data.mixup
    mixing = mix.prob > 0 and (mix.mixup_alpha > 0 or mix.cutmix_alpha > 0)
    _require(
        not mixing or t.micro_batch % 2 == 0,
        "train.micro_batch",
        f"must be even when mixup/cutmix is on (samples are mixed with the flipped batch), got {t.micro_batch}",
    )
    d = cfg.distill
    _require(0.0 <= d.alpha <= 1.0, "distill.alpha", f"must be in [0, 1], got {d.alpha}")
    _require(0.0 < d.beta < 1.0, "distill.beta", f"must be in (0, 1), got {d.beta}")
    if d.drw_epoch is not None:
        _require(
            0 <= d.drw_epoch < t.epochs,
            "distill.drw_epoch",
            f"must be in [0, train.epochs={t.epochs}), got {d.drw_epoch}",
        )
    _require(
        cfg.schedule.warmup_epochs <= t.epochs,
        "schedule.warmup_epochs",
        f"must not exceed train.epochs={t.epochs}, got {cfg.schedule.warmup_epochs}",
    )
    _require(cfg.optim.lr > 0, "optim.lr", f"must be > 0, got {cfg.optim.lr}")
    _require(cfg.optim.lr_scale_batch >= 0, "optim.lr_scale_batch", "must be >= 0")
    _require(
        cfg.data.image_size >= 8, "data.image_size", f"must be >= 8, got {cfg.data.image_size}"
    )
    a = cfg.data.augment
    _require(
        0 < a.scale[0] <= a.scale[1] <= 1,
        "data.augment.scale",
        f"must satisfy 0 < lo <= hi <= 1, got {a.scale}",
    )
    _require(
        0 < a.ratio[0] <= a.ratio[1],
        "data.augment.ratio",
        f"must satisfy 0 < lo <= hi, got {a.ratio}",
    )
    _require(
        0 <= a.randaugment_magnitude <= 10,
        "data.augment.randaugment_magnitude",
        "must be in [0, 10]",
    )
    _require(0 < a.eval_crop_pct <= 1, "data.augment.eval_crop_pct", "must be in (0, 1]")
    _require(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")


def validate_world(cfg: Config, world_size: int) -> None:
    """The batch identity: global = micro x accumulation x world, checked once at start-up."""
    t = cfg.train
    actual = t.micro_batch * t.grad_accum * world_size
    if t.global_batch is not None and t.global_batch != actual:
        raise ConfigError(
            f"train.global_batch={t.global_batch} but train.micro_batch={t.micro_batch} x "
            f"train.grad_accum={t.grad_accum} x world={world_size} = {actual}; fix one of them"
        )


@dataclass(frozen=True)
class Steps:
    """Epoch-denominated durations resolved to optimizer steps (see :func:`resolve_steps`)."""

    steps_per_epoch: int
    total: int  # steps this run trains (train.max_steps may cut it short)
    scheduled: int  # steps the lr schedule spans: epochs x steps_per_epoch
    warmup: int
    drw_start: int | None  # first optimizer step of the DRW phase, None when never
    micro_batches_per_epoch: int  # per rank

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch


def resolve_steps(cfg: Config, train_samples: int, world_size: int) -> Steps:
    """An epoch is ``floor(N / global_batch)`` optimizer steps; the remainder is dropped.

    Every rank sees ``steps_per_epoch * grad_accum`` micro-batches of ``micro_batch`` images,
    so ranks stay in lock-step and the mixup batch is always full and even.
    """
    t = cfg.train
    global_batch = t.micro_batch * t.grad_accum * world_size
    steps_per_epoch = train_samples // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(
            f"train.micro_batch={t.micro_batch} x train.grad_accum={t.grad_accum} x world={world_size} "
            f"= {global_batch} exceeds the {train_samples} training images; use a smaller batch"
        )
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
        micro_batches_per_epoch=steps_per_epoch * t.grad_accum,
    )


# --------------------------------------------------------------------------------------------
# Internals


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _parse_scalar(raw: str) -> Any:
    raw = raw.strip()
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"{'.'.join(parts[: i + 1])} is a value, not a section (override {key})"
            )
        node = child
    node[parts[-1]] = value


def _build(cls: type, tree: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the recipe"
    if not isinstance(tree, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(tree).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in tree if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}; valid keys of {where}: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name in tree:
            kwargs[name] = _coerce(hints[name], tree[name], f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key} has an unsupported type {tp}")
