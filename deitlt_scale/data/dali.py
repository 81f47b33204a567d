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
   zeros around it (:func:`pad_crop`, torchvision's ``RandomCrop(size, padding=pad)``);
4. horizontal flip with p=``hflip`` (``fn.flip``), before RandAugment as in timm (ShearY is
   anchored at the left column, so flipping after it would not give the same distribution);
   then, when ``augment.color_jitter`` > 0 (the L-D-SAM ImageNet-LT/iNat teachers), brightness,
   contrast and saturation factors drawn from ``[1 - c, 1 + c]`` (``fn.color_twist``; one fixed
   order where torchvision permutes the three);
5. RandAugment ``rand-m9-mstd0.5-inc1`` re-built from DALI's ``auto_aug`` parts
   (:func:`timm_rand_augment`; see docs/data_pipeline.md for the mapping and what differs);
6. normalise (``fn.crop_mirror_normalize``, NCHW float32);
7. random erasing, pixel mode, one box (:func:`random_erase`), on the normalised image.

With ``TrainGraph.views`` (PaCo teachers) steps 2-7 are replaced by one decode and two
augmentations of each image, :func:`query_view` and :func:`key_view`, stacked as
``(E, 2, 3, S, S)``.

The train labels are read once by the loader (``sample_store``). The eval graph reads the shards
with ``fn.readers.webdataset``; its labels are the ASCII decimal ``.cls`` bytes padded with zeros
to :data:`LABEL_BYTES`, parsed to int64 on the torch side (``loader.parse_labels``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations as aa
from nvidia.dali.auto_aug import auto_augment
from nvidia.dali.auto_aug.core import Policy, _Augmentation, augmentation, select, signed_bin
from nvidia.dali.pipeline import do_not_convert

LABEL_BYTES = 20  # an int64 has at most 19 decimal digits; zero bytes pad the rest
READER_NAME = "reader"

# RandAugment magnitudes live on timm's scale [0, 10] ("m9" = 9/10 of each op's range). DALI picks
# one of ``RA_BINS`` evenly spaced levels, so timm's Gaussian magnitude noise is quantised to 0.1.
RA_LEVEL_MAX = 10.0
RA_BINS = 101
RA_OP_PROB = 0.5  # timm applies each drawn op with this probability
RE_ATTEMPTS = 10  # timm RandomErasing tries this many boxes before giving up
RE_AREA = (0.02, 1.0 / 3.0)
RE_LOG_ASPECT = (math.log(0.3), math.log(1.0 / 0.3))


@dataclass(frozen=True)
class ContrastViews:
    """PaCo's two views of each image (query, key), decoded once and augmented twice; see
    :func:`query_view` and :func:`key_view`. ``kind`` is the published ``--aug`` setting."""

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
# RandAugment "rand-m9-mstd0.5-inc1"


class _Precomputed(_Augmentation):
    """An augmentation whose per-bin parameter table is computed outside DALI's AutoGraph.

    The table (``2 x RA_BINS`` entries for a randomly negated op) is plain numpy work with no data
    dependent branches; traced by AutoGraph it costs seconds per graph definition.
    """

    @do_not_convert
    def _get_param(self, magnitude_bin, num_magnitude_bins, param_device):
        return super()._get_param(magnitude_bin, num_magnitude_bins, param_device)


# The level -> parameter maps below are timm's ``*_level_to_arg`` functions (level in [0, 10],
# already signed where timm negates at random). DALI evaluates them once per magnitude bin while
# defining the graph; ``do_not_convert`` keeps its AutoGraph from tracing them (seconds per build).


@do_not_convert
def _rotate_degrees(level: float) -> np.ndarray:
    return np.float32(3.0 * level)


@do_not_convert
def _shear_x(level: float) -> list[float]:
    return [0.03 * level, 0.0]


@do_not_convert
def _shear_y(level: float) -> list[float]:
    return [0.0, 0.03 * level]


@do_not_convert
def _translate_x(level: float) -> list[float]:
    return [0.045 * level, 0.0]  # fraction of the width, timm translate_pct 0.45


@do_not_convert
def _translate_y(level: float) -> list[float]:
    return [0.0, 0.045 * level]


@do_not_convert
def _enhance_factor(level: float) -> np.ndarray:
    return np.float32(max(0.1, 1.0 + 0.09 * level))


@do_not_convert
def _sharpen_kernel(level: float) -> np.ndarray:
    # PIL ImageEnhance.Sharpness blends with the SMOOTH filter; factor = 1 + 0.09 * level.
    return aa.sharpness_kernel(0.09 * level)


@do_not_convert
def _posterize_mask(level: float) -> np.ndarray:
    # timm PosterizeIncreasing keeps 4 - int(0.4 * level) most significant bits (0 bits: black,
    # as Pillow < 13 returns for posterize(img, 0)).
    bits = 4 - int(level * 0.4)
    return np.array(256 - 2 ** (8 - bits), dtype=np.uint8)


@do_not_convert
def _solarize_threshold(level: float) -> np.ndarray:
    return np.array(256 - min(256, int(level * 25.6)), dtype=np.int32)


@do_not_convert
def _solarize_add_shift(level: float) -> np.ndarray:
    return np.array(min(128, int(level * 11.0)), dtype=np.uint8)


# DALI's suite still calls the deprecated ``fn.experimental`` names; these are the same ops.
@augmentation(name="equalize")
def _equalize(data, _):
    return fn.equalize(data)


@augmentation(param_device="auto", name="sharpness")
def _sharpness(data, kernel):
    return fn.filter(data, kernel)


def _scaled(aug, mag_to_param=None, negate: bool = False):
    """``aug`` with magnitudes on timm's level scale [0, 10] and a precomputed parameter table."""
    return aug.augmentation(
        mag_range=(0.0, RA_LEVEL_MAX),
        randomly_negate=negate,
        mag_to_param=mag_to_param,
        augmentation_cls=_Precomputed,
    )


def timm_increasing_suite() -> list:
    """timm's 15 ``_RAND_INCREASING_TRANSFORMS`` as DALI augmentations, in timm's order.

    Each ``mag_to_param`` is the corresponding timm ``*_level_to_arg`` (the sign of randomly
    negated ops is drawn by DALI). The last entry, identity, is the "op not applied" outcome.
    """
    return [
        aa.auto_contrast,
        _equalize,
        aa.invert,
        _scaled(aa.rotate, _rotate_degrees, negate=True),
        _scaled(aa.posterize, _posterize_mask),
        _scaled(aa.solarize, _solarize_threshold),
        _scaled(aa.solarize_add, _solarize_add_shift),
        _scaled(aa.color, _enhance_factor, negate=True),
        _scaled(aa.contrast, _enhance_factor, negate=True),
        _scaled(aa.brightness, _enhance_factor, negate=True),
        _scaled(_sharpness, _sharpen_kernel, negate=True),
        _scaled(aa.shear_x, _shear_x, negate=True),
        _scaled(aa.shear_y, _shear_y, negate=True),
        _scaled(aa.translate_x, _translate_x, negate=True),
        _scaled(aa.translate_y, _translate_y, negate=True),
        aa.identity,
    ]


def timm_rand_augment(
    images,
    num_ops: int,
    magnitude: float,
    magnitude_std: float,
    image_size: int,
    fill_value: int,
):
    """RandAugment as timm runs it: ``num_ops`` ops drawn with replacement, each applied with p=0.5
    at a magnitude drawn per op from N(magnitude, magnitude_std) clipped to [0, 10].

    ``images``: uint8 HWC, all ``image_size`` square. Returns the same layout and type.
    """
    suite = timm_increasing_suite()
    identity = len(suite) - 1
    shape = (num_ops,)
    # Index ``identity`` stands for "drawn op skipped" (probability 1 - RA_OP_PROB).
    probs = [RA_OP_PROB / identity] * identity + [1.0 - RA_OP_PROB]
    op_idx = fn.random.choice(len(suite), p=probs, shape=shape)
    level = fn.random.normal(mean=float(magnitude), stddev=float(magnitude_std), shape=shape)
    level = dmath.clamp(level, 0.0, RA_LEVEL_MAX)
    bins_per_level = (RA_BINS - 1) / RA_LEVEL_MAX
    mag_bin = fn.cast(dmath.floor(level * bins_per_level + 0.5), dtype=types.INT32)
    # Signs drawn once for all levels, before the conditional split (as DALI's own RandAugment).
    signed = signed_bin(mag_bin, shape=shape)
    for k in range(num_ops):
        images = select(
            suite,
            op_idx[k],
            images,
            magnitude_bin=signed[k],
            num_magnitude_bins=RA_BINS,
            shape=(image_size, image_size),
            fill_value=fill_value,
        )
    return images


# --------------------------------------------------------------------------------------------
# Random erasing


def _first_valid_box(image_size: int):
    """Per sample (h, w) of the first of RE_ATTEMPTS timm boxes that fits ((0, 0) if none does)."""
    area = float(image_size * image_size)
    shape = (RE_ATTEMPTS,)
    target = fn.random.uniform(range=RE_AREA, shape=shape) * area
    aspect = dmath.exp(fn.random.uniform(range=RE_LOG_ASPECT, shape=shape))
    h = dmath.floor(dmath.sqrt(target * aspect) + 0.5)
    w = dmath.floor(dmath.sqrt(target / aspect) + 0.5)
    fits = (h < image_size) & (w < image_size)
    # Score attempt i as (RE_ATTEMPTS - i) where it fits: the maximum marks the first fitting one.
    rank = types.Constant(np.arange(RE_ATTEMPTS, 0, -1, dtype=np.float32))
    score = fits * rank
    best = fn.reductions.max(score)
    chosen = (score == best) & fits
    h_sel = fn.reductions.sum(h * chosen)
    w_sel = fn.reductions.sum(w * chosen)
    return h_sel, w_sel


def random_erase(images, image_size: int):
    """Erase one box with per-pixel N(0, 1) values (timm ``RandomErasing`` mode ``pixel``).

    ``images``: float CHW normalised. The box area is U(0.02, 1/3) of the image, its aspect ratio
    log-uniform in [0.3, 1/0.3], sides rounded, its corner uniform over the positions where it
    fits. timm erases nothing when none of its ten attempts fits; each attempt fits with
    probability ~0.99, so that case (< 1e-16) is not special-cased: the box is then one pixel.
    Noise is drawn only for the box and placed by a padded slice, which is several times cheaper
    than drawing a full image of noise.
    """
    h, w = _first_valid_box(image_size)
    h, w = dmath.max(h, 1.0), dmath.max(w, 1.0)
    top = dmath.floor(fn.random.uniform(range=(0.0, 1.0)) * (image_size - h + 1))
    left = dmath.floor(fn.random.uniform(range=(0.0, 1.0)) * (image_size - w + 1))
    channels = h * 0.0 + 3.0  # a per-sample 3: stack takes data nodes only
    patch = fn.random.normal(
        shape=fn.cast(fn.stack(channels, h, w), dtype=types.INT32), device=images.device
    )
    # Slicing the (3, h, w) patch from (-top, -left) with zero padding gives an image-sized canvas
    # holding the noise at the box and zeros elsewhere.
    canvas = fn.slice(
        patch,
        start=fn.cast(fn.stack(-top, -left), dtype=types.INT32),
        shape=(image_size, image_size),
        axes=(1, 2),
        out_of_bounds_policy="pad",
        fill_values=0.0,
    )
    outside = fn.erase(
        images, anchor=fn.stack(top, left), shape=fn.stack(h, w), axes=(1, 2), fill_value=0.0
    )
    return outside + canvas


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


def _normalise_args(mean, std) -> dict:
    return {
        "mean": [255.0 * m for m in mean],
        "std": [255.0 * s for s in std],
        "dtype": types.FLOAT,
        "output_layout": "CHW",
    }


ENCODED_NAME = "encoded"  # the external source of the train graph


def pad_crop(images, size: int, pad: int):
    """torchvision's ``RandomCrop(size, padding=pad)`` (the CIFAR teachers' weak crop) on
    size x size images: a size x size window whose top-left corner is drawn uniformly from
    ``[-pad, pad]`` in each axis, zeros outside the image."""
    offsets = list(range(-pad, pad + 1))
    start = fn.stack(fn.random.uniform(values=offsets), fn.random.uniform(values=offsets))
    return fn.slice(
        images,
        start,
        np.array([size, size], dtype=np.float32),
        axis_names="HW",
        normalized_anchor=False,
        normalized_shape=False,
        out_of_bounds_policy="pad",
        fill_values=0,
    )


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
    images = fn.crop_mirror_normalize(images, **_normalise_args(graph.mean, graph.std))
    if graph.random_erasing > 0:
        erase = fn.random.coin_flip(probability=graph.random_erasing, dtype=types.BOOL)
        if erase:
            images = random_erase(images, size)
    return images


# --------------------------------------------------------------------------------------------
# PaCo's two views (PaCo/LT ``paco_cifar.py`` / ``paco_lt.py``, ``--aug cifar100`` / ``randcls_sim``)

AUTOAUG_TRANSLATE = 150.0 / 331.0  # AutoAugment's largest shift, as a fraction of the side
AUTOAUG_FILL = 128  # the policy's fill colour (128, 128, 128)
CUTOUT_LENGTH = 16
VIEW_JITTER = 0.4  # brightness, contrast and saturation strength of the views' colour jitter
BLUR_SIGMA = (0.1, 2.0)


def cifar10_policy() -> Policy:
    """AutoAugment's CIFAR-10 policy (DALI's ``reduced_cifar10``: the paper's 25 sub-policies),
    translating by up to 150/331 of the side; its equalize and sharpness run as the non-deprecated
    ops of :func:`timm_increasing_suite`."""
    published = auto_augment.get_reduced_cifar10_policy(
        use_shape=True, max_translate_rel=AUTOAUG_TRANSLATE
    )
    sharpness = _sharpness.augmentation(
        mag_range=(0.1, 1.9), randomly_negate=False, mag_to_param=aa.sharpness_kernel_shifted
    )
    replace = {"equalize": _equalize, "sharpness": sharpness}
    return Policy(
        name="Cifar10Policy",
        num_magnitude_bins=published.num_magnitude_bins,
        sub_policies=[
            [(replace.get(aug.name, aug), p, mag) for aug, p, mag in sub]
            for sub in published.sub_policies
        ],
    )


def _random_apply(p: float):
    """1 with probability ``p``, else 0 (per sample, float): gates a factor without a split."""
    return fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)


def _jitter(strength: float, applied):
    """A factor from U[max(0, 1 - s), 1 + s] where ``applied`` is 1, exactly 1 elsewhere."""
    drawn = fn.random.uniform(range=[max(0.0, 1.0 - strength), 1.0 + strength])
    return applied * (drawn - 1.0) + 1.0


def colour_views(images, jitter_p: float, hue: float, grayscale_p: float):
    """torchvision's ``RandomApply([ColorJitter(.4, .4, .4, hue)], p=jitter_p)`` followed by
    ``RandomGrayscale(p=grayscale_p)``, as one ``fn.color_twist`` per sample: every factor is 1
    where the jitter is not applied, and the saturation is 0 where the image turns grey (the same
    Rec. 601 luma as torchvision's grayscale). torchvision applies the four jitters in a random
    order; here their order is fixed."""
    applied = _random_apply(jitter_p)
    grey = _random_apply(grayscale_p)
    factors = {
        "brightness": _jitter(VIEW_JITTER, applied),
        "contrast": _jitter(VIEW_JITTER, applied),
        "saturation": _jitter(VIEW_JITTER, applied) * (1.0 - grey),
    }
    if hue > 0:
        factors["hue"] = fn.random.uniform(range=[-360.0 * hue, 360.0 * hue]) * applied
    return fn.color_twist(images, **factors)


def gaussian_blur(images, p: float = 0.5):
    """MoCo v2's ``GaussianBlur(sigma ~ U[0.1, 2])`` applied with probability ``p``."""
    if fn.random.coin_flip(probability=p, dtype=types.BOOL):
        images = fn.gaussian_blur(images, sigma=fn.random.uniform(range=list(BLUR_SIGMA)))
    return images


def cutout(images, size: int, length: int = CUTOUT_LENGTH):
    """PaCo's ``Cutout(n_holes=1, length)`` on uint8 HWC ``size`` x ``size`` images: a
    ``length`` square centred on a uniformly drawn pixel, clipped to the image, set to 0."""
    centre = [float(v) for v in range(size)]
    cy, cx = fn.random.uniform(values=centre), fn.random.uniform(values=centre)
    half = float(length // 2)
    y0, y1 = dmath.clamp(cy - half, 0.0, size), dmath.clamp(cy + half, 0.0, size)
    x0, x1 = dmath.clamp(cx - half, 0.0, size), dmath.clamp(cx + half, 0.0, size)
    return fn.erase(
        images,
        anchor=fn.stack(y0, x0),
        shape=fn.stack(y1 - y0, x1 - x0),
        axis_names="HW",
        fill_value=0,
    )


def _resized_crop(images, size: int, scale: tuple[float, float]):
    return fn.random_resized_crop(
        images,
        size=(size, size),
        random_area=list(scale),
        random_aspect_ratio=[3.0 / 4.0, 4.0 / 3.0],
        num_attempts=10,
        interp_type=types.INTERP_CUBIC,
        antialias=True,
    )


def _flip(images):
    return fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5), vertical=0)


