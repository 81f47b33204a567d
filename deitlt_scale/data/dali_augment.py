"""DALI operators of the train recipes, shared by the DeiT graph (:mod:`deitlt_scale.data.dali`)
and PaCo's two views (:mod:`deitlt_scale.data.dali_views`): RandAugment ``rand-m9-mstd0.5-inc1``
re-built from DALI's ``auto_aug`` parts (:func:`timm_rand_augment`), timm's random erasing
(:func:`random_erase`), the CIFAR teachers' padded crop (:func:`pad_crop`) and the arguments of
``fn.crop_mirror_normalize`` (:func:`normalise_args`). Like the graphs, they live in a real
module because DALI reads the source of the functions it converts (``enable_conditionals``).
"""

from __future__ import annotations

import math

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations as aa
from nvidia.dali.auto_aug.core import _Augmentation, augmentation, select, signed_bin
from nvidia.dali.pipeline import do_not_convert

# RandAugment magnitudes live on timm's scale [0, 10] ("m9" = 9/10 of each op's range). DALI picks
# one of ``RA_BINS`` evenly spaced levels, so timm's Gaussian magnitude noise is quantised to 0.1.
RA_LEVEL_MAX = 10.0
RA_BINS = 101
RA_OP_PROB = 0.5  # timm applies each drawn op with this probability
RE_ATTEMPTS = 10  # timm RandomErasing tries this many boxes before giving up
RE_AREA = (0.02, 1.0 / 3.0)
RE_LOG_ASPECT = (math.log(0.3), math.log(1.0 / 0.3))


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
def equalize(data, _):
    return fn.equalize(data)


@augmentation(param_device="auto", name="sharpness")
def sharpness(data, kernel):
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
        equalize,
        aa.invert,
        _scaled(aa.rotate, _rotate_degrees, negate=True),
        _scaled(aa.posterize, _posterize_mask),
        _scaled(aa.solarize, _solarize_threshold),
        _scaled(aa.solarize_add, _solarize_add_shift),
        _scaled(aa.color, _enhance_factor, negate=True),
        _scaled(aa.contrast, _enhance_factor, negate=True),
        _scaled(aa.brightness, _enhance_factor, negate=True),
        _scaled(sharpness, _sharpen_kernel, negate=True),
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
# Crop and normalisation


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


def normalise_args(mean, std) -> dict:
    return {
        "mean": [255.0 * m for m in mean],
        "std": [255.0 * s for s in std],
        "dtype": types.FLOAT,
        "output_layout": "CHW",
    }
