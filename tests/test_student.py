"""DeiT students: timm compatibility, every size, the two heads, attention maps."""

from __future__ import annotations

import re

import pytest
import timm
import torch

from deitlt_scale.config import ModelConfig
from deitlt_scale.errors import UserError
from deitlt_scale.models.student import (
    DistilledStudent,
    PlainStudent,
    StudentOutput,
    create_student,
    student_spec,
)

K = 5


def tiny_cfg(**over) -> ModelConfig:
    """A patch-4 student at 32 px: the shape of the CIFAR/digits small variants."""
    base = dict(
        arch="deit_tiny_distilled_patch16_224", patch_size=4, embed_dim=48, depth=2, num_heads=3
    )
    return ModelConfig(**{**base, **over})


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def student() -> DistilledStudent:
    torch.manual_seed(0)
    return create_student(tiny_cfg(), K, 32).eval()


@pytest.mark.parametrize("distilled", [True, False])
def test_timm_create_model_loads_the_student_strictly_with_equal_eval_logits(distilled):
    torch.manual_seed(0)
    cfg = tiny_cfg(distilled=distilled)
    model = create_student(cfg, K, 32).eval()
    name, kwargs = student_spec(cfg, K, 32)
    reference = timm.create_model(name, **kwargs).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_student_is_its_own_timm_model_with_timm_state_dict_keys(student):
    assert student.timm_model is student
    keys = set(student.state_dict())
    assert {"cls_token", "dist_token", "pos_embed", "head.weight", "head_dist.weight"} <= keys
    assert not any(k.startswith("timm_model.") for k in keys)


@pytest.mark.parametrize(
    ("arch", "overrides", "img", "dims"),
    [
        ("deit_tiny_distilled_patch16_224", {}, 64, (192, 12, 3, 16)),
        ("deit_small_distilled_patch16_224", {}, 64, (384, 12, 6, 16)),
        pytest.param(
            "deit_base_distilled_patch16_224", {}, 64, (768, 12, 12, 16), marks=pytest.mark.slow
        ),
        (
            "deit_tiny_distilled_patch16_224",
            {"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3},
            32,
            (96, 4, 3, 4),
        ),
    ],
    ids=["tiny", "small", "base", "tiny-patch4-32px"],
)
def test_every_size_builds_and_runs_forward_and_backward(arch, overrides, img, dims):
    torch.manual_seed(0)
    model = create_student(ModelConfig(arch=arch, **overrides), K, img).train()
    dim, depth, heads, patch = dims
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (
        dim,
        depth,
        heads,
    )
    assert model.patch_embed.patch_size == (patch, patch)
    assert model.pos_embed.shape == (1, (img // patch) ** 2 + 2, dim)
    out = model(images(2, img))
    assert isinstance(out, StudentOutput)
    assert out.cls_logits.shape == out.dist_logits.shape == (2, K)
    (out.cls_logits.sum() + out.dist_logits.sum()).backward()
    for name in ("cls_token", "dist_token", "pos_embed", "patch_embed.proj.weight"):
        assert model.get_parameter(name).grad is not None, name


def test_training_forward_returns_both_heads_and_final_norm_features(student):
    student.train()
    try:
        x = images()
        out = student(x)
        tokens = student.forward_features(x)
    finally:
        student.eval()
    assert torch.equal(out.cls_feat, tokens[:, 0]) and torch.equal(out.dist_feat, tokens[:, 1])
    assert torch.allclose(out.cls_logits, student.head(tokens[:, 0]))
    assert torch.allclose(out.dist_logits, student.head_dist(tokens[:, 1]))


def test_eval_forward_is_the_mean_of_the_two_heads(student):
    x = images()
    with torch.no_grad():
        heads = student.forward_heads(x)
        mean = student(x)
    assert isinstance(heads, StudentOutput)
    assert torch.allclose(mean, (heads.cls_logits + heads.dist_logits) / 2)


def test_plain_vit_has_only_a_cls_token_and_head():
    model = create_student(tiny_cfg(distilled=False), K, 32)
    assert isinstance(model, PlainStudent)
    assert "dist_token" not in model.state_dict() and "head_dist.weight" not in model.state_dict()
    assert model.pos_embed.shape[1] == (32 // 4) ** 2 + 1
    out = model.train()(images())
    assert out.dist_logits is None and out.dist_feat is None
    with torch.no_grad():
        assert torch.equal(model.eval()(images()), model.forward_heads(images()).cls_logits)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}


def test_plain_baseline_of_a_distilled_arch_is_the_same_size_deit():
    name, kwargs = student_spec(ModelConfig(distilled=False), 100, 224)
    assert name == "deit_base_patch16_224"
    assert (kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"]) == (768, 12, 12)


def test_attention_maps_are_per_block_row_stochastic(student):
    x = images(3)
    with torch.no_grad():
        maps = student.attention_maps(x)
    tokens = (32 // 4) ** 2 + 2
    assert len(maps) == len(student.blocks)
    for m in maps:
        assert m.shape == (3, 3, tokens, tokens)
        assert (m >= 0).all()
        assert torch.allclose(m.sum(-1), torch.ones(3, 3, tokens), atol=1e-5)


def test_explicit_attention_path_equals_the_fused_path(student):
    assert all(blk.attn.fused_attn for blk in student.blocks), "training path must be fused SDPA"
    x = images(3)
    with torch.no_grad():
        fused = student.forward_heads(x)
        explicit, _ = student.forward_explicit(x)
    for a, b in zip(fused, explicit):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_block_tokens_are_the_unnormed_outputs_of_every_block(student):
    x = images()
    with torch.no_grad():
        per_block = student.block_tokens(x)
        tokens = student.forward_features(x)
    assert len(per_block) == len(student.blocks)
    assert per_block[0].shape == (2, (32 // 4) ** 2 + 2, 48)
    assert torch.allclose(student.norm(per_block[-1]), tokens, atol=1e-6)


def test_drop_path_rates_rise_linearly_over_depth_to_the_configured_rate():
    model = create_student(tiny_cfg(depth=4, drop_path=0.1), K, 32)
    rates = [getattr(blk.drop_path1, "drop_prob", 0.0) for blk in model.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 4).tolist())


def test_no_weight_decay_names_the_tokens_and_position_embedding(student):
    assert student.no_weight_decay() == {"pos_embed", "cls_token", "dist_token"}


def test_overrides_replace_the_arch_defaults_and_image_size_comes_from_data():
    name, kwargs = student_spec(tiny_cfg(drop_path=0.05), 7, 32)
    assert name == "deit_tiny_distilled_patch16_224"
    assert kwargs == {
        "img_size": 32,
        "patch_size": 4,
        "embed_dim": 48,
        "depth": 2,
        "num_heads": 3,
        "num_classes": 7,
        "drop_path_rate": 0.05,
    }


@pytest.mark.parametrize(
    ("cfg", "img", "fragment"),
    [
        (ModelConfig(arch="resnet32"), 224, "model.arch='resnet32'"),
        (tiny_cfg(patch_size=5), 32, "multiple of model.patch_size=5"),
        (tiny_cfg(embed_dim=50), 32, "model.embed_dim=50"),
        (tiny_cfg(depth=0), 32, "model.depth must be >= 1"),
        (ModelConfig(arch="vit_tiny_patch16_224"), 224, "model.distilled"),
    ],
)
def test_bad_model_config_is_a_user_error_naming_the_key(cfg, img, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        student_spec(cfg, K, img)
