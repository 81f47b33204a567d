"""DALI graphs for training (the DeiT strong recipe) and evaluation, one definition per device.

The same Python function builds the CPU graph (``device="cpu"``: CPU decoder and ops, no device id)
and the GPU graph (``device="gpu"``: ``mixed`` nvJPEG decoder, GPU ops); only the decoder backend and
where the labels end up differ. The functions live in a real module because DALI reads their source
to convert ``if`` statements on data into conditional splits (``enable_conditionals=True``).

Train graph (METHOD.md 4.2, timm ``transforms_imagenet_train``, in this order):

1. the encoded ``<key>.jpg`` bytes of the micro-batch's samples, fed to ``fn.external_source``
   by the loader (``loader.TrainLoader``: the order is the reference sampler's,
   :mod:`deitlt_scale.data.epoch_plan`); a batch may hold fewer samples than ``batch_size``;
2. ``repeats == 1`` (no repeated augmentation, or ``data.repeated_aug_decode=per_copy``, where the
   loader feeds each copy's bytes): decoding fused with the crop of step 3
   (``fn.decoders.image_random_crop`` decodes only the crop window). ``repeats > 1``
   (``repeated_aug_decode=once``): decode each sample once, then run steps 3-7 ``repeats`` times,
   each with its own operators and so its own random draws, and stack the copies per sample as
   ``(repeats, 3, S, S)``;
3. RandomResizedCrop (area ``scale``, aspect ``ratio``, ten attempts) to ``image_size`` x
   ``image_size`` with cubic interpolation; or, for the CIFAR teachers' weak recipe
   (``augment.crop=pad_crop``), the image at ``image_size`` shifted by up to ``pad`` pixels with
   zeros around it (:func:`~deitlt_scale.data.dali_augment.pad_crop`, torchvision's
   ``RandomCrop(size, padding=pad)``);
4. horizontal flip with p=``hflip`` (``fn.flip``), before RandAugment as in timm (ShearY is
   anchored at the left column, so flipping after it would not give the same distribution);
   then, when ``augment.color_jitter`` > 0 (the L-D-SAM ImageNet-LT/iNat teachers), brightness,
   contrast and saturation factors drawn from ``[1 - c, 1 + c]`` (``fn.color_twist``; one fixed
   order where torchvision permutes the three);
5. RandAugment ``rand-m9-mstd0.5-inc1`` re-built from DALI's ``auto_aug`` parts
   (:func:`~deitlt_scale.data.dali_augment.timm_rand_augment`; see docs/data_pipeline.md for the
   mapping and what differs);
6. normalise (``fn.crop_mirror_normalize``, NCHW float32);
7. random erasing, pixel mode, one box (:func:`~deitlt_scale.data.dali_augment.random_erase`),
   on the normalised image.

With ``TrainGraph.views`` (PaCo teachers) steps 2-7 are replaced by one decode and two
augmentations of each image, :func:`~deitlt_scale.data.dali_views.query_view` and
:func:`~deitlt_scale.data.dali_views.key_view`, stacked as ``(E, 2, 3, S, S)``.

The train labels are read once by the loader (``sample_store``). The eval graph reads the shards
with ``fn.readers.webdataset``; its labels are the ASCII decimal ``.cls`` bytes padded with zeros
to :data:`LABEL_BYTES`, parsed to int64 on the torch side (``loader.parse_labels``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nvidia.dali import fn, pipeline_def, types

from deitlt_scale.data.dali_augment import (
    normalise_args,
    pad_crop,
    random_erase,
    timm_rand_augment,
)
from deitlt_scale.data.dali_views import key_view, query_view

LABEL_BYTES = 20  # an int64 has at most 19 decimal digits; zero bytes pad the rest
READER_NAME = "reader"


@dataclass(frozen=True)
class ContrastViews:
    """PaCo's two views of each image (query, key), decoded once and augmented twice; see
    :func:`~deitlt_scale.data.dali_views.query_view` and
    :func:`~deitlt_scale.data.dali_views.key_view`. ``kind`` is the published ``--aug`` setting."""

    kind: str  # "cifar" | "randcls_sim"
    randaug_n: int = 2  # randcls_sim: RandAugment ops of the query view
    randaug_m: float = 10.0  # and their magnitude (timm's level scale, mstd 0.5)


@dataclass(frozen=True)
class TrainGraph:
    """Static settings of the train graph (everything but the shard list and seeds)."""

    image_size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float
    randaugment_ops: int
    randaugment_magnitude: float
    randaugment_mstd: float
    random_erasing: float
    mean: tuple[float, float, float]  # in [0, 1] units
    std: tuple[float, float, float]
    repeats: int = 1  # augmented copies of each decoded sample
    crop: str = "random_resized"  # or "pad_crop": zero-pad ``pad`` px, random size x size crop
    pad: int = 4
    color_jitter: float = 0.0  # brightness/contrast/saturation factors in [1 - c, 1 + c]
    views: ContrastViews | None = None  # two views per image (PaCo) instead of the recipe above


@dataclass(frozen=True)
class EvalGraph:
    image_size: int
    resize_shorter: int  # floor(image_size / eval_crop_pct), as timm
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# --------------------------------------------------------------------------------------------
# Pipelines


def _read(
    tars: Sequence[str],
    indexes: Sequence[str],
    shard_id: int,
    num_shards: int,
):
    """The rank's contiguous range of the samples, in stored order (eval)."""
    jpegs, cls = fn.readers.webdataset(
        paths=list(tars),
        index_paths=list(indexes),
        ext=["jpg", "cls"],
        missing_component_behavior="error",
        shard_id=shard_id,
        num_shards=num_shards,
        # Plain reads: a shard truncated under a memory map would kill the process with SIGBUS.
        dont_use_mmap=True,
        name=READER_NAME,
    )
    labels = fn.pad(cls, axes=(0,), shape=(LABEL_BYTES,), fill_value=0)
    return jpegs, labels


