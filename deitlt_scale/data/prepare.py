"""`deitlt data prepare`: raw dataset -> shuffled WebDataset shards + DALI indexes + meta.json.

The work is planned up front and is small: the records of each split are put in a seeded
random order and cut into shards by (estimated) byte size, so every shard's contents are fixed
before any image is read. ``.plan.json`` records that plan; ``.progress.jsonl`` gets one line
per finished shard (its sha256). A rerun with the same inputs and options recomputes the same
plan, keeps every shard whose file matches its recorded sha256, and writes only the others, so
a killed preparation finishes where it stopped and its shards are byte-identical to an
uninterrupted run. Images stream through worker processes a chunk at a time, with a bounded
number of chunks in flight, so memory does not grow with the dataset. ``meta.json`` is written
last: a directory with one is complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import re
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deitlt_scale import __version__
from deitlt_scale.data import longtail, source_table, sources
from deitlt_scale.data import meta as meta_io
from deitlt_scale.data.meta import META_FILE, OPTIONAL_SPLITS, SPLITS, DatasetMeta
from deitlt_scale.data.shards import (
    Sample,
    ShardInfo,
    plan_bounds,
    sha256_file,
    shard_name,
    write_shard,
)
from deitlt_scale.errors import UserError

SOURCES = tuple(source_table.SOURCES)  # the names, in table order
DEFAULT_SHARD_SIZE = 256 * 10**6  # bytes (256 MB)
PLAN_FILE = ".plan.json"
PROGRESS_FILE = ".progress.jsonl"
PLAN_FORMAT = "deitlt-plan/1"
CHUNK = 32  # images per worker task
_SHARD_FILE = re.compile(r"^\.?(train|eval|val)-\d{6}\.(tar|idx)(\.partial)?$")
_SPLIT_SEED_OFFSET = {"train": 0, "eval": 1, "val": 2}  # a permutation stream per split


def parse_size(text: str | int) -> int:
    """Bytes from ``256MB``, ``64KiB``, ``1.5GB`` or a plain integer (K/M/G = 10^3/6/9,
    Ki/Mi/Gi = 2^10/20/30)."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", str(text).lower())
        if not match:
            raise UserError(f"size {text!r} is not understood; write e.g. 256MB, 64KiB or 1000000")
        number, prefix, binary = match.groups()
        power = "_kmgt".index(prefix) if prefix else 0
        value = int(float(number) * ((1024 if binary else 1000) ** power))
    if value <= 0:
        raise UserError(f"size {text!r} must be positive")
    return value


@dataclass(frozen=True)
class _Job:
    """One shard to write: records ``[start, stop)`` of ``split`` in planned order."""

    split: str
    number: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return shard_name(self.split, self.number)


@dataclass
class _Split:
    records: list[sources.Record]  # planned (shuffled) order
    labels: list[int]  # model label per record
    bounds: list[tuple[int, int]]


