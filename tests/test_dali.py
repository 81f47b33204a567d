"""The DALI input pipeline on CPU, over small generated WebDataset shards (real DALI, real tars)."""

from __future__ import annotations

import dataclasses
import io
import re
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug.core import signed_bin
from PIL import Image

from deitlt_scale.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from deitlt_scale.data import meta as meta_io
from deitlt_scale.data.dali import LABEL_BYTES, ContrastViews
from deitlt_scale.data.dali_augment import RA_BINS, timm_increasing_suite
from deitlt_scale.data.dali_views import colour_views, cutout, gaussian_blur
from deitlt_scale.data.loader import (
    EvalLoader,
    TrainLoader,
    parse_labels,
    resolve_backend,
)
from deitlt_scale.data.meta import DatasetMeta
from deitlt_scale.data.reference import ReferenceLoader
from deitlt_scale.data.shard_files import ShardError
from deitlt_scale.data.shards import Sample, shard_name, write_shard
from deitlt_scale.errors import UserError

SIZE = 32  # output image size of every test
CPU = torch.device("cpu")
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

# --------------------------------------------------------------------------------------------
# Fixture helpers: images whose pixels say which sample they are


def jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def id_colour(sample_id: int) -> tuple[int, int, int]:
    """A solid colour per id (levels 32 apart survive JPEG and resampling)."""
    return (16 + 32 * (sample_id % 8), 16 + 32 * (sample_id // 8 % 8), 16 + 32 * (sample_id // 64))


def colour_image(sample_id: int, side: int = 16) -> bytes:
    return jpeg(np.full((side, side, 3), id_colour(sample_id), dtype=np.uint8))


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: (B, 3, H, W) in 0..255 units."""
    return (images * STD + MEAN) * 255.0


def decode_ids(images: torch.Tensor) -> list[int]:
    """The id whose colour each (un-erased, colour-preserving) image shows."""
    rgb = to_pixels(images).flatten(2).median(dim=2).values  # (B, 3)
    levels = ((rgb - 16) / 32).round().clamp(0, 7).to(torch.int64)
    return (levels[:, 0] + 8 * levels[:, 1] + 64 * levels[:, 2]).tolist()


def write_dataset(
    root: Path,
    train: list[Sample],
    eval_: list[Sample],
    num_classes: int,
    train_shards: int = 4,
    eval_shards: int = 2,
) -> DatasetMeta:
    """Shards + meta.json of a tiny prepared dataset (labels are model labels already)."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, samples, count in (("train", train, train_shards), ("eval", eval_, eval_shards)):
        infos = []
        for k, part in enumerate(np.array_split(np.arange(len(samples)), count)):
            info = write_shard([samples[i] for i in part], root, shard_name(split, k))
            infos.append(info.to_json())
        splits[split] = {"num_samples": len(samples), "shards": infos}
    counts = np.bincount([s.label for s in train], minlength=num_classes).tolist()
    eval_counts = np.bincount([s.label for s in eval_], minlength=num_classes).tolist()
    meta = DatasetMeta(
        dataset="test-colours",
        num_classes=num_classes,
        train_counts=counts,
        eval_counts=eval_counts,
        class_map=list(range(num_classes)),
        class_names=[""] * num_classes,
        groups={"paper": [0] * num_classes, "count": [2] * num_classes},
        boundaries=(num_classes, num_classes),
        imbalance_factor=1.0,
        splits=splits,
        image_size=16,
    )
    meta_io.save(meta, root)
    return meta_io.load(root)


def make_config(
    repeated_aug: int = 1, epoch_multiple: int = 1, decode: str = "per_copy", **augment: object
) -> DataConfig:
    """Every sample once per epoch unless told otherwise (the tests of the sampler say so)."""
    cfg = DataConfig(
        image_size=SIZE,
        device="cpu",
        num_threads=1,
        prefetch=2,
        repeated_aug=repeated_aug,
        repeated_aug_decode=decode,
        epoch_multiple=epoch_multiple,
    )
    cfg.augment = dataclasses.replace(cfg.augment, **augment)
    return cfg


PLAIN = {"randaugment_ops": 0, "random_erasing": 0.0}  # colour-preserving recipe

N_TRAIN, N_EVAL = 48, 21


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> DatasetMeta:
    """48 train + 21 eval solid-colour samples; the label is the sample id, the colour codes it."""
    train = [Sample(f"t{i:04d}", colour_image(i), i) for i in range(N_TRAIN)]
    eval_ = [Sample(f"e{i:04d}", colour_image(i), i) for i in range(N_EVAL)]
    return write_dataset(tmp_path_factory.mktemp("colours"), train, eval_, num_classes=N_TRAIN)


def train_loader(meta: DatasetMeta, cfg: DataConfig, **kw: object) -> TrainLoader:
    args: dict = {
        "micro_batch": 4,
        "micro_batches_per_epoch": N_TRAIN // 4,
        "rank": 0,
        "world_size": 1,
        "seed": 0,
        "device": CPU,
    }
    args.update(kw)
    return TrainLoader(meta, cfg, **args)


def labels_of(batches) -> list[int]:
    return [int(v) for b in batches for v in b.labels]


# --------------------------------------------------------------------------------------------
# Batches


def test_labels_parse_from_padded_ascii_of_any_length() -> None:
    values = [0, 7, 42, 999, 123456789012]
    raw = torch.zeros(len(values), LABEL_BYTES, dtype=torch.uint8)
    for row, v in enumerate(values):
        digits = str(v).encode()
        raw[row, : len(digits)] = torch.tensor(list(digits), dtype=torch.uint8)
    parsed = parse_labels(raw)
    assert parsed.dtype == torch.int64
    assert parsed.tolist() == values


def test_full_recipe_batches_have_the_promised_shape_dtype_and_labels(colours: DatasetMeta) -> None:
    loader = train_loader(colours, make_config(), micro_batches_per_epoch=3)
    batches = list(loader.epoch(0))
    assert len(batches) == 3
    for batch in batches:
        assert batch.images.shape == (4, 3, SIZE, SIZE)
        assert batch.images.dtype == torch.float32
        assert batch.images.device == CPU
        assert torch.isfinite(batch.images).all()
        assert batch.labels.shape == (4,) and batch.labels.dtype == torch.int64
        assert ((batch.labels >= 0) & (batch.labels < N_TRAIN)).all()


def test_images_without_erasing_stay_within_the_normalised_pixel_range(
    colours: DatasetMeta,
) -> None:
    loader = train_loader(colours, make_config(random_erasing=0.0), micro_batches_per_epoch=3)
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    for batch in loader.epoch(0):
        assert (batch.images >= lo - 1e-4).all() and (batch.images <= hi + 1e-4).all()


def test_labels_stay_paired_with_their_images(colours: DatasetMeta) -> None:
    loader = train_loader(colours, make_config(**PLAIN))
    for batch in loader.epoch(0):
        assert decode_ids(batch.images) == batch.labels.tolist()


def test_randaugment_changes_colours_of_some_images_only(colours: DatasetMeta) -> None:
    cfg = make_config(random_erasing=0.0, hflip=0.0)
    changed = total = 0
    for batch in train_loader(colours, cfg).epoch(0):
        rgb = to_pixels(batch.images).flatten(2).median(dim=2).values
        expected = torch.tensor([id_colour(int(i)) for i in batch.labels], dtype=torch.float32)
        changed += int(((rgb - expected).abs().amax(dim=1) > 12).sum())
        total += len(batch.labels)
    # Half the drawn ops are skipped and several leave a flat colour as it is, but invert,
    # solarize, posterize, brightness, colour and contrast change it.
    assert 0.1 * total <= changed <= 0.9 * total


# --------------------------------------------------------------------------------------------
# Order


def test_every_sample_is_seen_once_per_epoch_across_two_ranks(colours: DatasetMeta) -> None:
    cfg = make_config(**PLAIN)
    per_rank = N_TRAIN // (2 * 4)
    seen = []
    for rank in (0, 1):
        loader = train_loader(
            colours, cfg, micro_batches_per_epoch=per_rank, rank=rank, world_size=2
        )
        batches = list(loader.epoch(3))
        assert len(batches) == per_rank
        seen.append(labels_of(batches))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(N_TRAIN))


def test_rank_partition_changes_between_epochs(colours: DatasetMeta) -> None:
    loader = train_loader(
        colours, make_config(**PLAIN), micro_batches_per_epoch=6, rank=0, world_size=2
    )
    assert set(labels_of(loader.epoch(0))) != set(labels_of(loader.epoch(1)))


def test_same_seed_and_epoch_give_the_same_order_and_epochs_differ(colours: DatasetMeta) -> None:
    cfg = make_config(**PLAIN)
    first = labels_of(train_loader(colours, cfg, seed=5).epoch(2))
    again = labels_of(train_loader(colours, cfg, seed=5).epoch(2))
    next_epoch = labels_of(train_loader(colours, cfg, seed=5).epoch(3))
    other_seed = labels_of(train_loader(colours, cfg, seed=6).epoch(2))
    assert first == again
    assert sorted(first) == sorted(next_epoch) == list(range(N_TRAIN))
    assert first != next_epoch
    assert first != other_seed


def test_resuming_mid_epoch_continues_the_same_batches(colours: DatasetMeta) -> None:
    loader = train_loader(colours, make_config())  # full recipe: augmentation draws too
    whole = list(loader.epoch(1))
    resumed = list(loader.epoch(1, start=5))
    assert len(resumed) == len(whole) - 5
    for a, b in zip(whole[5:], resumed):
        assert torch.equal(a.labels, b.labels)
        assert torch.allclose(a.images, b.images)


def test_next_epoch_defined_in_the_background_gives_the_batches_of_a_fresh_definition(
    colours: DatasetMeta,
) -> None:
    cfg = make_config()  # full recipe: RandAugment's conditionals are defined in the thread too
    loader = train_loader(colours, cfg)
    list(loader.epoch(0))
    epoch, defined = loader._next
    assert epoch == 1
    ahead = defined.result()
    continued = list(loader.epoch(1))  # runs the pipeline defined in the background
    assert loader._next[0] == 2 and defined.result() is ahead
    fresh = list(train_loader(colours, cfg).epoch(1))  # defined on this thread
    assert len(continued) == len(fresh) == len(loader)
    for a, b in zip(continued, fresh, strict=True):
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.images, b.images)


