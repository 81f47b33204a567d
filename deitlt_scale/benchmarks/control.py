"""The control: a recipe trained by a plain PyTorch loop that no part of the engine touches.

``deitlt bench control RECIPE [key=value ...]`` trains the recipe's student twice on the same
prepared split, teacher, seed and budget: once with ``deitlt train`` (DALI, DeepSpeed, the task
and trainer) and once with :func:`train_plain` below, then prints both evaluations, the accuracy
differences and the ratio of training images/s. ``--side plain`` trains only the plain loop (the
control row of an experiment grid).

The plain loop takes nothing of the project's training machinery (no DALI, DeepSpeed, task,
objective, mixer, sampler or trainer): only the recipe's values, the prepared files and the CNN
teacher's network definition.

* data: the shards' tar members read with :mod:`tarfile`, decoded by PIL in a torch ``DataLoader``
  (``data.num_threads`` worker processes) with torchvision's crops and flips and timm's
  RandAugment (``rand-m{M}-mstd0.5-inc1``) and ``RandomErasing``; the sampler is the reference's
  RASampler for one process (each drawn image repeated ``data.repeated_aug`` times, the epoch cut
  to ``floor(N / data.epoch_multiple) * data.epoch_multiple`` samples);
* model: ``timm.create_model`` with the recipe's sizes; the teacher: the teacher file's network,
  loaded from its safetensors, frozen, fed the student's batch re-normalised to its statistics;
* step: timm ``Mixup``, the DeiT-LT loss written out (soft-target CE on CLS, CE against the
  teacher's argmax on DIST, effective-number class weights on DIST from ``distill.drw_epoch``),
  ``torch.optim.AdamW`` without weight decay on norms, biases and tokens, a per-step linear
  warm-up and cosine, gradient clipping if the recipe sets it;
* evaluation: resize and centre crop, every head's per-class accuracy on the eval split (and the
  val split when prepared), written as ``RUN_DIR/eval/latest.json`` and ``eval/val/latest.json``
  with the trainer's metric names, so a grid reads both kinds of run alike.

SIGTERM stops the plain loop before its next step with exit status 75 and nothing written (the
run is short and starts over); Ctrl-C interrupts it.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deitlt_scale.data.shard_reader import read_split

HELP = "train a recipe with a plain PyTorch loop beside the project's trainer; compare"
EXIT_STOPPED = 75
# RUN_DIR/train_summary.json, as the trainer writes it: steps, images, seconds in steps, images/s
SUMMARY_FILE = "train_summary.json"
GROUP_NAMES = ("head", "mid", "tail")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="student recipe, e.g. recipes/tiny_digits.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, as for deitlt train")
    parser.add_argument(
        "--side",
        choices=("both", "plain"),
        default="both",
        help="both: train with deitlt train and with the plain loop, then compare (default); "
        "plain: the plain loop alone, into runtime.run_dir",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="with --side both: parent of the two run directories project/ and plain/ "
        "(default: runtime.run_dir)",
    )


def run(args: argparse.Namespace) -> int:
    from deitlt_scale import config as config_mod

    cfg = config_mod.load(args.recipe, args.overrides)
    if args.side == "plain":
        return train_plain(cfg)
    out = args.out or Path(cfg.runtime.run_dir)
    project_dir, plain_dir = out / "project", out / "plain"
    code = _train_project(args.recipe, [*args.overrides, f"runtime.run_dir={project_dir}"])
    if code != 0:
        return code
    if not (plain_dir / SUMMARY_FILE).is_file():
        plain_cfg = config_mod.load(args.recipe, [*args.overrides, f"runtime.run_dir={plain_dir}"])
        code = train_plain(plain_cfg)
        if code != 0:
            return code
    print(compare(project_dir, plain_dir), flush=True)
    return 0


def _train_project(recipe: str, overrides: list[str]) -> int:
    """``deitlt train`` as a user runs it (it resumes, or does nothing when finished)."""
    cmd = [sys.executable, "-m", "deitlt_scale.cli", "train", recipe, *overrides]
    print("+ deitlt train " + " ".join([recipe, *overrides]), flush=True)
    return subprocess.run(cmd).returncode


# --------------------------------------------------------------------------------------------
# Data


class ImageSplit:
    """A map-style dataset of decoded, transformed images and their labels."""

    def __init__(self, samples: list[tuple[bytes, int]], transform: Any) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        encoded, label = self.samples[index]
        image = Image.open(io.BytesIO(encoded)).convert("RGB")
        return self.transform(image), label


class RepeatedAugSampler:
    """The reference's RASampler (DeiT ``samplers.py``) for one process: each epoch a seeded
    permutation, every index repeated ``repeats`` times in a row, the first
    ``floor(N / multiple) * multiple`` entries kept (all N when N < multiple)."""

    def __init__(self, size: int, repeats: int, multiple: int, seed: int) -> None:
        self.size, self.repeats, self.seed, self.epoch = size, repeats, seed, 0
        self.length = (size // multiple) * multiple if size >= multiple else size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        import torch

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        repeated = [i for i in order for _ in range(self.repeats)]
        return iter(repeated[: self.length])

    def __len__(self) -> int:
        return self.length


def train_transform(cfg: Any) -> Any:
    """The recipe's strong augmentation with torchvision and timm, in timm's order."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.random_erasing import RandomErasing
    from torchvision import transforms as T

    d, a = cfg.data, cfg.data.augment
    size = d.image_size
    if a.crop == "pad_crop":
        ops = [T.Resize(size, T.InterpolationMode.BICUBIC), T.RandomCrop(size, padding=a.pad)]
    else:
        ops = [
            T.RandomResizedCrop(
                size, scale=a.scale, ratio=a.ratio, interpolation=T.InterpolationMode.BICUBIC
            )
        ]
    if a.hflip > 0:
        ops.append(T.RandomHorizontalFlip(a.hflip))
    if a.color_jitter > 0:
        ops.append(T.ColorJitter(a.color_jitter, a.color_jitter, a.color_jitter))
    if a.randaugment_ops > 0:
        spec = f"rand-m{a.randaugment_magnitude}-mstd0.5-inc1-n{a.randaugment_ops}"
        hparams = {
            "translate_const": int(size * 0.45),
            "img_mean": tuple(round(255 * m) for m in d.mean),
        }
        ops.append(rand_augment_transform(spec, hparams))
    ops += [T.ToTensor(), T.Normalize(d.mean, d.std)]
    if a.random_erasing > 0:
        ops.append(RandomErasing(a.random_erasing, mode="pixel", max_count=1, device="cpu"))
    return T.Compose(ops)