def prepare_dataset(
    source: str,
    out: str | Path,
    *,
    root: str | Path | None = None,
    train_list: str | Path | None = None,
    eval_list: str | Path | None = None,
    eval_root: str | Path | None = None,
    eval_fraction: float | None = None,
    imbalance: float | None = None,
    profile: str = "exp",
    num_classes: int | None = None,
    name: str | None = None,
    val_per_class: int | str | None = None,
    val_list: str | Path | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    workers: int = 1,
    seed: int = 0,
    max_skip_fraction: float = 0.01,
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> DatasetMeta:
    """Prepare ``source`` into ``out`` and return its :class:`DatasetMeta` (loaded from disk).

    ``source`` is one of :data:`SOURCES`. ``workers`` > 1 encodes in that many processes.
    ``val_per_class`` (CIFAR-LT, digits-lt) or ``val_list`` (list sources) add a held-out
    ``val`` split for model selection, disjoint from the train and test splits.
    ``seed`` orders samples across shards (the long-tail selection always uses the
    reference's seed 0). Corrupt images are skipped, listed in meta.json["skipped"], and the
    run fails when more than ``max_skip_fraction`` of all entries are skipped. Raises
    :class:`UserError` for bad input and when ``out`` holds a different dataset (unless
    ``overwrite``).
    """
    if source not in SOURCES:
        raise UserError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    shard_bytes = parse_size(shard_size)
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if not 0 <= max_skip_fraction < 1:
        raise UserError(f"--max-skip-fraction must be in [0, 1), got {max_skip_fraction}")
    out = Path(out)
    _check_out(out, overwrite)
    data = _read_source(
        source, root, train_list, eval_list, eval_root, eval_fraction, imbalance, profile,
        num_classes, name, skip_bad, val_per_class, val_list,
    )  # fmt: skip
    class_map, splits = _plan_splits(data, seed, shard_bytes)
    options = {
        "source": source,
        "dataset": data.dataset,
        "seed": seed,
        "shard_size": shard_bytes,
        "imbalance": data.details.get("imbalance"),  # the value used, default or given
        "profile": profile,
        "num_classes": data.num_classes,
        "raw": data.details.get("raw"),
    }
    if data.val:  # only then, so that directories prepared without one still resume
        options["val"] = data.details.get("val_per_class") or data.details.get("val_list")
    plan = {
        "format": PLAN_FORMAT,
        "options": options,
        "class_map": class_map,
        "records_sha256": {s: _records_digest(sp) for s, sp in splits.items()},
        "shards": {s: [list(b) for b in sp.bounds] for s, sp in splits.items()},
    }
    total = sum(len(sp.records) for sp in splits.values()) + len(data.skipped)
    for item in data.skipped:
        _say(progress, f"skipped {item['source']}: {item['reason']}")
    _check_skips(len(data.skipped), total, max_skip_fraction, data.skipped)
    resumed = _adopt_plan(out, plan, overwrite)
    done = _finished_shards(out, splits)
    jobs = [
        _Job(split, number, start, stop)
        for split, sp in splits.items()
        for number, (start, stop) in enumerate(sp.bounds)
        if (split, number) not in done
    ]
    if not jobs and resumed and (out / META_FILE).is_file():
        _say(progress, f"{out} is already prepared with these inputs and options")
        return meta_io.load(out)
    if resumed and done:
        _say(progress, f"resuming {out}: {len(done)} shard(s) complete, {len(jobs)} to write")
    (out / META_FILE).unlink(missing_ok=True)  # shards change: the directory is incomplete
    _remove_partials(out)
    for record in _write_jobs(jobs, data, splits, out, workers, total, max_skip_fraction, progress):
        done[(record["split"], record["number"])] = record
    return _finish(out, data, splits, class_map, done, options, total, max_skip_fraction)


# --------------------------------------------------------------------------- reading and planning


def _read_source(
    source, root, train_list, eval_list, eval_root, eval_fraction, imbalance, profile,
    num_classes, name, skip_bad, val_per_class=None, val_list=None,
) -> sources.SourceData:  # fmt: skip
    """Check the options against the source's row of the source table, then read it."""
    args = source_table.SourceArgs(
        root=root, train_list=train_list, eval_list=eval_list, num_classes=num_classes,
        eval_root=eval_root, eval_fraction=eval_fraction, imbalance=imbalance, name=name,
        profile=profile, skip_bad=skip_bad, val_per_class=val_per_class, val_list=val_list,
    )  # fmt: skip
    refused = source_table.refusal(source, args)
    if refused:
        raise UserError(refused)
    if profile not in ("exp", "step"):
        raise UserError(f"--profile must be exp or step, got {profile!r}")
    if imbalance is not None and imbalance < 1:
        raise UserError(f"--imbalance is N_max/N_min and must be >= 1 (e.g. 100), got {imbalance}")
    if num_classes is not None and num_classes < 1:
        raise UserError(f"--num-classes must be >= 1, got {num_classes}")
    entry = source_table.SOURCES[source]
    missing = entry.missing(source, args)
    if missing:
        raise UserError(missing)
    return entry.read(source, args)


def _plan_splits(
    data: sources.SourceData, seed: int, shard_bytes: int
) -> tuple[list[int], dict[str, _Split]]:
    """The frequency class map and, per split, the shuffled records and their shard bounds."""
    k = data.num_classes
    counts = np.bincount([r.label for r in data.train], minlength=k)
    if not data.train or counts.min() == 0:
        empty = int(np.argmin(counts)) if data.train else 0
        raise UserError(
            f"class {empty} ({data.class_names[empty] or 'unnamed'}) has no training image in "
            f"{data.details.get('raw', data.dataset)}; every class needs at least one"
        )
    class_map = longtail.class_map_by_frequency(counts.tolist())
    splits: dict[str, _Split] = {}
    wanted = SPLITS + tuple(s for s in OPTIONAL_SPLITS if getattr(data, s))
    for split in wanted:
        raw = {"train": data.train, "eval": data.eval, "val": data.val}[split]
        if not raw:
            raise UserError(f"the {split} split of {data.dataset} is empty; check its source")
        order = np.random.RandomState(seed + _SPLIT_SEED_OFFSET[split]).permutation(len(raw))
        records = [raw[i] for i in order]
        if split in data.arrays:
            estimate = _array_size_estimate(data.arrays[split], records)
            sizes = [estimate] * len(records)
        else:
            sizes = [r.size for r in records]
        splits[split] = _Split(
            records, [class_map[r.label] for r in records], plan_bounds(sizes, shard_bytes)
        )
    return class_map, splits


def _array_size_estimate(pixels: np.ndarray, records: list[sources.Record]) -> int:
    """Mean JPEG size of the first (up to) 64 planned rows: deterministic for a given plan."""
    head = records[:64]
    return int(np.mean([len(sources.encode_array(pixels[int(r.ref)])) for r in head]))


def _records_digest(split: _Split) -> str:
    digest = hashlib.sha256()
    for record, label in zip(split.records, split.labels):
        digest.update(f"{record.ref}\t{label}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _check_skips(skipped: int, total: int, limit: float, items: list[dict[str, str]]) -> None:
    if skipped > limit * total:
        first = f"; first: {items[0]['source']}: {items[0]['reason']}" if items else ""
        raise UserError(
            f"{skipped} of {total} entries skipped, more than --max-skip-fraction {limit}"
            f"{first}; repair the data or raise --max-skip-fraction"
        )


# --------------------------------------------------------------------------- the output directory


def _ours(out: Path) -> list[Path]:
    """Files of a preparation in ``out``: shards, indexes, partials, meta, plan, progress."""
    if not out.is_dir():
        return []
    return sorted(
        p
        for p in out.iterdir()
        if _SHARD_FILE.match(p.name)
        or p.name
        in (META_FILE, PLAN_FILE, PROGRESS_FILE, f".{META_FILE}.partial", f"{PLAN_FILE}.tmp")
    )


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another --out")
    existing = _ours(out)
    if existing and not (out / PLAN_FILE).is_file() and not overwrite:
        raise UserError(
            f"--out {out} already holds another dataset's files ({existing[0].name}, ...); "
            "choose an empty --out or pass --overwrite"
        )


def _adopt_plan(out: Path, plan: dict[str, Any], overwrite: bool) -> bool:
    """Write the plan, or confirm the stored one; True when resuming a stored plan."""
    path = out / PLAN_FILE
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError:
            stored = None
        if stored == plan:
            return True
        if not overwrite:
            differs = _first_difference(stored, plan) if isinstance(stored, dict) else "all"
            raise UserError(
                f"--out {out} holds a preparation with other inputs or options ({PLAN_FILE}: "
                f"{differs} differs); rerun with the same ones, choose another --out, "
                "or pass --overwrite"
            )
    for stale in _ours(out):
        stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, plan)
    return False


def _first_difference(stored: dict[str, Any], plan: dict[str, Any]) -> str:
    """The first plan entry that differs, e.g. ``options.seed`` or ``records_sha256``."""
    for key, value in plan.items():
        if stored.get(key) != value:
            if isinstance(value, dict) and isinstance(stored.get(key), dict):
                inner = next((k for k in value if stored[key].get(k) != value[k]), None)
                return f"{key}.{inner}" if inner else key
            return key
    return "format"


def _finished_shards(out: Path, splits: dict[str, _Split]) -> dict[tuple[str, int], dict]:
    """Progress records of shards that exist whole: tar and index present, sha256 as recorded."""
    recorded: dict[tuple[str, int], dict] = {}
    path = out / PROGRESS_FILE
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                recorded[(record["split"], int(record["number"]))] = record
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a line cut short by a kill
    done: dict[tuple[str, int], dict] = {}
    for (split, number), record in recorded.items():
        if split not in splits or number >= len(splits[split].bounds):
            continue
        info = record.get("info")
        if info is None:  # every image of that shard was skipped: nothing to check
            done[(split, number)] = record
            continue
        tar, idx = out / info["name"], out / info["index"]
        if tar.is_file() and idx.is_file() and sha256_file(tar) == info["sha256"]:
            done[(split, number)] = record
    return done


def _remove_partials(out: Path) -> None:
    for path in _ours(out):
        if path.name.endswith(".partial"):
            path.unlink()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(obj) + "\n")
    tmp.replace(path)


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr)


