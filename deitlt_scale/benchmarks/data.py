"""`deitlt bench data`: train-pipeline throughput, DALI against the torch/PIL/timm reference.

Both loaders read the same shards with the same recipe (the paper's strong augmentation), image
size, batch size and number of CPU threads (DALI) / worker processes (reference). The first
``--warmup`` batches of each (pipeline build, worker start-up) are not timed. Figures are images
per second (augmented images out of the loader); the ratio DALI / reference is printed last.

DALI is measured three times in the same run: with repeated augmentation (``--repeated-aug``,
the recipes' 3) with each copy decoded on its own (``data.repeated_aug_decode=per_copy``) and
with each image decoded once and augmented in three branches (``once``), and without it (1); the
ratios to the last are printed. The first DALI figure is the one compared with the reference.
All use ``data.epoch_multiple=1``; the reference never repeats.

Then the epoch start (with ``--repeated-aug``): the train loader makes a new pipeline every epoch
(from the train graph it defined once, deserialized with the epoch's seed), and makes the next
epoch's while the current one runs. With a simulated training step of ``--step-ms`` per batch,
the wait for each epoch's first batch (epochs 1-3 of 3-batch epochs) is measured with the pipeline
made ahead and made when the epoch starts; the medians and their ratio are printed. Last, what
the graph costs: defining it (Python, once per loader; what every epoch paid when each defined its
own) against making one epoch's pipeline from the serialized graph.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import tempfile
import time
from pathlib import Path

from deitlt_scale.benchmarks.measure import sync
from deitlt_scale.config import DataConfig

HELP = "images/s of the DALI train pipeline vs a torch DataLoader + PIL + timm reference"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shards",
        type=Path,
        default=None,
        help="prepared dataset directory (with meta.json); default: generate small shards in a "
        "temporary directory",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default="cpu",
        help="where DALI decodes and augments (gpu needs CUDA); the reference always uses CPU "
        "workers and copies batches to the GPU when gpu is chosen",
    )
    parser.add_argument(
        "--batches", type=int, default=20, help="timed batches per loader (default 20)"
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed batches before timing (default 2)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument(
        "--image-size", type=int, default=224, help="output side in pixels (default 224)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="DALI CPU threads and reference DataLoader workers (default 2)",
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=DataConfig.prefetch,
        help=f"DALI prefetch queue depth, data.prefetch (default {DataConfig.prefetch})",
    )
    parser.add_argument(
        "--repeated-aug",
        type=int,
        default=DataConfig.repeated_aug,
        help="augmented copies per decoded image in the first DALI measurement, data.repeated_aug "
        f"(default {DataConfig.repeated_aug}); the second measures 1",
    )
    parser.add_argument(
        "--step-ms",
        type=float,
        default=50.0,
        help="simulated training step per batch while measuring the epoch start (default 50)",
    )
    parser.add_argument(
        "--source-size",
        type=int,
        nargs=2,
        default=(256, 320),
        metavar=("H", "W"),
        help="height and width of generated images (default 256 320; ignored with --shards)",
    )


def generate_shards(
    root: Path, count: int, shards: int, height: int, width: int, num_classes: int = 10
) -> None:
    """Write ``count`` smooth random JPEGs (natural-image-like sizes) as a prepared dataset."""
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from deitlt_scale.data import meta as meta_io
    from deitlt_scale.data.meta import DatasetMeta
    from deitlt_scale.data.shards import Sample, shard_name, write_shard

    rng = np.random.default_rng(0)

    def sample(i: int) -> Sample:
        coarse = rng.integers(0, 256, size=(height // 32, width // 32, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
        buf = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        return Sample(f"s{i:07d}", buf.getvalue(), i % num_classes)

    samples = [sample(i) for i in tqdm(range(count), desc="generating images", file=sys.stderr)]
    held_out = samples[:8]  # a token eval split: meta.json requires one
    splits = {}
    for split, items, parts in (("train", samples, shards), ("eval", held_out, 1)):
        infos = [
            write_shard(items[k::parts], root, shard_name(split, k)).to_json() for k in range(parts)
        ]
        splits[split] = {"num_samples": len(items), "shards": infos}

    def counts(items: list[Sample]) -> list[int]:
        return np.bincount([s.label for s in items], minlength=num_classes).tolist()

    meta = DatasetMeta(
        dataset="bench-synthetic",
        num_classes=num_classes,
        train_counts=counts(samples),
        eval_counts=counts(held_out),
        class_map=list(range(num_classes)),
        class_names=[""] * num_classes,
        groups={"paper": [0] * num_classes, "count": [0] * num_classes},
        boundaries=(num_classes, num_classes),
        imbalance_factor=1.0,
        splits=splits,
        source={"generated_by": "deitlt bench data"},
    )
    meta_io.save(meta, root)


def _time(batches, warmup: int, count: int, device, desc: str) -> float:
    """Images/s over ``count`` batches after ``warmup`` untimed ones."""
    from tqdm import tqdm

    stream = iter(batches)
    for _ in range(warmup):
        next(stream)
    sync(device)
    images = 0
    start = time.perf_counter()
    for _ in tqdm(range(count), desc=desc, file=sys.stderr):
        batch = next(stream)
        images += batch.images.shape[0]
    sync(device)
    return images / (time.perf_counter() - start)


def _epoch_start_wait(loader, step_s: float, epochs: int = 3) -> float:
    """Median seconds to an epoch's first batch over epochs 1..``epochs`` (epoch 0 pays one-time
    costs), consuming each batch for ``step_s`` as a training step would."""
    import statistics

    waits = []
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        for i, _ in enumerate(loader.epoch(epoch)):
            if i == 0 and epoch > 0:
                waits.append(time.perf_counter() - start)
            time.sleep(step_s)
    return statistics.median(waits)


def _graph_costs(meta, cfg: DataConfig, batch: int, device, epochs: int = 3) -> tuple[float, float]:
    """Seconds to define the train graph (what every epoch cost when each defined its own) and
    the median seconds to make one epoch's pipeline from it (deserialize with the seed, build)."""
    import statistics

    from deitlt_scale.data.loader import TrainLoader

    loader = TrainLoader(meta, cfg, batch, 1, rank=0, world_size=1, seed=0, device=device)
    start = time.perf_counter()
    loader.serialized_graph()
    defined = time.perf_counter() - start
    made = []
    for epoch in range(epochs):
        start = time.perf_counter()
        loader.build_pipeline(epoch)
        made.append(time.perf_counter() - start)
    return defined, statistics.median(made)


