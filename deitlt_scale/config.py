"""The typed configuration tree, loaded from a YAML recipe plus dotted command-line overrides.

Precedence: CLI overrides > recipe > dataclass defaults. Loading is strict
(:mod:`deitlt_scale.strict`): an unknown key or a value of the wrong type is a
:class:`~deitlt_scale.strict.ConfigError` whose one-line message names the key and lists the
valid ones. Durations in epochs are resolved to optimizer steps once, by
:func:`deitlt_scale.steps.resolve_steps`, when the dataset size and world size are known.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from deitlt_scale.strict import ConfigError, build_strict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The reference sampler (RASampler) trains on floor(N / 256) * 256 samples per epoch, split over
# the ranks: METHOD.md 1.6. ``data.epoch_multiple`` defaults to it.
REFERENCE_EPOCH_MULTIPLE = 256


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
    # random_resized: RandomResizedCrop(image_size, scale, ratio). pad_crop: the CIFAR teachers'
    # weak crop, zero-pad `pad` px on every side, then a random image_size crop (scale and ratio
    # unused); images must already be image_size px.
    crop: Literal["random_resized", "pad_crop"] = "random_resized"
    pad: int = 4  # pixels, pad_crop only
    # ColorJitter(brightness=c, contrast=c, saturation=c, hue=0) after the crop and flip, as the
    # L-D-SAM ImageNet-LT / iNaturalist teachers train (0.4); 0 switches it off.
    color_jitter: float = 0.0


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
    # Shuffle buffer of the torch reference loader (`deitlt bench data`); the DALI train loader
    # permutes the whole split every epoch.
    shuffle_buffer: int = 1024
    # Repeated augmentation (RASampler): each image drawn for an epoch is trained on this many
    # times, independently augmented, within one optimizer step; 1 switches it off.
    repeated_aug: int = 3
    # How the copies are made: "per_copy" feeds each copy's encoded bytes to DALI (decoded per
    # copy, fused with its crop; one augmentation branch over the whole micro-batch); "once"
    # decodes each image once and augments it in `repeated_aug` branches. Measured on CPU by
    # `deitlt bench data` (docs/benchmarks.md): per_copy is faster there.
    repeated_aug_decode: Literal["per_copy", "once"] = "per_copy"
    # An epoch trains on floor(N / epoch_multiple) * epoch_multiple samples, split evenly over
    # the ranks (per rank: floor(that / world)); 1 keeps every sample.
    epoch_multiple: int = REFERENCE_EPOCH_MULTIPLE
    # MiB of host memory per rank the train split's encoded images may take to be served from
    # memory; a larger split is read per sample from the tars (the OS page cache keeps them).
    cache_mb: int = 4096
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
    # bal_bce: LiVT's balanced BCE (Xu et al. 2023), cls_tau * (log pi - log(1 - pi)) added to
    # the logits inside a sigmoid BCE, times the class count.
    cls_loss: Literal["ce", "balanced_softmax", "logit_adjusted", "bal_bce"] = "ce"
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
    sam_rho: float = 0.0  # > 0 wraps the optimizer in SAM (teacher training); rho from epoch 0
    # Step schedule of rho (optim.rho_at): sam_rho_values[i] applies from epoch
    # sam_rho_milestones[i] on (0-indexed epochs, increasing); empty keeps sam_rho throughout.
    sam_rho_milestones: tuple[float, ...] = ()
    sam_rho_values: tuple[float, ...] = ()
    sam_adaptive: bool = False
    # Weight decay on every parameter, biases and norms included (the SGD recipes of the CNN
    # teachers); False exempts biases, norms and tokens (DeiT).
    decay_all: bool = False
    fused: bool = True  # on CUDA: torch's single-kernel AdamW update (ignored elsewhere)
    # Layer-wise lr decay of ViT fine-tuning (BEiT, MAE): block i's lr is scaled by
    # layer_decay ** (depth - i), the embeddings' by layer_decay ** (depth + 1); 1 switches it off.
    layer_decay: float = 1.0


@dataclass
class ScheduleConfig:
    """The lr rule of :func:`deitlt_scale.optim.scheduled_lr`: a linear warm-up, then

    * ``cosine``: cosine to min_lr, timm CosineLRScheduler semantics (by default measured from
      step 0, ``warmup_prefix: true`` starts it after the warm-up);
    * ``step``: the peak lr times ``factors[i]`` from epoch ``milestones[i]`` on.

    ``per_epoch: true`` holds the lr constant within each epoch, as the reference CNN trainers
    set it once per epoch: epoch e of the warm-up trains at (e + 1) / warmup_epochs of the way
    from warmup_lr to the peak, and the cosine is evaluated at the epoch's first step.
    """

    kind: Literal["cosine", "step"] = "cosine"
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5  # cosine only
    warmup_prefix: bool = False  # cosine only: the cosine spans the epochs after the warm-up
    milestones: tuple[float, ...] = ()  # step only: 0-indexed epochs, increasing
    factors: tuple[float, ...] = ()  # step only: lr = peak * factors[i] from milestones[i] on
    per_epoch: bool = False


@dataclass
class PaCoConfig:
    """Parametric contrastive learning (Cui et al. 2021) for teacher training; see
    :class:`deitlt_scale.losses.PaCoLoss` and :mod:`deitlt_scale.models.moco`.

    Defaults are the published CIFAR-100-LT recipe (PaCo/LT ``sh/CIFAR100_train_imb0.01.sh``).
    """

    enabled: bool = False  # train.task=teacher trains the MoCo container with the PaCo loss
    alpha: float = 0.01  # weight of the contrastive (same-class sample) positives
    beta: float = 1.0  # weight of the class-centre positive
    gamma: float = 1.0  # weight of the sample terms in the softmax denominator
    temperature: float = 0.05  # moco-t: divides the query-key similarities
    moco_k: int = 1024  # queue length (keys); a multiple of the global batch
    moco_dim: int = 32  # width of the projection the contrast is computed on
    moco_m: float = 0.999  # momentum of the key encoder
    feat_dim: int | None = None  # pooled feature width; None: the arch's (64 | 2048)
    mlp: bool = True  # Linear-BN-ReLU-Linear projection (False: one Linear)
    # The two augmented views (query, key) of the published scripts:
    #   cifar: RandomCrop(32, pad 4) + flip + AutoAugment(CIFAR10) + Cutout(16) /
    #          RandomResizedCrop(32, scale 0.2-1) + flip + ColorJitter(.4,.4,.4,.1) p0.8
    #          + grayscale p0.2 + GaussianBlur(0.1-2) p0.5 (`--aug cifar100`);
    #   randcls_sim: RandomResizedCrop(224) + flip + ColorJitter(.4,.4,.4,0) + RandAugment
    #          n{randaug_n} m{randaug_m} mstd0.5 / RandomResizedCrop(224) + ColorJitter(.4,.4,.4,0)
    #          + grayscale p0.2 + GaussianBlur p0.5 + flip (`--aug randcls_sim`).
    views: Literal["cifar", "randcls_sim"] = "cifar"
    randaug_n: int = 2
    randaug_m: int = 10


@dataclass
class MAEConfig:
    """Masked-autoencoder pre-training of the student's encoder (``train.task: pretrain``,
    :mod:`deitlt_scale.models.mae`); the defaults are MAE's ViT-B decoder."""

    mask_ratio: float = 0.75  # fraction of each image's patches hidden from the encoder
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True  # targets: each patch normalised by its own mean and variance