def eval_transform(cfg: Any) -> Any:
    from torchvision import transforms as T

    d = cfg.data
    shorter = math.floor(d.image_size / d.augment.eval_crop_pct + 1e-6)
    return T.Compose(
        [
            T.Resize(shorter, T.InterpolationMode.BICUBIC),
            T.CenterCrop(d.image_size),
            T.ToTensor(),
            T.Normalize(d.mean, d.std),
        ]
    )


def _seed_worker(worker_id: int) -> None:
    import numpy as np
    import torch

    seed = torch.initial_seed() % 2**32  # distinct per worker and epoch, from the loader's seed
    random.seed(seed)
    np.random.seed(seed)


# --------------------------------------------------------------------------------------------
# Networks


def create_model(cfg: Any, num_classes: int) -> Any:
    """The student with timm: the recipe's arch (its plain-ViT twin without a DIST token when
    ``model.distilled`` is false) at the recipe's sizes."""
    import timm

    m = cfg.model
    name = m.arch if m.distilled else m.arch.replace("_distilled", "")
    sizes = {
        k: getattr(m, k)
        for k in ("patch_size", "embed_dim", "depth", "num_heads")
        if getattr(m, k) is not None
    }
    return timm.create_model(
        name,
        pretrained=False,
        num_classes=num_classes,
        img_size=cfg.data.image_size,
        drop_path_rate=m.drop_path,
        **sizes,
    )


class FrozenTeacher:
    """The teacher file's network in eval mode, fed the student's images in its own statistics."""

    def __init__(self, path: Path, mean: Any, std: Any) -> None:
        import torch
        from safetensors.torch import load_file

        from deitlt_scale.models.teachers import create_teacher_arch

        info = json.loads((path / "teacher.json").read_text())
        self.net = create_teacher_arch(info["arch"], info["num_classes"], info.get("normed", False))
        self.net.load_state_dict(load_file(path / "model.safetensors"))
        self.net.eval().requires_grad_(False)
        self.size = info["input_size"]
        as_column = lambda v: torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1)  # noqa: E731
        # x_teacher = (x_student * std_s + mean_s - mean_t) / std_t
        self.scale = as_column(std) / as_column(info["std"])
        self.shift = (as_column(mean) - as_column(info["mean"])) / as_column(info["std"])

    def __call__(self, images: Any) -> Any:
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            x = images * self.scale + self.shift
            if x.shape[-1] != self.size:
                x = F.interpolate(x, size=(self.size, self.size), mode="bicubic")
            return self.net(x)