def run(args: argparse.Namespace) -> int:
    import torch

    from deitlt_scale.data import meta as meta_io
    from deitlt_scale.data.loader import TrainLoader, resolve_backend
    from deitlt_scale.data.reference import ReferenceLoader
    from deitlt_scale.errors import UserError

    for flag in ("batches", "batch_size", "image_size", "threads", "prefetch", "repeated_aug"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise UserError("--warmup must be >= 0")
    if args.step_ms < 0:
        raise UserError("--step-ms must be >= 0")
    cfg = DataConfig(
        image_size=args.image_size,
        device=args.device,
        num_threads=args.threads,
        prefetch=args.prefetch,
        repeated_aug=args.repeated_aug,
        epoch_multiple=1,
    )
    backend = resolve_backend(cfg.device)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "gpu"
        else torch.device("cpu")
    )
    needed = (args.warmup + args.batches) * args.batch_size
    with tempfile.TemporaryDirectory(prefix="deitlt-bench-data-") as tmp:
        if args.shards is None:
            root, origin = Path(tmp), "generated"
            generate_shards(root, needed, max(4, 2 * args.threads), *args.source_size)
        else:
            root, origin = args.shards, str(args.shards)
        meta = meta_io.load(root)
        available = meta.num_samples("train") // args.batch_size
        if available < args.warmup + 1:
            raise UserError(
                f"{root} holds {meta.num_samples('train')} training images, too few for "
                f"{args.warmup + 1} batches of {args.batch_size}; lower --batch-size"
            )
        timed = min(args.batches, available - args.warmup)
        tars = [tar for tar, _ in meta.shard_files("train")]
        print(
            f"shards: {origin} ({meta.num_samples('train')} train images in {len(tars)} shards); "
            f"image size {args.image_size}, batch {args.batch_size}, {args.threads} DALI "
            f"threads / reference workers, DALI prefetch depth {args.prefetch}, {timed} timed "
            f"batches after {args.warmup}",
            flush=True,
        )
        rates: dict[str, float] = {}
        variants = [("off", 1, "per_copy")]
        if args.repeated_aug > 1:
            variants = [
                (f"{args.repeated_aug}, decoded per copy", args.repeated_aug, "per_copy"),
                (f"{args.repeated_aug}, decoded once", args.repeated_aug, "once"),
                *variants,
            ]
        for label, repeats, decode in variants:
            dali = TrainLoader(
                meta,
                dataclasses.replace(cfg, repeated_aug=repeats, repeated_aug_decode=decode),
                micro_batch=args.batch_size,
                micro_batches_per_epoch=args.warmup + timed,
                rank=0,
                world_size=1,
                seed=0,
                device=device,
            )
            rates[label] = _time(dali.epoch(0), args.warmup, timed, device, f"dali-ra {label}")
            print(
                f"dali ({backend}, repeated aug {label}): {rates[label]:.1f} images/s", flush=True
            )
        dali_rate = rates[variants[0][0]]
        workers = min(args.threads, len(tars))  # a worker without a shard would idle
        reference = ReferenceLoader(
            tars, cfg, args.batch_size, num_workers=workers, seed=0, device=device
        )
        ref_rate = _time(reference, args.warmup, timed, device, "reference")
        print(
            f"reference (DataLoader, {workers} workers, PIL + timm): {ref_rate:.1f} images/s",
            flush=True,
        )
        waits = {}
        for ahead in (False, True):
            loader = TrainLoader(
                meta,
                cfg,
                micro_batch=args.batch_size,
                micro_batches_per_epoch=min(3, available),
                rank=0,
                world_size=1,
                seed=0,
                device=device,
                define_ahead=ahead,
            )
            waits[ahead] = _epoch_start_wait(loader, args.step_ms / 1000)
        print(
            f"epoch start (wait for the first batch, {args.step_ms:g} ms simulated step per "
            f"batch): {waits[False]:.3f} s with the pipeline made when the epoch starts, "
            f"{waits[True]:.3f} s made ahead during the previous epoch",
            flush=True,
        )
        defined, per_epoch = _graph_costs(meta, cfg, args.batch_size, device)
        print(
            f"train graph: {defined:.3f} s to define (Python, once per loader), {per_epoch:.3f} s "
            "per epoch to deserialize with the epoch's seed and build",
            flush=True,
        )
    for label, _, _ in variants[:-1]:
        print(f"ratio repeated aug {label}/off: {rates[label] / rates['off']:.2f}x")
    print(f"ratio epoch start wait ahead/at start: {waits[True] / waits[False]:.2f}x")
    print(f"ratio per-epoch pipeline deserialized/defined: {per_epoch / defined:.2f}x")
    print(f"ratio dali/reference: {dali_rate / ref_rate:.2f}x")
    return 0
