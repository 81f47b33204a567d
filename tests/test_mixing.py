"""Mixup / CutMix on device tensors (METHOD.md 4.3)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from deitlt_scale.config import MixupConfig
from deitlt_scale.data.mixing import Mixer

K = 10
B = 8


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose every pixel holds the sample index, so provenance is readable after mixing."""
    images = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, 16, 24).clone()
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    return images, labels


def only(kind: str, **kw: object) -> MixupConfig:
    """A config that always mixes with one kind ("mixup" or "cutmix")."""
    cfg = MixupConfig(prob=1.0, switch_prob=1.0 if kind == "cutmix" else 0.0)
    return dataclasses.replace(cfg, **kw)


def seeds_with(mixer: Mixer, kind: str, count: int = 5) -> list[int]:
    found = [
        s
        for s in range(200)
        if (mixer.draw(s, 16, 24).box is not None) == (kind == "cutmix")
        and mixer.draw(s, 16, 24).lam < 1
    ]
    return found[:count]


def test_targets_rows_sum_to_one_for_both_kinds() -> None:
    images, labels = batch()
    for kind in ("mixup", "cutmix"):
        mixer = Mixer(only(kind), K)
        for seed in range(5):
            _, targets = mixer(images, labels, seed)
            assert targets.shape == (B, K) and targets.dtype == torch.float32
            torch.testing.assert_close(targets.sum(dim=1), torch.ones(B))


def test_smoothing_gives_the_paper_on_and_off_values() -> None:
    targets = Mixer(MixupConfig(label_smoothing=0.1), K).smooth_only(torch.tensor([0, 7]))
    off, on = 0.1 / K, 1 - 0.1 + 0.1 / K
    expected = torch.full((2, K), off)
    expected[0, 0] = expected[1, 7] = on
    torch.testing.assert_close(targets, expected)


def test_mixup_blends_sample_i_with_sample_b_minus_1_minus_i() -> None:
    images, labels = batch()
    mixer = Mixer(only("mixup"), K)
    for seed in seeds_with(mixer, "mixup"):
        lam = mixer.draw(seed, 16, 24).lam
        mixed, targets = mixer(images, labels, seed)
        for i in range(B):
            partner = B - 1 - i
            expected = lam * i + (1 - lam) * partner
            torch.testing.assert_close(mixed[i], torch.full_like(mixed[i], expected))
        smooth = mixer.smooth_only(labels)
        torch.testing.assert_close(targets, lam * smooth + (1 - lam) * smooth.flip(0))


def test_cutmix_lambda_equals_the_unpasted_area() -> None:
    images, labels = batch()
    mixer = Mixer(only("cutmix"), K)
    seeds = seeds_with(mixer, "cutmix")
    assert seeds
    for seed in seeds:
        params = mixer.draw(seed, 16, 24)
        mixed, targets = mixer(images, labels, seed)
        for i in range(B):
            own = (mixed[i, 0] == i).float().mean().item()
            pasted = (mixed[i, 0] == B - 1 - i).float().mean().item()
            assert own == pytest.approx(params.lam)
            assert pasted == pytest.approx(1 - params.lam)
        smooth = mixer.smooth_only(labels)
        torch.testing.assert_close(targets, params.lam * smooth + (1 - params.lam) * smooth.flip(0))


def test_cutmix_box_is_the_same_for_the_whole_batch() -> None:
    images, labels = batch()
    mixer = Mixer(only("cutmix"), K)
    seed = seeds_with(mixer, "cutmix")[0]
    mixed, _ = mixer(images, labels, seed)
    changed = mixed != images
    assert changed.any()
    assert all(torch.equal(changed[0], changed[i]) for i in range(B))


def test_disabled_when_prob_is_zero() -> None:
    images, labels = batch()
    mixer = Mixer(MixupConfig(prob=0.0), K)
    assert not mixer.enabled
    mixed, targets = mixer(images, labels, seed=123)
    assert torch.equal(mixed, images)
    torch.testing.assert_close(targets, mixer.smooth_only(labels))


def test_disabled_when_both_alphas_are_zero() -> None:
    assert not Mixer(MixupConfig(mixup_alpha=0.0, cutmix_alpha=0.0), K).enabled


def test_same_seed_same_mix_and_seeds_differ() -> None:
    images, labels = batch()
    mixer = Mixer(MixupConfig(), K)
    a = mixer(images, labels, seed=7)
    b = mixer(images, labels, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    draws = {(mixer.draw(s, 16, 24).lam, mixer.draw(s, 16, 24).box) for s in range(20)}
    assert len(draws) == 20


def test_does_not_touch_global_random_state() -> None:
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)
    images, labels = batch()
    Mixer(MixupConfig(), K)(images, labels, seed=3)
    assert np.random.rand() == expected


def test_switch_and_lambda_statistics_follow_the_config() -> None:
    mixer = Mixer(MixupConfig(), K)  # mixup 0.8, cutmix 1.0, switch 0.5
    draws = [mixer.draw(s, 224, 224) for s in range(4000)]
    cutmix = [d for d in draws if d.box is not None]
    mixup = [d.lam for d in draws if d.box is None]
    assert abs(len(cutmix) / len(draws) - 0.5) < 0.04
    # Beta(0.8, 0.8) has mean 1/2 and variance 1/(4 * 2.6) ~ 0.096.
    assert abs(np.mean(mixup) - 0.5) < 0.03
    assert abs(np.var(mixup) - 1 / 10.4) < 0.015
    # Boxes clipped at the border paste less than asked: the corrected lambda is as timm's.
    from timm.data.mixup import cutmix_bbox_and_lam

    np.random.seed(0)
    timm_lams = [
        cutmix_bbox_and_lam((224, 224), np.random.beta(1.0, 1.0))[1] for _ in range(len(cutmix))
    ]
    assert abs(np.mean([d.lam for d in cutmix]) - np.mean(timm_lams)) < 0.03


def test_partial_prob_leaves_some_batches_unmixed() -> None:
    mixer = Mixer(MixupConfig(prob=0.3), K)
    mixed = np.mean([mixer.draw(s, 32, 32).lam < 1 for s in range(2000)])
    assert abs(mixed - 0.3) < 0.04


def test_odd_batch_is_rejected() -> None:
    images, labels = batch()
    with pytest.raises(ValueError, match="even"):
        Mixer(MixupConfig(), K)(images[:7], labels[:7], seed=0)


def test_keeps_dtype_and_device() -> None:
    images, labels = batch()
    mixed, targets = Mixer(only("mixup"), K)(images.to(torch.bfloat16), labels, seed=1)
    assert mixed.dtype == torch.bfloat16 and mixed.device == images.device
    assert targets.device == labels.device


@pytest.mark.gpu
def test_runs_on_cuda_tensors() -> None:
    images, labels = batch()
    mixer = Mixer(MixupConfig(), K)
    for seed in range(4):
        mixed, targets = mixer(images.cuda(), labels.cuda(), seed)
        cpu_mixed, cpu_targets = mixer(images, labels, seed)
        torch.testing.assert_close(mixed.cpu(), cpu_mixed)
        torch.testing.assert_close(targets.cpu(), cpu_targets)