def logits_per_head(model: Any, images: Any) -> dict[str, Any]:
    """Eval-mode logits of each head: CLS and DIST (and their mean) or the ViT's CLS."""
    feats = model.forward_features(images)
    cls = model.head(feats[:, 0])
    if getattr(model, "head_dist", None) is None:
        return {"cls": cls}
    dist = model.head_dist(feats[:, 1])
    return {"cls": cls, "dist": dist, "mean": (cls + dist) / 2}


# --------------------------------------------------------------------------------------------
# Loss


def class_weights(counts: list[int], beta: float) -> Any:
    """Effective-number weights ``(1 - beta) / (1 - beta ** n_c)``, scaled to sum to K."""
    import torch

    n = torch.tensor(counts, dtype=torch.float64)
    w = (1 - beta) / (1 - beta**n)
    return (w / w.sum() * len(counts)).float()


def deitlt_loss(
    outputs: Any,
    targets: Any,
    labels: Any,
    teacher_logits: Any,
    alpha: float,
    weights: Any | None,
) -> tuple[Any, Any]:
    """``(1 - alpha) * CE(cls, targets) + alpha * CE(dist, argmax teacher)`` and the teacher's
    labels. ``targets``: soft (B, K) mixed targets, or None for hard ``labels``; ``weights``: the
    DRW class weights of the DIST term (None before DRW). The ViT (one output) trains CLS only,
    class-weighted in DRW."""
    import torch
    import torch.nn.functional as F

    def ce(logits: Any, w: Any | None = None) -> Any:
        if targets is None:
            return F.cross_entropy(logits, labels, weight=w)
        if w is None:
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, weight=w)

    if teacher_logits is None:
        return ce(outputs, weights), None
    cls, dist = outputs
    teacher_labels = teacher_logits.argmax(dim=-1)
    loss = (1 - alpha) * ce(cls) + alpha * F.cross_entropy(dist, teacher_labels, weight=weights)
    return loss, teacher_labels


# --------------------------------------------------------------------------------------------
# Evaluation


def evaluate(model: Any, loader: Any, num_classes: int, groups: dict[str, list[int]]) -> dict:
    """``{head}/overall``, ``{head}/mean_class``, ``{head}/top5`` and ``{head}/{convention}/
    {head|mid|tail}`` (fractions), as the trainer names them."""
    import torch

    hits: dict[str, torch.Tensor] = {}
    hits5: dict[str, torch.Tensor] = {}
    totals = torch.zeros(num_classes)
    model.eval()
    with torch.no_grad():
        for images, labels in loader:
            totals += torch.bincount(labels, minlength=num_classes)
            for head, logits in logits_per_head(model, images).items():
                top = logits.topk(min(5, num_classes), dim=1).indices
                right = (top[:, 0] == labels).float()
                right5 = (top == labels[:, None]).any(dim=1).float()
                hits[head] = hits.get(head, 0) + torch.bincount(labels, right, num_classes)
                hits5[head] = hits5.get(head, 0) + torch.bincount(labels, right5, num_classes)
    model.train()
    metrics: dict[str, float] = {}
    for head in hits:
        per_class = hits[head] / totals.clamp(min=1)
        present = totals > 0
        metrics[f"{head}/overall"] = float(hits[head].sum() / totals.sum())
        metrics[f"{head}/top5"] = float(hits5[head].sum() / totals.sum())
        metrics[f"{head}/mean_class"] = float(per_class[present].mean())
        for convention, group_of in groups.items():
            group_of = torch.tensor(group_of)
            for g, name in enumerate(GROUP_NAMES):
                members = per_class[(group_of == g) & present]
                value = float(members.mean()) if len(members) else float("nan")
                metrics[f"{head}/{convention}/{name}"] = value
    return metrics


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class Budget:
    steps_per_epoch: int
    total: int
    warmup: int
    drw_start: int | None
    peak_lr: float