def query_view(images, graph: TrainGraph):
    """The query view, on decoded uint8 HWC images; normalised CHW float32 out.

    * ``cifar``: RandomCrop(S, padding ``graph.pad``), flip, AutoAugment's CIFAR-10 policy (DALI's
      ``reduced_cifar10``: the same 25 sub-policies; translation up to 150/331 of the side, fill
      128), Cutout(16);
    * ``randcls_sim``: RandomResizedCrop(S, scale 0.08-1), flip, ColorJitter(.4, .4, .4, 0)
      always, RandAugment ``n{randaug_n} m{randaug_m} mstd0.5`` (:func:`timm_rand_augment`).
    """
    views, size = graph.views, graph.image_size
    if views.kind == "cifar":
        images = fn.resize(
            images, size=(size, size), interp_type=types.INTERP_CUBIC, antialias=True
        )
        images = _flip(pad_crop(images, size, graph.pad))
        images = auto_augment.apply_auto_augment(
            cifar10_policy(), images, shape=(size, size), fill_value=AUTOAUG_FILL
        )
        images = cutout(images, size)
    else:
        images = _flip(_resized_crop(images, size, (0.08, 1.0)))
        images = colour_views(images, jitter_p=1.0, hue=0.0, grayscale_p=0.0)
        fill = round(255.0 * sum(graph.mean) / 3.0)
        images = timm_rand_augment(
            images, views.randaug_n, views.randaug_m, graph.randaugment_mstd, size, fill
        )
    return fn.crop_mirror_normalize(images, **_normalise_args(graph.mean, graph.std))


def key_view(images, graph: TrainGraph):
    """The key view (MoCo v2's "sim" augmentation), on decoded uint8 HWC images:

    * ``cifar``: RandomResizedCrop(S, scale 0.2-1), flip, ColorJitter(.4, .4, .4, .1) with
      p=0.8, grayscale p=0.2, Gaussian blur p=0.5;
    * ``randcls_sim``: RandomResizedCrop(S, scale 0.08-1), ColorJitter(.4, .4, .4, 0) always,
      grayscale p=0.2, Gaussian blur p=0.5, flip.
    """
    size = graph.image_size
    if graph.views.kind == "cifar":
        images = _flip(_resized_crop(images, size, (0.2, 1.0)))
        images = gaussian_blur(colour_views(images, jitter_p=0.8, hue=0.1, grayscale_p=0.2))
    else:
        images = _resized_crop(images, size, (0.08, 1.0))
        images = colour_views(images, jitter_p=1.0, hue=0.0, grayscale_p=0.2)
        images = _flip(gaussian_blur(images))
    return fn.crop_mirror_normalize(images, **_normalise_args(graph.mean, graph.std))


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
        **_normalise_args(graph.mean, graph.std),
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
