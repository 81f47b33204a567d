"""PaCo's two views of each image in DALI (PaCo/LT ``paco_cifar.py`` / ``paco_lt.py``, ``--aug
cifar100`` / ``randcls_sim``): :func:`query_view` and :func:`key_view`, which the train graph of
:mod:`deitlt_scale.data.dali` runs on each decoded image when ``TrainGraph.views`` is set. DALI
reads the source of these functions to convert their ``if`` statements on data
(:func:`gaussian_blur`), so they live in a real module.
"""

from __future__ import annotations

from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations as aa
from nvidia.dali.auto_aug import auto_augment
from nvidia.dali.auto_aug.core import Policy

from deitlt_scale.data.dali_augment import (
    equalize,
    normalise_args,
    pad_crop,
    sharpness,
    timm_rand_augment,
)

AUTOAUG_TRANSLATE = 150.0 / 331.0  # AutoAugment's largest shift, as a fraction of the side
AUTOAUG_FILL = 128  # the policy's fill colour (128, 128, 128)
CUTOUT_LENGTH = 16
VIEW_JITTER = 0.4  # brightness, contrast and saturation strength of the views' colour jitter
BLUR_SIGMA = (0.1, 2.0)


def cifar10_policy() -> Policy:
    """AutoAugment's CIFAR-10 policy (DALI's ``reduced_cifar10``: the paper's 25 sub-policies),
    translating by up to 150/331 of the side; its equalize and sharpness run as the non-deprecated
    ops of :func:`~deitlt_scale.data.dali_augment.timm_increasing_suite`."""
    published = auto_augment.get_reduced_cifar10_policy(
        use_shape=True, max_translate_rel=AUTOAUG_TRANSLATE
    )
    sharp = sharpness.augmentation(
        mag_range=(0.1, 1.9), randomly_negate=False, mag_to_param=aa.sharpness_kernel_shifted
    )
    replace = {"equalize": equalize, "sharpness": sharp}
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


def query_view(images, graph):
    """The query view, on decoded uint8 HWC images; normalised CHW float32 out. ``graph`` is the
    :class:`~deitlt_scale.data.dali.TrainGraph` (its ``views`` set).

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
    return fn.crop_mirror_normalize(images, **normalise_args(graph.mean, graph.std))


def key_view(images, graph):
    """The key view (MoCo v2's "sim" augmentation), on decoded uint8 HWC images (``graph``: the
    :class:`~deitlt_scale.data.dali.TrainGraph`, its ``views`` set):

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
    return fn.crop_mirror_normalize(images, **normalise_args(graph.mean, graph.std))