def budget(cfg: Any, num_samples: int) -> Budget:
    """The recipe's steps, counted as the reference counts them for one process."""
    d, t = cfg.data, cfg.train
    per_epoch = (num_samples // d.epoch_multiple) * d.epoch_multiple
    per_epoch = per_epoch if num_samples >= d.epoch_multiple else num_samples
    micro_batches = -(-per_epoch // t.micro_batch)
    steps_per_epoch = -(-micro_batches // t.grad_accum)
    total = steps_per_epoch * t.epochs
    if t.max_steps is not None:
        total = min(total, t.max_steps)
    scale = t.micro_batch / cfg.optim.lr_scale_batch if cfg.optim.lr_scale_batch else 1.0
    drw = cfg.distill.drw_epoch
    return Budget(
        steps_per_epoch=steps_per_epoch,
        total=total,
        warmup=round(cfg.schedule.warmup_epochs * steps_per_epoch),
        drw_start=None if drw is None else drw * steps_per_epoch,
        peak_lr=cfg.optim.lr * scale,
    )


def cosine_lr(step: int, b: Budget, cfg: Any) -> float:
    """Linear warm-up from ``warmup_lr``, then a cosine to ``min_lr`` measured from step 0 over
    the scheduled steps (timm's CosineLRScheduler without warm-up prefix)."""
    s = cfg.schedule
    if step < b.warmup:
        return s.warmup_lr + step * (b.peak_lr - s.warmup_lr) / b.warmup
    scheduled = b.steps_per_epoch * cfg.train.epochs
    return s.min_lr + 0.5 * (b.peak_lr - s.min_lr) * (1 + math.cos(math.pi * step / scheduled))


def _check_supported(cfg: Any) -> None:
    from deitlt_scale.errors import UserError

    unsupported = {
        "distill.type": cfg.distill.type not in ("hard", "none"),
        "distill.cls_loss": cfg.distill.cls_loss != "ce",
        "train.task": cfg.train.task != "student",
        "schedule.kind": cfg.schedule.kind != "cosine" or cfg.schedule.warmup_prefix,
        "schedule.per_epoch": cfg.schedule.per_epoch,
        "teacher.map_targets": cfg.teacher.map_targets,
        "train.grad_accum": cfg.train.grad_accum != 1,
    }
    bad = [key for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise UserError(
            "the plain loop trains hard-distilled or plain students, one micro-batch per step, "
            f"with a cosine schedule; {bad[0]} is set to something else"
        )


def train_plain(cfg: Any) -> int:
    """Train ``cfg`` with the plain loop into ``runtime.run_dir``; 0, or 75 when stopped."""
    import numpy as np
    import torch
    from timm.optim import param_groups_weight_decay
    from torch.utils.data import DataLoader

    from deitlt_scale.benchmarks.reference_step import timm_mixup

    _check_supported(cfg)
    started = time.perf_counter()
    root, run_dir = Path(cfg.data.shards), Path(cfg.runtime.run_dir)
    meta = json.loads((root / "meta.json").read_text())
    num_classes, t, d = meta["num_classes"], cfg.train, cfg.data
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    # timm's Mixup draws each batch's mixing weight and CutMix box from numpy's global
    # generator in this process: unseeded, two runs of one seed would train differently.
    np.random.seed(t.seed)
    model = create_model(cfg, num_classes)
    distilled = cfg.distill.type == "hard"
    if distilled:
        model.set_distilled_training(True)
        teacher = FrozenTeacher(Path(cfg.teacher.path), d.mean, d.std)
    train_set = ImageSplit(read_split(root, "train"), train_transform(cfg))
    sampler = RepeatedAugSampler(len(train_set), d.repeated_aug, d.epoch_multiple, t.seed)
    loader = DataLoader(
        train_set,
        batch_size=t.micro_batch,
        sampler=sampler,
        num_workers=d.num_threads,
        persistent_workers=d.num_threads > 0,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(t.seed),
    )
    eval_sets = {
        split: DataLoader(
            ImageSplit(read_split(root, split), eval_transform(cfg)),
            batch_size=cfg.eval.micro_batch,
        )
        for split in ("eval", "val")
        if split in meta["splits"]
    }
    mixer = timm_mixup(d.mixup, num_classes)
    o = cfg.optim
    no_decay = set(model.no_weight_decay())
    optimizer = torch.optim.AdamW(
        param_groups_weight_decay(model, o.weight_decay, no_decay),
        lr=o.lr,
        betas=o.betas,
        eps=o.eps,
    )
    b = budget(cfg, len(train_set))
    weights = class_weights(meta["train_counts"], cfg.distill.beta)
    clip = cfg.deepspeed.gradient_clipping

    stop: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: stop.append(signum))
    step, images_trained, train_seconds, loss_sum = 0, 0, 0.0, 0.0
    agreement = {"teacher_agreement": 0.0, "teacher_in_mix": 0.0}
    try:
        epoch = 0
        while step < b.total:
            sampler.set_epoch(epoch)
            batches, tick = iter(loader), time.perf_counter()
            for images, labels in batches:
                if stop:
                    print(f"plain loop: stopped by signal {stop[0]} at step {step}", flush=True)
                    return EXIT_STOPPED
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(step, b, cfg)
                drw = b.drw_start is not None and step >= b.drw_start
                targets = None
                if not (drw and cfg.distill.no_mixup_drw) and mixer.mixup_enabled:
                    images, targets = mixer(images, labels)
                teacher_logits = teacher(images) if distilled else None
                loss, teacher_labels = deitlt_loss(
                    model(images), targets, labels, teacher_logits, cfg.distill.alpha,
                    weights if drw else None,
                )  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                if teacher_labels is not None:
                    own = teacher_labels == labels
                    # one of the labels mixed into the image: above the target's smoothing floor
                    mixed = own if targets is None else (
                        targets.gather(1, teacher_labels[:, None])[:, 0] > targets.min(1).values
                    )  # fmt: skip
                    agreement["teacher_agreement"] += float(own.float().sum())
                    agreement["teacher_in_mix"] += float(mixed.float().sum())
                images_trained += len(labels)
                loss_sum += float(loss.detach())
                step += 1
                now = time.perf_counter()
                train_seconds, tick = train_seconds + now - tick, now  # the batch's wait included
                if step % t.log_every == 0:
                    print(
                        f"[plain step {step}/{b.total}] loss={float(loss.detach()):.4g} "
                        f"images_per_s={images_trained / train_seconds:.1f}",
                        flush=True,
                    )
                if step >= b.total:
                    break
            epoch += 1
            if epoch % cfg.eval.every_epochs == 0 or step >= b.total:
                _evaluate_all(model, eval_sets, num_classes, meta, run_dir, step)
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = {
        "steps": step,
        "images": images_trained,
        "train_seconds": round(train_seconds, 3),
        "images_per_s": round(images_trained / max(train_seconds, 1e-9), 2),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "loss": loss_sum / max(step, 1),
        **({k: v / images_trained for k, v in agreement.items()} if distilled else {}),
    }
    _write_json(run_dir / SUMMARY_FILE, summary)
    print(f"plain loop: {json.dumps(summary)}", flush=True)
    return 0


def _evaluate_all(model, eval_sets, num_classes, meta, run_dir: Path, step: int) -> None:
    """Evaluate every prepared split; write ``eval/latest.json`` (and ``eval/val/``)."""
    for split, loader in eval_sets.items():
        metrics = evaluate(model, loader, num_classes, meta["groups"])
        where = run_dir / "eval" / ("val" if split == "val" else "")
        _write_json(where / "latest.json", {"step": step, "metrics": metrics})
        if split == "eval":
            shown = {k: v for k, v in metrics.items() if k.endswith(("/overall", "paper/tail"))}
            print(f"[plain step {step}] eval " + json.dumps(shown), flush=True)


# --------------------------------------------------------------------------------------------
# Comparison


def compare(project_dir: Path, plain_dir: Path) -> str:
    """Both runs' final eval figures (percent) and the ratio of their training images/s."""

    def final(run: Path) -> dict[str, float]:
        return json.loads((run / "eval" / "latest.json").read_text())["metrics"]

    project, plain = final(project_dir), final(plain_dir)
    lines = [f"{'metric':<22}{'project':>10}{'plain':>10}{'diff':>10}"]
    for key in sorted(plain):
        if key in project and key.endswith(("/overall", "/paper/tail")):
            a, b = 100 * project[key], 100 * plain[key]
            lines.append(f"{key:<22}{a:>10.1f}{b:>10.1f}{a - b:>+10.1f}")
    speed, mine = (json.loads((r / SUMMARY_FILE).read_text()) for r in (project_dir, plain_dir))
    ratio = speed["images_per_s"] / mine["images_per_s"]
    lines.append(
        f"training images/s: project {speed['images_per_s']:.1f}, plain {mine['images_per_s']:.1f}"
    )
    lines.append(f"ratio project/plain images/s: {ratio:.2f}x")
    return "\n".join(lines)