@dataclass
class TrainConfig:
    # student: DeiT-LT or the ViT baseline; teacher: a CNN teacher; pretrain: MAE pre-training
    task: Literal["student", "teacher", "pretrain"] = "student"
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
    # Under bf16, the dtype gradients are accumulated and reduced in (DeepSpeed data_types).
    # bf16 is DeepSpeed's default; the reference accumulates fp32 gradients (fp16 autocast over
    # fp32 parameters), which the paper recipes set. ZeRO 1 then runs DeepSpeed's BF16_Optimizer
    # (docs/benchmarks.md measures the cost); ZeRO 0 does not support fp32.
    grad_accum_dtype: Literal["fp32", "bf16"] = "bf16"


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
    paco: PaCoConfig = field(default_factory=PaCoConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)


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
    cfg = build_strict(Config, tree, "")
    validate(cfg)
    return cfg


def from_dict(tree: dict[str, Any]) -> Config:
    """Build a validated Config from a nested mapping (e.g. a dumped config.yaml)."""
    cfg = build_strict(Config, tree, "")
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
    _require(
        cfg.data.repeated_aug >= 1,
        "data.repeated_aug",
        f"must be >= 1 (1 switches repeated augmentation off), got {cfg.data.repeated_aug}",
    )
    _require(
        cfg.data.epoch_multiple >= 1,
        "data.epoch_multiple",
        f"must be >= 1 (1 keeps every sample), got {cfg.data.epoch_multiple}",
    )
    _require(cfg.data.cache_mb >= 0, "data.cache_mb", f"must be >= 0, got {cfg.data.cache_mb}")
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
    ds = cfg.deepspeed
    _require(
        not (ds.bf16 and ds.grad_accum_dtype == "fp32" and ds.zero_stage == 0),
        "deepspeed.grad_accum_dtype",
        "fp32 needs deepspeed.zero_stage 1 or 2 under bf16 (DeepSpeed accumulates bf16 gradients "
        "in their own dtype at stage 0); set deepspeed.grad_accum_dtype=bf16 or zero_stage=1",
    )
    _validate_schedules_and_paco(cfg)
    _require(
        0 < cfg.optim.layer_decay <= 1,
        "optim.layer_decay",
        f"must be in (0, 1] (1 switches it off), got {cfg.optim.layer_decay}",
    )
    m = cfg.mae
    _require(0 < m.mask_ratio < 1, "mae.mask_ratio", f"must be in (0, 1), got {m.mask_ratio}")
    _require(
        min(m.decoder_dim, m.decoder_depth, m.decoder_heads) >= 1
        and m.decoder_dim % m.decoder_heads == 0,
        "mae.decoder_dim",
        f"must be a multiple of mae.decoder_heads ({m.decoder_heads}), all >= 1",
    )


