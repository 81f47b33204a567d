"""`deitlt bench prepare`: dataset preparation against a plain sequential tar copy of the same files.

The baseline is the I/O ceiling of the same job: every input file read once and appended to
one tar, in one process, no decoding. Preparation adds listing, validation (a JPEG decode at
1/8 scale), shuffling across shards, index and checksum writing. Both read the same files,
which have just been generated or read, so both are served from the page cache: the figure
measures the preparation's CPU overhead against raw copying, not the disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HELP = "images/s and MB/s of `deitlt data prepare` against a sequential copy into one tar"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        type=Path,
        help="a class-folder dataset to use instead of generated JPEGs (it is only read)",
    )
    parser.add_argument("--images", type=int, default=2000, help="JPEGs to generate (2000)")
    parser.add_argument("--image-size", type=int, default=256, help="their side in pixels (256)")
    parser.add_argument("--classes", type=int, default=10, help="class folders to spread them (10)")
    parser.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="preparation worker processes (default: the CPUs available)",
    )
    parser.add_argument("--shard-size", default="64MB", help="target shard size (64MB)")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="where to put generated and written files (default: a temp dir)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")


def generate_jpegs(root: Path, images: int, size: int, classes: int) -> None:
    """Photo-like JPEGs (smooth random colour fields plus grain, quality 90), spread evenly
    over ``classes`` folders. Seeded: the same arguments give the same files."""
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(images), desc="generate", unit="img", file=sys.stderr):
        coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
        grain = rng.normal(0, 6, size=field.shape)
        pixels = np.clip(field + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"class{i % classes:03d}" / f"{i:07d}.jpg", quality=90)


def copy_to_tar(files: list[Path], root: Path, target: Path) -> float:
    """Seconds to append every file to one uncompressed tar and make it durable."""
    start = time.perf_counter()
    with open(target, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for path in files:
                tar.add(path, arcname=str(path.relative_to(root)))
        raw.flush()
        os.fsync(raw.fileno())
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    from deitlt_scale.data.list_sources import IMAGE_EXTENSIONS
    from deitlt_scale.data.prepare import prepare_dataset

    work = Path(tempfile.mkdtemp(prefix="deitlt-bench-prepare-", dir=args.workdir))
    try:
        if args.input is not None:
            raw = args.input
        else:
            raw = work / "raw"
            generate_jpegs(raw, args.images, args.image_size, args.classes)
        files = sorted(
            p for p in raw.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        total_mb = sum(p.stat().st_size for p in files) / 1e6
        copy_s = copy_to_tar(files, raw, work / "copy.tar")
        start = time.perf_counter()
        meta = prepare_dataset(
            "folder",
            work / "shards",
            root=raw,
            eval_fraction=0.1,
            shard_size=args.shard_size,
            workers=args.workers,
            progress=False,
        )
        prepare_s = time.perf_counter() - start
        prepared = meta.num_samples("train") + meta.num_samples("eval")
        cpus = len(os.sched_getaffinity(0))
        print(
            f"input: {len(files)} images, {total_mb:.1f} MB in {raw}; "
            f"{args.workers} worker(s) on {cpus} CPU(s)"
        )
        print(
            f"sequential copy into one tar (I/O ceiling): {len(files) / copy_s:9.1f} img/s "
            f"{total_mb / copy_s:8.1f} MB/s  ({copy_s:.2f} s)"
        )
        print(
            f"deitlt data prepare (folder, {args.workers} workers):  "
            f"{prepared / prepare_s:9.1f} img/s {total_mb / prepare_s:8.1f} MB/s  "
            f"({prepare_s:.2f} s, {len(meta.splits['train']['shards'])} + "
            f"{len(meta.splits['eval']['shards'])} shards)"
        )
        print(f"ratio prepare/copy: {copy_s / prepare_s:.3f}")
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0