ENCODED_NAME = "encoded"  # the external source of the train graph


def _decoder_device(device: str) -> str:
    return "mixed" if device == "gpu" else "cpu"


def _augment(images, graph: TrainGraph, decoded: bool, device: str):
    """Steps 3-7 of the module docstring on uint8 HWC ``images`` (``decoded=False``: encoded
    bytes, decoded fused with the crop). Each call creates its own operators, hence its own
    random draws."""
    size = graph.image_size
    crop = {
        "random_area": list(graph.scale),
        "random_aspect_ratio": list(graph.ratio),
        "num_attempts": 10,
    }
    if graph.crop == "pad_crop":
        if not decoded:
            images = fn.decoders.image(
                images, device=_decoder_device(device), output_type=types.RGB
            )
        # At the native size (CIFAR: 32 px) the resize leaves the image as it is.
        images = fn.resize(
            images, size=(size, size), interp_type=types.INTERP_CUBIC, antialias=True
        )
        images = pad_crop(images, size, graph.pad)
    elif decoded:
        images = fn.random_resized_crop(
            images, size=(size, size), interp_type=types.INTERP_CUBIC, antialias=True, **crop
        )
    else:
        images = fn.decoders.image_random_crop(
            images, device=_decoder_device(device), output_type=types.RGB, **crop
        )
        images = fn.resize(
            images, size=(size, size), interp_type=types.INTERP_CUBIC, antialias=True
        )
    images = fn.flip(images, horizontal=fn.random.coin_flip(probability=graph.hflip), vertical=0)
    if graph.color_jitter > 0:
        c = graph.color_jitter
        images = fn.color_twist(
            images,
            brightness=fn.random.uniform(range=[max(0.0, 1 - c), 1 + c]),
            contrast=fn.random.uniform(range=[max(0.0, 1 - c), 1 + c]),
            saturation=fn.random.uniform(range=[max(0.0, 1 - c), 1 + c]),
        )
    if graph.randaugment_ops > 0:
        fill = round(255.0 * sum(graph.mean) / 3.0)  # DALI warps fill one value for all channels
        images = timm_rand_augment(
            images,
            graph.randaugment_ops,
            graph.randaugment_magnitude,
            graph.randaugment_mstd,
            size,
            fill,
        )
    images = fn.crop_mirror_normalize(images, **normalise_args(graph.mean, graph.std))
    if graph.random_erasing > 0:
        erase = fn.random.coin_flip(probability=graph.random_erasing, dtype=types.BOOL)
        if erase:
            images = random_erase(images, size)
    return images


@pipeline_def(enable_conditionals=True)
def train_pipeline(graph: TrainGraph, device: str):
    """Outputs ``images``: (E, 3, S, S) float32 for ``repeats == 1``, else (E, repeats, 3, S, S),
    and (E, 2, 3, S, S) (query, key) with ``graph.views``, for the E encoded samples fed to the
    input named :data:`ENCODED_NAME` (a list of 1-D uint8 arrays per batch, ``feed_input``).

    The graph has no callback so that it serializes: the loader defines it once and deserializes
    it per epoch with the epoch's seed (``loader.TrainLoader``)."""
    jpegs = fn.external_source(batch=True, dtype=types.UINT8, ndim=1, name=ENCODED_NAME)
    if graph.views is not None:
        images = fn.decoders.image(jpegs, device=_decoder_device(device), output_type=types.RGB)
        return fn.stack(query_view(images, graph), key_view(images, graph))
    if graph.repeats == 1:
        return _augment(jpegs, graph, decoded=False, device=device)
    images = fn.decoders.image(jpegs, device=_decoder_device(device), output_type=types.RGB)
    return fn.stack(*[_augment(images, graph, True, device) for _ in range(graph.repeats)])


@pipeline_def
def eval_pipeline(
    tars: Sequence[str],
    indexes: Sequence[str],
    shard_id: int,
    num_shards: int,
    graph: EvalGraph,
    device: str,
):
    """Resize the shorter side, centre crop, normalise. Reads the rank's range in stored order;
    batch positions past its end hold whatever the reader reads next (the loader labels them -1)."""
    jpegs, labels = _read(tars, indexes, shard_id, num_shards)
    images = fn.decoders.image(jpegs, device=_decoder_device(device), output_type=types.RGB)
    images = fn.resize(
        images, resize_shorter=graph.resize_shorter, interp_type=types.INTERP_CUBIC, antialias=True
    )
    images = fn.crop_mirror_normalize(
        images,
        crop=(graph.image_size, graph.image_size),
        crop_pos_x=0.5,
        crop_pos_y=0.5,
        **normalise_args(graph.mean, graph.std),
    )
    if device == "gpu":
        labels = labels.gpu()
    return images, labels


def shard_range(num_samples: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """The [begin, end) sample positions DALI's reader assigns to ``shard_id`` (its formula)."""
    return (
        num_samples * shard_id // num_shards,
        num_samples * (shard_id + 1) // num_shards,
    )