def _validate_schedules_and_paco(cfg: Config) -> None:
    """The lr / rho step schedules, the teacher crops and the PaCo section."""
    sc, o, a, t = cfg.schedule, cfg.optim, cfg.data.augment, cfg.train
    _check_milestones("schedule.milestones", sc.milestones, t.epochs)
    _require(
        len(sc.factors) == len(sc.milestones),
        "schedule.factors",
        f"needs one factor per milestone ({len(sc.milestones)}), got {len(sc.factors)}",
    )
    _require(all(f > 0 for f in sc.factors), "schedule.factors", f"must be > 0, got {sc.factors}")
    _require(
        sc.kind == "step" or not sc.milestones,
        "schedule.milestones",
        f"apply to schedule.kind=step only, but schedule.kind is {sc.kind}",
    )
    _require(
        not sc.per_epoch or float(sc.warmup_epochs).is_integer(),
        "schedule.warmup_epochs",
        f"must be a whole number of epochs with schedule.per_epoch, got {sc.warmup_epochs}",
    )
    _check_milestones("optim.sam_rho_milestones", o.sam_rho_milestones, t.epochs)
    _require(
        len(o.sam_rho_values) == len(o.sam_rho_milestones),
        "optim.sam_rho_values",
        f"needs one rho per milestone ({len(o.sam_rho_milestones)}), got {len(o.sam_rho_values)}",
    )
    _require(
        all(r > 0 for r in o.sam_rho_values), "optim.sam_rho_values", "must be > 0 (SAM stays on)"
    )
    _require(
        o.sam_rho > 0 or not o.sam_rho_milestones,
        "optim.sam_rho_milestones",
        "need optim.sam_rho > 0 (the rho of the first epochs, which switches SAM on)",
    )
    _require(a.pad >= 0, "data.augment.pad", f"must be >= 0, got {a.pad}")
    _require(a.color_jitter >= 0, "data.augment.color_jitter", "must be >= 0")
    p = cfg.paco
    if p.enabled:
        _require(p.temperature > 0, "paco.temperature", f"must be > 0, got {p.temperature}")
        _require(p.moco_k >= 1 and p.moco_dim >= 1, "paco.moco_k", "and paco.moco_dim must be >= 1")
        _require(0.0 <= p.moco_m < 1.0, "paco.moco_m", f"must be in [0, 1), got {p.moco_m}")
        _require(
            min(p.alpha, p.beta, p.gamma) >= 0 and p.beta > 0,
            "paco.beta",
            "must be > 0 and paco.alpha, paco.gamma >= 0 (every query needs a positive)",
        )


def _check_milestones(key: str, milestones: tuple[float, ...], epochs: int) -> None:
    _require(
        all(0 < m < epochs for m in milestones),
        key,
        f"must lie in (0, train.epochs={epochs}), got {list(milestones)}",
    )
    _require(
        all(a < b for a, b in itertools.pairwise(milestones)),
        key,
        f"must increase, got {list(milestones)}",
    )


def validate_world(cfg: Config, world_size: int) -> None:
    """The batch identity: global = micro x accumulation x world, checked once at start-up."""
    t = cfg.train
    actual = t.micro_batch * t.grad_accum * world_size
    if t.global_batch is not None and t.global_batch != actual:
        raise ConfigError(
            f"train.global_batch={t.global_batch} but train.micro_batch={t.micro_batch} x "
            f"train.grad_accum={t.grad_accum} x world={world_size} = {actual}; fix one of them"
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