DECODES = ["per_copy", "once"]


@pytest.mark.parametrize("decode", DECODES)
def test_batches_carry_the_samples_of_the_plan_and_a_smaller_last_micro_batch(
    colours: DatasetMeta, decode: str
) -> None:
    cfg = make_config(repeated_aug=3, decode=decode, **PLAIN)
    loader = train_loader(colours, cfg, micro_batch=5, micro_batches_per_epoch=None)
    batches = list(loader.epoch(2))
    assert [len(b.labels) for b in batches] == [5] * 9 + [3]  # 48 images per epoch
    for batch, samples in zip(batches, loader.epoch_samples(2), strict=True):
        assert batch.samples.tolist() == samples.tolist()
        assert batch.labels.tolist() == samples.tolist()  # a sample's label is its id here
        assert decode_ids(batch.images) == batch.labels.tolist()
    assert [loader.key(i) for i in batches[0].samples.tolist()] == [
        f"t{i:04d}" for i in batches[0].samples.tolist()
    ]


def test_an_epoch_with_repeated_augmentation_reads_a_third_of_the_images_three_times(
    colours: DatasetMeta,
) -> None:
    loader = train_loader(colours, make_config(repeated_aug=3, **PLAIN))
    copies = Counter(labels_of(loader.epoch(0)))
    assert sum(copies.values()) == N_TRAIN
    assert sorted(copies.values()) == [3] * (N_TRAIN // 3)


@pytest.mark.parametrize("decode", DECODES)
def test_resuming_with_repeated_augmentation_retraces_the_samples_and_the_draws(
    colours: DatasetMeta, decode: str
) -> None:
    loader = train_loader(colours, make_config(repeated_aug=3, decode=decode))  # full recipe
    whole = list(loader.epoch(1))
    resumed = list(loader.epoch(1, start=5))
    assert len(resumed) == len(whole) - 5
    for a, b in zip(whole[5:], resumed, strict=True):
        assert torch.equal(a.samples, b.samples)
        assert torch.equal(a.labels, b.labels)
        assert torch.allclose(a.images, b.images)


def test_start_at_the_end_yields_nothing(colours: DatasetMeta) -> None:
    loader = train_loader(colours, make_config(**PLAIN))
    assert list(loader.epoch(0, start=len(loader))) == []


def test_more_batches_than_a_rank_holds_is_a_user_error(colours: DatasetMeta) -> None:
    with pytest.raises(UserError, match="exceed"):
        train_loader(colours, make_config(), micro_batches_per_epoch=7, world_size=2)


# --------------------------------------------------------------------------------------------
# Eval


def test_eval_sees_every_sample_once_across_ranks_and_pads_with_minus_one(
    colours: DatasetMeta,
) -> None:
    cfg = make_config()
    seen, counts = [], []
    for rank in (0, 1):
        loader = EvalLoader(colours, cfg, micro_batch=4, rank=rank, world_size=2, device=CPU)
        batches = list(loader)
        counts.append(len(batches))
        for batch in batches:
            assert batch.images.shape == (4, 3, SIZE, SIZE)
            keep = batch.labels >= 0
            assert (batch.labels[~keep] == -1).all()
            assert decode_ids(batch.images[keep]) == batch.labels[keep].tolist()
            seen += batch.labels[keep].tolist()
    assert counts[0] == counts[1]  # ranks stay in lock-step
    assert sorted(seen) == list(range(N_EVAL))


# --------------------------------------------------------------------------------------------
# Random erasing


def test_random_erasing_replaces_one_box_with_unit_gaussian_noise(colours: DatasetMeta) -> None:
    cfg = make_config(randaugment_ops=0, random_erasing=1.0)
    fractions, noise = [], []
    for batch in train_loader(colours, cfg).epoch(0):
        expected = torch.tensor([id_colour(int(i)) for i in batch.labels], dtype=torch.float32)
        clean = (expected.view(-1, 3, 1, 1) / 255.0 - MEAN) / STD
        erased = ((batch.images - clean).abs() > 0.1).any(dim=1)  # (B, H, W)
        for mask, image in zip(erased, batch.images):
            rows = mask.any(dim=1).nonzero()
            cols = mask.any(dim=0).nonzero()
            if len(rows) == 0:
                fractions.append(0.0)
                continue
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert mask.sum() >= 0.97 * box  # one rectangle
            fractions.append(float(box) / SIZE**2)
            noise.append(image[:, mask].flatten())
    fractions_t = torch.tensor(fractions)
    # timm rounds box sides to whole pixels: allow a pixel's worth around [0.02, 1/3].
    assert (fractions_t >= 0.012).float().mean() >= 0.95
    assert (fractions_t <= 0.40).all()
    values = torch.cat(noise)
    assert abs(float(values.mean())) < 0.1
    assert abs(float(values.std()) - 1.0) < 0.1


# --------------------------------------------------------------------------------------------
# Augmentation statistics against the reference loader

GRADIENT = 64  # source side; R encodes x, G encodes y (4 levels per pixel)


@pytest.fixture(scope="module")
def gradients(tmp_path_factory: pytest.TempPathFactory) -> DatasetMeta:
    ramp = (np.arange(GRADIENT) * 4).astype(np.uint8)
    pixels = np.zeros((GRADIENT, GRADIENT, 3), dtype=np.uint8)
    pixels[..., 0] = ramp[None, :]
    pixels[..., 1] = ramp[:, None]
    pixels[..., 2] = 128
    data = jpeg(pixels)
    train = [Sample(f"g{i:04d}", data, i % 2) for i in range(256)]
    eval_ = [Sample(f"h{i:04d}", data, 0) for i in range(2)]
    return write_dataset(tmp_path_factory.mktemp("gradients"), train, eval_, num_classes=2)


def crop_geometry(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: crop area fraction, aspect ratio (w/h) and whether it was mirrored.

    A linear ramp stays linear under crop + resize, so the fitted slope of R along x (G along y)
    is 4 * crop extent / output size; a mirrored crop has a negative R slope.
    """
    pixels = to_pixels(images)
    axis = torch.arange(SIZE, dtype=torch.float32) - (SIZE - 1) / 2
    inner = slice(1, SIZE - 1)  # border pixels see resampling clamps
    r = pixels[:, 0, :, inner].mean(dim=1)
    g = pixels[:, 1, inner, :].mean(dim=2)
    slope_x = (r * axis[inner]).sum(dim=1) / (axis[inner] ** 2).sum()
    slope_y = (g * axis[inner]).sum(dim=1) / (axis[inner] ** 2).sum()
    width = slope_x.abs() * SIZE / 4
    height = slope_y.abs() * SIZE / 4
    return width * height / GRADIENT**2, width / height, slope_x < 0


def test_crop_and_flip_statistics_match_the_configuration_and_the_reference(
    gradients: DatasetMeta,
) -> None:
    cfg = make_config(**PLAIN)
    dali = list(train_loader(gradients, cfg, micro_batch=32, micro_batches_per_epoch=8).epoch(0))
    tars = [tar for tar, _ in gradients.shard_files("train")]
    stream = iter(ReferenceLoader(tars, cfg, batch_size=32, num_workers=0, seed=0))
    reference = [next(stream) for _ in range(8)]
    stats: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for name, batches in (("dali", dali), ("reference", reference)):
        area, ratio, flipped = crop_geometry(torch.cat([b.images for b in batches]))
        lo_area, hi_area = cfg.augment.scale
        lo_ratio, hi_ratio = cfg.augment.ratio
        assert ((area > lo_area * 0.8) & (area < hi_area * 1.05)).all(), name
        assert ((ratio > lo_ratio * 0.9) & (ratio < hi_ratio * 1.1)).all(), name
        assert 0.35 < flipped.float().mean() < 0.65, name
        stats[name] = (area, ratio, flipped)
    dali_area, dali_ratio, dali_flip = stats["dali"]
    ref_area, ref_ratio, ref_flip = stats["reference"]
    assert abs(float(dali_area.mean() - ref_area.mean())) < 0.08
    assert abs(float(dali_ratio.log().mean() - ref_ratio.log().mean())) < 0.06
    assert abs(float(dali_flip.float().mean() - ref_flip.float().mean())) < 0.15


@pytest.mark.parametrize("decode", DECODES)
def test_pad_crop_shifts_the_whole_image_by_at_most_pad_with_zero_borders(
    colours: DatasetMeta, decode: str
) -> None:
    cfg = make_config(
        repeated_aug=3 if decode == "once" else 1, decode=decode, crop="pad_crop", pad=4,
        hflip=0.0, **PLAIN,
    )  # fmt: skip
    borders = set()
    for batch in train_loader(colours, cfg, micro_batches_per_epoch=3).epoch(0):
        black = (to_pixels(batch.images) < 4).all(dim=1)  # (B, H, W): the zero padding
        assert decode_ids(batch.images) == batch.labels.tolist()  # the image itself is intact
        for mask in black:
            rows, cols = mask.all(dim=1), mask.all(dim=0)
            top, bottom = int(rows[:8].sum()), int(rows[-8:].sum())
            left, right = int(cols[:8].sum()), int(cols[-8:].sum())
            assert max(top, bottom, left, right) <= 4 and top * bottom == 0 and left * right == 0
            interior = ~(rows[:, None] | cols[None, :])
            assert not mask[interior].any()  # zeros only in whole border rows and columns
            borders.add((top - bottom, left - right))
    assert len(borders) > 5  # the offsets are drawn, not fixed


def test_colour_jitter_changes_the_colour_of_solid_images(colours: DatasetMeta) -> None:
    def colour_shift(jitter: float) -> float:
        cfg = make_config(color_jitter=jitter, hflip=0.0, **PLAIN)
        batch = next(iter(train_loader(colours, cfg, micro_batches_per_epoch=1).epoch(0)))
        rgb = to_pixels(batch.images).flatten(2).median(dim=2).values
        want = torch.tensor([id_colour(i) for i in batch.labels.tolist()], dtype=rgb.dtype)
        return float((rgb - want).abs().mean())

    assert colour_shift(0.0) < 3.0
    assert colour_shift(0.4) > 8.0


@pytest.mark.parametrize("decode", DECODES)
def test_copies_of_an_image_are_augmented_independently(
    gradients: DatasetMeta, decode: str
) -> None:
    """Every sample here is the same picture: copies differ only by their augmentation draws."""
    cfg = make_config(repeated_aug=3, decode=decode, **PLAIN)
    loader = train_loader(gradients, cfg, micro_batch=32, micro_batches_per_epoch=8)
    areas: dict[int, list[float]] = {}
    for batch in loader.epoch(0):
        area, _, _ = crop_geometry(batch.images)
        for sample, value in zip(batch.samples.tolist(), area.tolist()):
            areas.setdefault(sample, []).append(value)
    triples = torch.tensor([v for v in areas.values() if len(v) == 3])
    assert len(triples) >= 80  # 256 images: 85 samples x 3, one split over two micro-batches
    within = float(triples.var(dim=1).mean())
    overall = float(triples.flatten().var())
    # Independent draws: the spread within an image's copies is the overall spread (ratio ~1);
    # copies sharing one draw would give 0.
    assert within / overall > 0.7


def test_reference_loader_is_endless_with_full_batches(small: DatasetMeta) -> None:
    tars = [tar for tar, _ in small.shard_files("train")]  # 32 images in 4 shards
    loader = ReferenceLoader(tars, make_config(**PLAIN), batch_size=12, num_workers=8, seed=0)
    assert loader.num_workers == 4  # one shard per worker at least, else a worker starves
    stream = iter(loader)
    sizes = [next(stream).images.shape[0] for _ in range(6)]  # 72 images: over two passes
    assert sizes == [12] * 6


# --------------------------------------------------------------------------------------------
# Devices and bad input


def test_gpu_without_cuda_is_a_one_line_user_error() -> None:
    if torch.cuda.is_available():
        assert resolve_backend("gpu") == "gpu"
        return
    with pytest.raises(UserError, match="data.device=cpu") as err:
        resolve_backend("gpu")
    assert "\n" not in str(err.value)


def test_gpu_graph_is_the_same_definition_and_defines_without_cuda(colours: DatasetMeta) -> None:
    """Defining (not building) the device="gpu" graph runs every Python line of the GPU branch."""
    loader = train_loader(colours, make_config(), device=torch.device("cuda", 0))
    loader.backend = "gpu"  # as resolve_backend("gpu") gives where CUDA is present
    graph = loader.serialized_graph()  # defined and serialized; deserializing needs CUDA
    assert b"mixed" in graph and b"gpu" in graph


@pytest.mark.gpu
def test_gpu_pipeline_yields_cuda_batches(colours: DatasetMeta) -> None:
    cfg = make_config()
    cfg.device = "gpu"
    device = torch.device("cuda", 0)
    batches = list(train_loader(colours, cfg, device=device, micro_batches_per_epoch=3).epoch(0))
    assert all(b.images.device == device and b.labels.device == device for b in batches)
    assert all(b.images.shape == (4, 3, SIZE, SIZE) for b in batches)
    evals = list(EvalLoader(colours, cfg, micro_batch=4, rank=0, world_size=1, device=device))
    assert sorted(y for b in evals for y in b.labels.tolist() if y >= 0) == list(range(N_EVAL))


def test_auto_picks_cpu_without_cuda() -> None:
    assert resolve_backend("auto") == ("gpu" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def small(tmp_path: Path) -> DatasetMeta:
    train = [Sample(f"t{i:04d}", colour_image(i), i) for i in range(32)]
    eval_ = [Sample(f"e{i:04d}", colour_image(i), i) for i in range(4)]
    return write_dataset(tmp_path / "small", train, eval_, num_classes=32)


def _shard(meta: DatasetMeta, k: int) -> tuple[Path, Path]:
    return meta.shard_files("train")[k]


def _raises_naming(shard: Path, build: Callable[[], object]) -> None:
    with pytest.raises(ShardError) as err:
        build()
    message = str(err.value)
    assert shard.name in message
    assert "\n" not in message


def test_missing_shard_is_named(small: DatasetMeta) -> None:
    tar, _ = _shard(small, 2)
    tar.unlink()
    _raises_naming(tar, lambda: train_loader(small, make_config(), micro_batches_per_epoch=2))


def test_truncated_shard_is_named(small: DatasetMeta) -> None:
    tar, _ = _shard(small, 1)
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    _raises_naming(tar, lambda: train_loader(small, make_config(), micro_batches_per_epoch=2))


def test_index_that_does_not_match_its_tar_is_named(small: DatasetMeta) -> None:
    tar0, idx0 = _shard(small, 0)
    _, idx1 = _shard(small, 1)
    idx0.write_text(idx1.read_text())  # same sizes, other member names
    _raises_naming(tar0, lambda: train_loader(small, make_config(), micro_batches_per_epoch=2))


def drop_label(meta: DatasetMeta, k: int, key: str) -> Path:
    """Rewrite train shard ``k`` (tar, index and meta.json) without the ``.cls`` of ``key``."""
    tar_path, idx_path = _shard(meta, k)
    with tarfile.open(tar_path) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    buf = io.BytesIO()
    rows: dict[str, list[str]] = {}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for member, payload in members:
            if member.name == f"{key}.cls":
                continue
            stem, ext = member.name.split(".", 1)
            rows.setdefault(stem, []).append(
                f"{ext} {buf.tell() + 512} {len(payload)} {member.name}"
            )
            dst.addfile(member, io.BytesIO(payload))
    tar_path.write_bytes(buf.getvalue())
    idx_path.write_text(
        f"v1.2 {len(rows)}\n" + "\n".join(" ".join(r) for r in rows.values()) + "\n"
    )
    meta.splits["train"]["shards"][k]["bytes"] = tar_path.stat().st_size
    meta_io.save(meta, meta.root)
    return tar_path


def test_sample_without_label_is_named(small: DatasetMeta) -> None:
    tar = drop_label(small, 3, "t0026")
    meta = meta_io.load(small.root)
    _raises_naming(tar, lambda: train_loader(meta, make_config(), micro_batches_per_epoch=2))


def test_corrupt_jpeg_met_while_decoding_is_named(small: DatasetMeta) -> None:
    tar, index = _shard(small, 1)
    fields = index.read_text().splitlines()[1].split()
    jpg = fields.index("jpg")
    offset, length = int(fields[jpg + 1]), int(fields[jpg + 2])
    with open(tar, "r+b") as f:  # same size, same index: only decoding can tell
        f.seek(offset)
        f.write(b"\x00" * length)
    loader = train_loader(small, make_config(), micro_batches_per_epoch=None)
    with pytest.raises(ShardError) as err:
        list(loader.epoch(0))
    assert tar.name in str(err.value)
    assert "\n" not in str(err.value)


def test_shard_truncated_mid_epoch_raises_naming_it_without_hanging(tmp_path: Path) -> None:
    train = [Sample(f"t{i:04d}", colour_image(i, side=64), i) for i in range(96)]
    meta = write_dataset(tmp_path / "d", train, [Sample("e0000", colour_image(0), 0)], 96, 4, 1)
    cfg = make_config(**PLAIN)
    cfg.prefetch, cfg.cache_mb = 1, 0  # read from the tars, not from memory
    loader = train_loader(meta, cfg, micro_batch=2, micro_batches_per_epoch=48)
    last_sample = int(loader.epoch_samples(0)[-1][0])  # read last this epoch
    last = loader.store.shards[int(loader.store.shard_of[last_sample])].tar
    batches = loader.epoch(0)
    next(batches)
    with open(last, "r+b") as f:
        f.truncate(1024)
    with pytest.raises(ShardError) as err:
        for _ in batches:
            pass
    assert last.name in str(err.value)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# RandAugment ops against timm's


@pipeline_def(batch_size=1, num_threads=1, device_id=None, seed=0)
def _each_op_at_level_9(image: np.ndarray):
    """Every op of the suite (identity excluded) applied once at level 9, sign +."""
    data = fn.cast(types.Constant(image, device="cpu", layout="HWC"), dtype=types.UINT8)
    positive = types.Constant(np.array(0, dtype=np.int32), device="cpu")
    level_bin = round(9 * (RA_BINS - 1) / 10)
    return tuple(
        aug(
            data,
            magnitude_bin=signed_bin(level_bin, random_sign=positive),
            num_magnitude_bins=RA_BINS,
            shape=image.shape[:2],
            fill_value=115,
        )
        for aug in timm_increasing_suite()[:-1]
    )


def test_randaugment_ops_match_timms_at_magnitude_9(monkeypatch: pytest.MonkeyPatch) -> None:
    from timm.data import auto_augment as timm_aa

    monkeypatch.setattr(timm_aa, "_randomly_negate", lambda v: v)  # DALI's sign is fixed to +
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    image = np.stack([xx * 7 % 256, yy * 6 + 20, (xx + yy) * 3 + 40], -1).astype(np.uint8)
    image[8:20, 10:24] = (200, 60, 30)
    pipe = _each_op_at_level_9(image)
    pipe.build()
    outputs = [np.asarray(out.as_tensor())[0].astype(float) for out in pipe.run()]
    names = timm_aa._RAND_INCREASING_TRANSFORMS
    assert len(outputs) == len(names) == 15
    # Mean absolute difference in 0..255 units. Pixel-exact ops; enhance ops (float vs PIL's
    # integer arithmetic); warps (DALI bilinear with one fill value vs PIL bicubic with the
    # per-channel mean). DALI's warp direction for a positive magnitude is PIL's negative one,
    # which the random sign makes irrelevant: warps are compared with both signs.
    tolerance = dict.fromkeys(
        ["Invert", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd"], 0.01
    )
    tolerance |= dict.fromkeys(
        ["AutoContrast", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing"], 1.0
    )
    tolerance |= {"SharpnessIncreasing": 1.0}
    warps = ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
    tolerance |= dict.fromkeys(warps, 4.0)
    pil = Image.fromarray(image)
    hparams = {"img_mean": (124, 116, 104)}
    for name, out in zip(names, outputs):
        if name == "Equalize":  # DALI follows OpenCV's histogram formula, not PIL's: not compared
            assert out.shape == image.shape
            continue
        level_fn = timm_aa.LEVEL_TO_ARG[name]
        args = level_fn(9.0, hparams) if level_fn else ()
        candidates = [args, tuple(-a for a in args)] if name in warps else [args]
        errors = [
            np.abs(
                np.asarray(
                    timm_aa.NAME_TO_OP[name](
                        pil, *c, fillcolor=hparams["img_mean"], resample=Image.BICUBIC
                    ),
                    dtype=float,
                )
                - out
            ).mean()
            for c in candidates
        ]
        assert min(errors) < tolerance[name], (name, errors)


# --------------------------------------------------------------------------------------------
# deitlt bench data


def test_bench_data_measures_both_loaders_and_prints_the_ratio_last(capsys) -> None:
    from deitlt_scale.cli import main

    argv = ["bench", "data", "--device", "cpu", "--image-size", "32", "--batch-size", "8",
            "--batches", "3", "--warmup", "1", "--threads", "1", "--prefetch", "3",
            "--source-size", "48", "64"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "DALI prefetch depth 3, 3 timed batches after 1" in lines[0]
    number = r"([0-9]+\.[0-9]+)"
    dali = re.fullmatch(
        rf"dali \(cpu, repeated aug 3, decoded per copy\): {number} images/s", lines[-11]
    )
    once = re.fullmatch(
        rf"dali \(cpu, repeated aug 3, decoded once\): {number} images/s", lines[-10]
    )
    plain = re.fullmatch(rf"dali \(cpu, repeated aug off\): {number} images/s", lines[-9])
    reference = re.fullmatch(
        rf"reference \(DataLoader, 1 workers, PIL \+ timm\): {number} images/s", lines[-8]
    )
    epoch_start = re.fullmatch(
        rf"epoch start \(wait for the first batch, 50 ms simulated step per batch\): {number} s "
        rf"with the pipeline made when the epoch starts, {number} s made ahead during the "
        "previous epoch",
        lines[-7],
    )
    graph = re.fullmatch(
        rf"train graph: {number} s to define \(Python, once per loader\), {number} s per epoch "
        "to deserialize with the epoch's seed and build",
        lines[-6],
    )
    per_copy_ratio = re.fullmatch(
        rf"ratio repeated aug 3, decoded per copy/off: {number}x", lines[-5]
    )
    once_ratio = re.fullmatch(rf"ratio repeated aug 3, decoded once/off: {number}x", lines[-4])
    ahead_ratio = re.fullmatch(rf"ratio epoch start wait ahead/at start: {number}x", lines[-3])
    graph_ratio = re.fullmatch(
        rf"ratio per-epoch pipeline deserialized/defined: {number}x", lines[-2]
    )
    ratio = re.fullmatch(rf"ratio dali/reference: {number}x", lines[-1])
    assert dali and once and plain and reference and epoch_start and ahead_ratio and ratio, lines
    assert per_copy_ratio and once_ratio and graph and graph_ratio, lines
    rates = [float(m.group(1)) for m in (dali, once, plain, reference)]
    assert all(rate > 0 for rate in rates)
    assert float(ratio.group(1)) == pytest.approx(rates[0] / rates[3], abs=0.006)
    assert float(per_copy_ratio.group(1)) == pytest.approx(rates[0] / rates[2], abs=0.006)
    assert float(once_ratio.group(1)) == pytest.approx(rates[1] / rates[2], abs=0.006)
    at_start, ahead = (float(v) for v in epoch_start.groups())
    assert at_start > 0 and ahead > 0
    assert float(ahead_ratio.group(1)) == _ratio_of_printed(ahead, at_start)
    defined, made = (float(v) for v in graph.groups())
    assert defined > 0 and made > 0
    assert float(graph_ratio.group(1)) == _ratio_of_printed(made, defined)


def _ratio_of_printed(a: float, b: float) -> object:
    """``a / b`` within what printing both to 3 decimals (and the ratio to 2) can change."""
    return pytest.approx(a / b, abs=a / b * (0.0005 / a + 0.0005 / b) + 0.006)


# --------------------------------------------------------------------------------------------
# PaCo's two views


@pytest.mark.parametrize("kind", ["cifar", "randcls_sim"])
def test_two_views_are_independent_augmentations_of_each_batch_image(
    colours: DatasetMeta, kind: str
) -> None:
    loader = train_loader(colours, make_config(), views=ContrastViews(kind))
    seen = []
    for batch in loader.epoch(0):
        assert batch.key_images is not None
        assert batch.images.shape == batch.key_images.shape == (4, 3, SIZE, SIZE)
        assert batch.labels.tolist() == batch.samples.tolist()  # the label is the sample id
        assert not torch.allclose(batch.images, batch.key_images)
        seen += batch.labels.tolist()
    assert sorted(seen) == list(range(N_TRAIN))  # every image once per epoch, as two views


def test_two_views_refuse_repeated_augmentation(colours: DatasetMeta) -> None:
    with pytest.raises(UserError, match="data.repeated_aug=3: two-view"):
        train_loader(colours, make_config(repeated_aug=3), views=ContrastViews("cifar"))


def _run_on(image: np.ndarray, op: Callable, samples: int = 16) -> list[np.ndarray]:
    """``op`` applied to ``samples`` copies of the uint8 HWC ``image`` in one DALI batch."""

    @pipeline_def(batch_size=samples, num_threads=1, device_id=None, seed=3)
    def pipe():
        data = fn.external_source(
            source=lambda: [image] * samples, batch=True, dtype=types.UINT8, layout="HWC"
        )
        return op(data)

    p = pipe(enable_conditionals=True)
    p.build()
    (out,) = p.run()
    return [np.asarray(out[i]) for i in range(samples)]


def test_cutout_blacks_out_one_clipped_16_pixel_square_per_image() -> None:
    image = np.full((SIZE, SIZE, 3), 200, dtype=np.uint8)
    corners = set()
    for out in _run_on(image, lambda x: cutout(x, SIZE)):
        black = (out == 0).all(axis=2)
        rows, cols = np.flatnonzero(black.any(axis=1)), np.flatnonzero(black.any(axis=0))
        assert black[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()  # one rectangle
        assert black.sum() == len(rows) * len(cols)
        assert 8 <= len(rows) <= 16 and 8 <= len(cols) <= 16  # 16, clipped at the border
        assert (out[~black] == 200).all()  # nothing else changes
        corners.add((rows[0], cols[0]))
    assert len(corners) > 8  # the centre is drawn per image


def test_grayscale_gives_rec601_luma_and_no_jitter_leaves_the_image_as_it_is() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    luma = image.astype(float) @ np.array([0.299, 0.587, 0.114])
    for out in _run_on(image, lambda x: colour_views(x, 0.0, 0.0, grayscale_p=1.0), 4):
        assert np.abs(out.astype(float) - luma[..., None]).max() <= 1.5
    for out in _run_on(image, lambda x: colour_views(x, 0.0, 0.1, grayscale_p=0.0), 4):
        assert np.abs(out.astype(int) - image.astype(int)).max() <= 1


def test_gaussian_blur_smooths_when_applied_and_not_otherwise() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    outs = _run_on(image, lambda x: gaussian_blur(x, p=0.5), 32)
    unchanged = [o for o in outs if np.array_equal(o, image)]
    blurred = [o for o in outs if not np.array_equal(o, image)]
    assert 4 <= len(unchanged) <= 28  # p = 0.5 per image
    assert all(o.astype(float).std() < 0.9 * image.astype(float).std() for o in blurred)