# --------------------------------------------------------------------------- writing


def _encode_chunk(kind: str, items: list[Any]) -> list[bytes | str]:
    """Worker task: JPEG bytes per item, or the reason it was skipped (a ``str``)."""
    results: list[bytes | str] = []
    for item in items:
        try:
            results.append(
                sources.encode_array(item) if kind == "array" else sources.encode_file(item)
            )
        except sources.BadImage as err:
            results.append(str(err))
    return results


class _Inline(Executor):
    """Runs tasks in the calling process (``workers=1``): no start-up cost, easy to debug."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:
            future.set_exception(err)
        return future


def _tasks(jobs: list[_Job], data: sources.SourceData, splits: dict[str, _Split]):
    """(job number, kind, items) per chunk of at most CHUNK images, in write order."""
    for j, job in enumerate(jobs):
        records = splits[job.split].records
        pixels = data.arrays.get(job.split)
        for start in range(job.start, job.stop, CHUNK):
            chunk = records[start : min(start + CHUNK, job.stop)]
            if pixels is not None:
                yield j, "array", [pixels[int(r.ref)] for r in chunk]
            else:
                yield j, "file", [r.ref for r in chunk]


def _ordered(executor: Executor, tasks, in_flight: int) -> Iterator[tuple[int, list]]:
    """Results in task order, with at most ``in_flight`` tasks submitted and not yet consumed
    (this bound is what keeps memory flat)."""
    pending: deque[tuple[int, Future]] = deque()
    tasks = iter(tasks)
    try:
        for j, kind, items in itertools.islice(tasks, in_flight):
            pending.append((j, executor.submit(_encode_chunk, kind, items)))
        while pending:
            j, future = pending.popleft()
            result = future.result()
            for j2, kind, items in itertools.islice(tasks, 1):
                pending.append((j2, executor.submit(_encode_chunk, kind, items)))
            yield j, result
    finally:
        for _, future in pending:
            future.cancel()


def _write_jobs(
    jobs: list[_Job],
    data: sources.SourceData,
    splits: dict[str, _Split],
    out: Path,
    workers: int,
    total: int,
    max_skip_fraction: float,
    progress: bool,
) -> Iterator[dict]:
    """Write the shards of ``jobs`` in order; yields each one's progress record once durable."""
    if not jobs:
        return
    from tqdm import tqdm

    skipped_total = len(data.skipped)
    skip_items = list(data.skipped)
    executor: Executor = (
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        if workers > 1
        else _Inline()
    )
    bar = tqdm(
        total=sum(j.stop - j.start for j in jobs),
        unit="img",
        desc=f"prepare {data.dataset}",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    stream = _ordered(executor, _tasks(jobs, data, splits), in_flight=4 * workers)
    try:
        with open(out / PROGRESS_FILE, "a") as log:
            for job in jobs:
                split = splits[job.split]
                skipped: list[dict[str, Any]] = []

                def samples(job: _Job = job, split: _Split = split, skipped: list = skipped):
                    nonlocal skipped_total
                    position = job.start
                    while position < job.stop:  # the job's chunks come next, in order
                        _, results = next(stream)
                        for result in results:
                            if isinstance(result, bytes):
                                yield Sample(f"{position:08d}", result, split.labels[position])
                            else:
                                origin = _origin(data, job.split, split.records[position])
                                item = {"source": origin, "reason": result, "split": job.split}
                                skipped.append({**item, "label": split.labels[position]})
                                skip_items.append(item)
                                skipped_total += 1
                                bar.write(f"skipped {origin}: {result}", file=sys.stderr)
                                _check_skips(skipped_total, total, max_skip_fraction, skip_items)
                            position += 1
                        bar.update(len(results))

                info = _write_or_none(samples(), out, job)
                record = {
                    "split": job.split,
                    "number": job.number,
                    "info": info.to_json() if info else None,
                    "skipped": skipped,
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
                os.fsync(log.fileno())
                yield record
    finally:
        stream.close()
        bar.close()
        executor.shutdown(wait=True, cancel_futures=True)
        _remove_partials(out)  # a shard interrupted by an error is rewritten next time


def _write_or_none(samples, out: Path, job: _Job) -> ShardInfo | None:
    """write_shard, or None when every image of the shard was skipped."""
    samples = iter(samples)
    first = next(samples, None)
    if first is None:
        return None
    return write_shard(itertools.chain([first], samples), out, job.name)


def _origin(data: sources.SourceData, split: str, record: sources.Record) -> str:
    return record.ref if split not in data.arrays else f"{data.dataset} {split} row {record.ref}"


# --------------------------------------------------------------------------- meta.json


def _finish(
    out: Path,
    data: sources.SourceData,
    splits: dict[str, _Split],
    class_map: list[int],
    done: dict[tuple[str, int], dict],
    options: dict[str, Any],
    total: int,
    max_skip_fraction: float,
) -> DatasetMeta:
    k = data.num_classes
    skipped = [dict(item) for item in data.skipped]
    counts: dict[str, np.ndarray] = {}
    split_json: dict[str, dict[str, Any]] = {}
    for split, sp in splits.items():
        tally = np.bincount(sp.labels, minlength=k)
        shards = []
        for number in range(len(sp.bounds)):
            record = done[(split, number)]
            for item in record["skipped"]:
                tally[item["label"]] -= 1
                skipped.append({key: item[key] for key in ("source", "reason", "split")})
            if record["info"] is not None:
                shards.append(record["info"])
        counts[split] = tally
        split_json[split] = {"num_samples": int(tally.sum()), "shards": shards}
    _check_skips(len(skipped), total, max_skip_fraction, skipped)
    train_counts = counts["train"].tolist()
    if min(train_counts) == 0:
        raise UserError(f"a class lost all its training images to skipped files; see {out}")
    boundaries = longtail.paper_boundaries(data.dataset, train_counts)
    boundary_note = "paper"
    if boundaries[1] > k:  # a small stand-in with a paper dataset's name: use the count rule
        boundaries = longtail.paper_boundaries("", train_counts)
        boundary_note = "count thresholds (paper boundaries exceed the class count)"
    names = [""] * k
    for original, model in enumerate(class_map):
        names[model] = data.class_names[original]
    import PIL

    meta = DatasetMeta(
        dataset=data.dataset,
        num_classes=k,
        train_counts=train_counts,
        eval_counts=counts["eval"].tolist(),
        val_counts=counts["val"].tolist() if "val" in counts else None,
        class_map=class_map,
        class_names=names,
        groups={
            "paper": longtail.groups_by_index(k, boundaries),
            "count": longtail.groups_by_count(train_counts),
        },
        boundaries=tuple(boundaries),
        imbalance_factor=float(max(train_counts) / min(train_counts)),
        splits=split_json,
        image_size=data.image_size,
        skipped=skipped,
        source={
            **options,
            **data.details,
            "boundaries": boundary_note,
            "jpeg": {
                "stored": "original bytes for valid RGB/greyscale JPEG files; otherwise "
                f"converted to RGB JPEG quality {sources.JPEG_QUALITY}, 4:4:4 chroma",
            },
            "versions": {
                "deitlt-scale": __version__,
                "numpy": np.__version__,
                "pillow": PIL.__version__,
            },
        },
    )
    meta_io.save(meta, out)  # last: its presence marks the directory complete
    return meta_io.load(out)
