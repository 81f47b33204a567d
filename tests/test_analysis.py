"""`deitlt analyze`: the diagnostics' math on constructed inputs with known answers, the plots,
the model views, MLflow logging, and the whole command on a tiny prepared dataset."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deitlt_scale.analysis import plots
from deitlt_scale.analysis.accuracy import PerClassAccuracy, group_bands
from deitlt_scale.analysis.attention import (
    AttentionDistance,
    attention_rollout,
    mean_attention_distance,
    patch_distances,
    rollout_maps,
)
from deitlt_scale.analysis.collect import WHAT, ClassQuota, SampleImages
from deitlt_scale.analysis.features import cosine_distance, group_means, pca_rank
from deitlt_scale.analysis.loading import Subject, as_student, load_subject
from deitlt_scale.analysis.probe import StudentProbe, ViTProbe, as_probe, explicit_attention
from deitlt_scale.analysis.run import Options, analyze, output_files, parse_what
from deitlt_scale.analysis.teacher import TeacherEntropy, entropy, max_entropy, mixed
from deitlt_scale.config import MixupConfig, ModelConfig, TrackingConfig
from deitlt_scale.data.longtail import groups_by_count, groups_by_index
from deitlt_scale.data.meta import DatasetMeta
from deitlt_scale.errors import UserError

SIDE = 4  # patch grid side of the constructed attention maps
PATCH = 8  # pixels per patch
PREFIX = 2  # CLS + DIST


def _identity_attention(batch: int = 2, heads: int = 3, tokens: int = PREFIX + SIDE * SIDE):
    return torch.eye(tokens).expand(batch, heads, tokens, tokens).clone()


def _uniform_attention(batch: int = 2, heads: int = 3, tokens: int = PREFIX + SIDE * SIDE):
    return torch.full((batch, heads, tokens, tokens), 1.0 / tokens)


def _grid_mean_distance(side: int, patch: float) -> float:
    """Mean Euclidean distance between two cells of a side x side grid drawn independently."""
    cells = list(itertools.product(range(side), repeat=2))
    total = sum(math.dist(a, b) for a in cells for b in cells)
    return patch * total / len(cells) ** 2


# --------------------------------------------------------------------------------------------
# Mean attention distance


def test_identity_attention_has_zero_mean_distance():
    d = mean_attention_distance(_identity_attention(), PREFIX, PATCH)
    assert d.shape == (2, 3)
    assert torch.all(d == 0)


def test_uniform_attention_gives_the_mean_distance_between_grid_cells():
    d = mean_attention_distance(_uniform_attention(), PREFIX, PATCH)
    assert torch.allclose(d, torch.full((2, 3), _grid_mean_distance(SIDE, PATCH)), atol=1e-4)


def test_attention_on_prefix_tokens_carries_no_distance():
    # Every patch query gives 0.9 to CLS and 0.1 to the patch right below it (or itself in the
    # last row): only the patch part counts, renormalised, so each query moves one patch or none.
    t = PREFIX + SIDE * SIDE
    attn = torch.zeros(1, 1, t, t)
    attn[..., 0] = 0.9
    for q in range(SIDE * SIDE):
        below = q + SIDE if q + SIDE < SIDE * SIDE else q
        attn[0, 0, PREFIX + q, PREFIX + below] += 0.1
    expected = PATCH * (SIDE - 1) / SIDE  # all rows but the last move one patch
    assert mean_attention_distance(attn, PREFIX, PATCH).item() == pytest.approx(expected)


def test_patch_distances_are_in_pixels_between_centres():
    d = patch_distances(3, patch_size=16)
    assert d[0, 1] == 16  # horizontal neighbours
    assert d[0, 3] == 16  # vertical neighbours
    assert d[0, 8] == pytest.approx(16 * math.sqrt(8))  # opposite corners


def test_distance_accumulator_averages_over_images_per_block_and_head():
    acc = AttentionDistance(PREFIX, PATCH)
    acc.update([_identity_attention(batch=1), _uniform_attention(batch=1)])
    acc.update([_uniform_attention(batch=3), _uniform_attention(batch=3)])
    result = acc.compute()
    uniform = _grid_mean_distance(SIDE, PATCH)
    assert result.shape == (2, 3)
    assert torch.allclose(result[0], torch.full((3,), 3 * uniform / 4), atol=1e-4)
    assert torch.allclose(result[1], torch.full((3,), uniform), atol=1e-4)
    assert acc.images == 4


def test_non_square_token_count_is_rejected():
    with pytest.raises(ValueError, match="square"):
        mean_attention_distance(_uniform_attention(tokens=PREFIX + 15), PREFIX, PATCH)


# --------------------------------------------------------------------------------------------
# Attention rollout


def test_rollout_of_identity_attention_is_the_identity():
    rollout = attention_rollout([_identity_attention(), _identity_attention()])
    assert torch.allclose(rollout, torch.eye(rollout.shape[-1]).expand_as(rollout))


def test_rollout_of_one_uniform_block_averages_it_with_the_residual():
    t = PREFIX + SIDE * SIDE
    rollout = attention_rollout([_uniform_attention()])
    expected = 0.5 * torch.full((t, t), 1.0 / t) + 0.5 * torch.eye(t)
    assert torch.allclose(rollout[0], expected, atol=1e-6)


def test_rollout_composes_later_blocks_on_the_left():
    # Block 1: every token reads token 1; block 2: every token reads token 0. With the residual:
    # A1 = [[.5, .5], [0, 1]], A2 = [[1, 0], [.5, .5]]; rollout = A2 @ A1 (A1 @ A2 differs).
    first = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    second = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    rollout = attention_rollout([first, second])
    assert torch.allclose(rollout[0], torch.tensor([[0.5, 0.5], [0.25, 0.75]]))


def test_rollout_rows_sum_to_one():
    gen = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 3, 18, 18, generator=gen).softmax(-1) for _ in range(4)]
    assert torch.allclose(attention_rollout(maps).sum(-1), torch.ones(2, 18), atol=1e-5)


def test_rollout_maps_read_the_cls_and_dist_rows_over_the_patch_grid():
    t = PREFIX + SIDE * SIDE
    rollout = torch.zeros(1, t, t)
    rollout[0, 0, PREFIX + 5] = 1.0  # CLS draws on patch (1, 1)
    rollout[0, 1, PREFIX + 2] = 1.0  # DIST draws on patch (0, 2)
    cls_map = rollout_maps(rollout, 0, PREFIX)
    dist_map = rollout_maps(rollout, 1, PREFIX)
    assert cls_map.shape == (1, SIDE, SIDE)
    assert cls_map[0, 1, 1] == 1 and cls_map.sum() == 1
    assert dist_map[0, 0, 2] == 1 and dist_map.sum() == 1


# --------------------------------------------------------------------------------------------
# Features


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_rank_r_features_have_rank_r(rank):
    gen = torch.Generator().manual_seed(rank)
    basis = torch.linalg.qr(torch.randn(48, rank, generator=gen))[0].T  # orthonormal rows
    features = torch.randn(300, rank, generator=gen) @ basis + 5.0  # offset: PCA centres it
    assert pca_rank(features) == rank


def test_rank_counts_components_up_to_99_percent_of_the_variance():
    gen = torch.Generator().manual_seed(0)
    z = torch.linalg.qr(torch.randn(2000, 3, generator=gen))[0] * math.sqrt(2000)  # white
    assert pca_rank(z * torch.tensor([0.9, 0.095, 0.005]).sqrt()) == 2  # 0.995 >= 0.99
    assert pca_rank(z * torch.tensor([0.5, 0.48, 0.02]).sqrt()) == 3  # 0.98 < 0.99


def test_constant_features_have_rank_zero():
    assert pca_rank(torch.ones(10, 4)) == 0


def test_cosine_distance_of_same_orthogonal_and_opposite_vectors():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    assert torch.allclose(cosine_distance(a, b), torch.tensor([0.0, 1.0, 2.0]))


def test_group_means_are_unweighted_over_classes_and_skip_nan():
    means = group_means([1.0, 0.0, 0.5, float("nan"), 0.2], [0, 0, 1, 1, 2], ("h", "m", "t"))
    assert means == {"h": 0.5, "m": 0.5, "t": pytest.approx(0.2)}


# --------------------------------------------------------------------------------------------
# Teacher entropy and per-class accuracy


def test_entropy_of_uniform_logits_is_log_k():
    assert torch.allclose(entropy(torch.zeros(3, 10)), torch.full((3,), math.log(10)))
    assert max_entropy(10) == pytest.approx(math.log(10))


def test_entropy_of_a_confident_prediction_is_near_zero():
    logits = torch.tensor([[50.0, 0.0, 0.0, 0.0]])
    assert entropy(logits).item() < 1e-6


def test_mixed_images_follow_the_trainer_mixer_and_drop_an_odd_last_image():
    from deitlt_scale.data.mixing import Mixer

    images = torch.randn(5, 3, 8, 8)
    labels = torch.arange(5)
    mixer = Mixer(MixupConfig(mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0), 5)
    (out,) = list(mixed([(images, labels)], mixer, seed=3))
    expected, _ = mixer(images[:4], labels[:4], 3)
    assert out.shape == (4, 3, 8, 8)
    assert torch.equal(out, expected)


def test_teacher_entropy_is_kept_per_view():
    teacher = torch.nn.Linear(4, 10)
    with torch.no_grad():
        teacher.weight.zero_()
        teacher.bias.zero_()
    collected = TeacherEntropy(teacher)
    collected.update("in_distribution", torch.randn(3, 4))
    collected.update("ood", torch.randn(2, 4))
    values = collected.compute()
    assert values["in_distribution"].shape == (3,) and values["ood"].shape == (2,)
    assert np.allclose(values["ood"], math.log(10))


def test_per_class_accuracy_scores_cls_dist_and_mean_logits_separately():
    acc = PerClassAccuracy(3)
    labels = torch.tensor([0, 0, 1, 2])
    cls_logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [5.0, 0, 0], [0, 0, 5.0]])
    dist_logits = torch.tensor([[0, 1.0, 0], [0, 1.0, 0], [0, 9.0, 0], [0, 9.0, 0]])
    acc.update(cls_logits, dist_logits, labels)
    result = acc.compute()
    assert result["cls"].tolist() == [1.0, 0.0, 1.0]
    assert result["dist"].tolist() == [0.0, 1.0, 0.0]
    # mean logits: class 0 rows -> [2.5, .5, 0] right; class 1 -> [2.5, 4.5, 0] right;
    # class 2 -> [0, 4.5, 2.5] wrong.
    assert result["mean"].tolist() == [1.0, 1.0, 0.0]


def test_classes_without_eval_images_have_no_accuracy():
    acc = PerClassAccuracy(3)
    acc.update(torch.eye(3)[:1], None, torch.tensor([0]))
    assert np.isnan(acc.compute()["cls"][2])


def test_group_bands_cover_their_counts_without_overlap():
    counts = [500, 300, 90, 40, 12, 5]
    bands = group_bands(counts, groups_by_count(counts))
    head, mid, tail = bands
    assert head[0] <= 300 and head[1] >= 500
    assert mid[0] <= 40 and mid[1] >= 90
    assert tail[0] <= 5 and tail[1] >= 12
    assert tail[1] <= mid[0] and mid[1] <= head[0]


def test_a_group_without_classes_has_no_band():
    counts = [500, 300, 5]
    assert group_bands(counts, groups_by_count(counts))[1] is None


# --------------------------------------------------------------------------------------------
# Image selection


def test_class_quota_keeps_a_few_images_per_class_and_never_padding():
    quota = ClassQuota(3, per_class=2)
    first = quota.select(torch.tensor([0, 0, 0, 1, -1]))
    second = quota.select(torch.tensor([1, 1, 2, 2, 2]))
    assert first.tolist() == [True, True, False, True, False]
    assert second.tolist() == [True, False, True, True, False]
    assert quota.full()


def test_sample_images_spread_over_the_chosen_classes():
    samples = SampleImages(classes=[7, 8, 9], count=4)
    labels = torch.tensor([7, 7, 7, 1, 8, 8, 8, 9])
    samples.update(torch.randn(8, 3, 4, 4), labels)
    assert samples.labels == [7, 7, 8, 8]  # at most ceil(4 / 3) = 2 per class


# --------------------------------------------------------------------------------------------
# Plots


def _check_png(path: Path) -> None:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100


PLOTS = {
    "distance": lambda: plots.plot_attention_distance(
        {"a": np.random.rand(4, 3) * 20, "b": np.random.rand(4, 3) * 20}, 32
    ),
    "rollout": lambda: plots.plot_rollout(
        np.random.rand(2, 16, 16, 3), {"CLS": np.random.rand(2, 16, 16)}, ["one", "two"]
    ),
    "divergence": lambda: plots.plot_divergence(
        [(0, 0.1), (10, 0.3)], {"head": 0.2, "mid": 0.3, "tail": 0.4}, "m"
    ),
    "divergence without history": lambda: plots.plot_divergence(
        None, {"head": 0.2, "mid": 0.3, "tail": 0.4}, "m"
    ),
    "rank": lambda: plots.plot_rank({"a DIST": [3, 5, 4], "a CLS": [2, 2, 3]}, 0.99, 40),
    "entropy": lambda: plots.plot_entropy(
        {"in_distribution": np.random.rand(20), "ood": np.random.rand(20) * 2}, 10
    ),
    "per-class": lambda: plots.plot_per_class(
        [100, 50, 10],
        {"cls": np.array([1.0, 0.5, 0.0]), "dist": np.array([0.5, 0.5, 0.5])},
        group_bands([100, 50, 10], [0, 1, 2]),
        ("head", "mid", "tail"),
    ),
}


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_every_plot_is_a_png_whose_axes_all_have_titles(name, tmp_path):
    fig = PLOTS[name]()
    saved = plots.save_figure(fig, tmp_path / "plot.png")
    _check_png(tmp_path / "plot.png")
    assert saved["title"]
    assert saved["axes"] and all(saved["axes"])
    for ax in fig.axes:
        assert ax.get_xlabel() or not ax.get_xticks().size  # image panels carry no ticks


# --------------------------------------------------------------------------------------------
# Model views


def _tiny_student(distilled: bool = True, seed: int = 0):
    from deitlt_scale.models.student import create_student

    torch.manual_seed(seed)
    cfg = ModelConfig(
        arch="deit_tiny_distilled_patch16_224",
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        drop_path=0.0,
        distilled=distilled,
    )
    return create_student(cfg, 10, 16).eval()


def _timm_copy(student):
    import timm

    from deitlt_scale.models.student import student_spec

    cfg = ModelConfig(
        arch="deit_tiny_distilled_patch16_224",
        patch_size=4,
        embed_dim=32,
        depth=len(student.blocks),
        num_heads=2,
        drop_path=0.0,
        distilled=student.distilled,
    )
    name, kwargs = student_spec(cfg, 10, 16)
    model = timm.create_model(name, **kwargs)
    model.load_state_dict(student.state_dict())
    return model.eval()


def test_students_are_read_through_their_own_analysis_methods():
    assert isinstance(as_probe(_tiny_student()), StudentProbe)


def test_timm_view_reproduces_the_models_logits_and_fused_attention():
    model = _timm_copy(_tiny_student())
    probe = ViTProbe(model)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out = probe.trace(x, attentions=True, tokens=True)
        assert torch.allclose((out.cls_logits + out.dist_logits) / 2, model(x), atol=1e-5)
        # Block 1's explicit softmax, applied to v, gives the fused attention output.
        block = model.blocks[0]
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        inp = block.norm1(h)
        b, t, _ = inp.shape
        v = block.attn.qkv(inp).reshape(b, t, 3, 2, 16).permute(2, 0, 3, 1, 4)[2]
        manual = (out.attentions[0] @ v).transpose(1, 2).reshape(b, t, 32)
        assert torch.allclose(block.attn.proj(manual), block.attn(inp), atol=1e-5)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 2, 18, 18)
    assert torch.allclose(out.attentions[1].sum(-1), torch.ones(3, 2, 18), atol=1e-5)
    assert out.tokens[-1].shape == (3, 18, 32)


def test_timm_view_and_student_view_agree_on_the_same_weights():
    student = _tiny_student()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        mine = ViTProbe(_timm_copy(student)).trace(x, attentions=True, tokens=True)
        theirs = StudentProbe(student).trace(x, attentions=True, tokens=True)
    for a, b in zip(mine.attentions, theirs.attentions):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(mine.tokens, theirs.tokens):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(mine.dist_feat, theirs.dist_feat, atol=1e-5)


def test_explicit_attention_refuses_modules_without_qkv():
    with pytest.raises(UserError, match="cannot read attention"):
        explicit_attention(torch.nn.Linear(4, 4), torch.randn(1, 2, 4))


@pytest.mark.parametrize("distilled", [True, False])
def test_a_plain_timm_deit_becomes_a_student_with_the_same_outputs(distilled):
    from deitlt_scale.models.student import Student

    model = _timm_copy(_tiny_student(distilled))
    student = as_student(model)
    x = torch.randn(2, 3, 16, 16)
    assert isinstance(student, Student)
    with torch.no_grad():
        assert torch.allclose(student(x), model(x), atol=1e-5)


def _write_export(model, directory: Path, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) -> Path:
    """The layout `deitlt export` writes: model.safetensors + timm's config.json."""
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    directory.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    size = model.patch_embed.img_size[0]
    data = {"input_size": (3, size, size), "mean": mean, "std": std, "crop_pct": 1.0}
    save_config_for_hf(model, str(directory / "config.json"), data_config=data)
    return directory


def test_an_export_directory_loads_as_a_student_with_its_preprocessing(tmp_path):
    student = _tiny_student()
    export = _write_export(_timm_copy(student), tmp_path / "export")
    subject = load_subject(export, torch.device("cpu"))
    x = torch.randn(2, 3, 16, 16)
    assert isinstance(subject.probe, StudentProbe)
    assert (subject.image_size, subject.num_classes) == (16, 10)
    assert subject.mean == (0.5, 0.5, 0.5) and subject.std == (0.25, 0.25, 0.25)
    assert subject.eval_crop_pct == 1.0 and subject.run_dir is None
    with torch.no_grad():
        assert torch.allclose(subject.probe.model(x), student(x), atol=1e-5)


def test_a_directory_that_is_neither_export_nor_run_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="neither an export directory"):
        load_subject(tmp_path, torch.device("cpu"))


def test_a_checkpoint_tag_for_an_export_is_a_user_error(tmp_path):
    export = _write_export(_timm_copy(_tiny_student()), tmp_path / "export")
    with pytest.raises(UserError, match="checkpoint tag"):
        load_subject(export, torch.device("cpu"), checkpoint="best")


# --------------------------------------------------------------------------------------------
# The whole analysis on constructed tensors


def _meta(counts: list[int]) -> DatasetMeta:
    k = len(counts)
    boundaries = (3, 7)
    return DatasetMeta(
        dataset="constructed",
        num_classes=k,
        train_counts=counts,
        eval_counts=[4] * k,
        class_map=list(range(k)),
        class_names=[str(c) for c in range(k)],
        groups={"paper": groups_by_index(k, boundaries), "count": groups_by_count(counts)},
        boundaries=boundaries,
        imbalance_factor=counts[0] / counts[-1],
        splits={"train": {"num_samples": sum(counts)}, "eval": {"num_samples": 4 * k}},
    )


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _subject(model, name: str) -> Subject:
    return Subject(
        name=name,
        path=Path(name),
        probe=as_probe(model),
        image_size=16,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        num_classes=10,
    )


def test_parse_what_rejects_unknown_analyses():
    assert parse_what("rank, distance,rank") == ("rank", "distance")
    with pytest.raises(UserError, match="bogus"):
        parse_what("rank,bogus")


def test_analyze_writes_every_plot_and_its_numbers(tmp_path):
    from deitlt_scale.models.teachers import create_teacher_arch

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(4)
    batches = [
        (torch.randn(8, 3, 16, 16, generator=gen), labels[i : i + 8]) for i in range(0, 40, 8)
    ]
    teacher = create_teacher_arch("resnet32", 10).eval()
    ood = [torch.randn(6, 3, 16, 16, generator=gen) for _ in range(10)]
    history = [(0, 0.99), (10, 0.9), (20, 0.7)]
    summary = analyze(
        _subject(_tiny_student(), "deitlt"),
        _meta([120, 86, 61, 44, 31, 22, 16, 11, 8, 6]),
        batches,
        tmp_path,
        Options(images=30, rollout_images=3, progress=False),
        compare=_subject(_tiny_student(distilled=False, seed=1), "vit"),
        teacher=teacher,
        ood_images=ood,
        history=history,
    )
    assert sorted(summary["outputs"]) == sorted(WHAT) and summary["skipped"] == {}
    assert summary["images"] == 30  # 3 per class
    for path in output_files(tmp_path, summary):
        assert path.is_file()
        if path.suffix == ".png":
            _check_png(path)
    saved = json.loads((tmp_path / "summary.json").read_text())
    for entry in saved["outputs"].values():
        assert entry["title"] and entry["axes"] and all(entry["axes"])

    rows = _read_csv(tmp_path / "attention_distance.csv")
    assert {r["model"] for r in rows} == {"deitlt", "vit"} and len(rows) == 2 * 2 * 2
    assert all(0 < float(r["distance_px"]) < 16 * math.sqrt(2) for r in rows)
    ranks = json.loads((tmp_path / "rank.json").read_text())["ranks"]
    assert set(ranks) == {"deitlt CLS", "deitlt DIST", "vit CLS"}
    assert all(1 <= r <= 8 for series in ranks.values() for r in series)  # 9 tail images
    divergence = json.loads((tmp_path / "divergence.json").read_text())
    assert divergence["history"] == [
        [0, pytest.approx(0.01)],
        [10, pytest.approx(0.1)],
        [20, pytest.approx(0.3)],
    ]
    assert set(divergence["per_group"]) == {"head", "mid", "tail"}
    entropy_info = json.loads((tmp_path / "entropy.json").read_text())
    assert entropy_info["images"] == {"in_distribution": 30, "ood": 30}
    rollout_info = json.loads((tmp_path / "rollout.json").read_text())
    assert [img["label"] for img in rollout_info["images"]] == [7, 8, 9]
    assert np.asarray(rollout_info["images"][0]["DIST"]).shape == (4, 4)
    per_class = _read_csv(tmp_path / "per_class.csv")
    assert [int(r["eval_images"]) for r in per_class] == [3] * 10
    assert {"acc_cls", "acc_dist", "acc_mean"} <= set(per_class[0])


def test_a_plain_vit_skips_the_divergence_and_shows_cls_rollout_only(tmp_path):
    labels = torch.arange(10).repeat(2)
    summary = analyze(
        _subject(_tiny_student(distilled=False), "vit"),
        _meta([120, 86, 61, 44, 31, 22, 16, 11, 8, 6]),
        [(torch.randn(20, 3, 16, 16), labels)],
        tmp_path,
        Options(what=("divergence", "rollout", "entropy"), progress=False),
    )
    assert summary["skipped"]["divergence"] == "the model has no DIST token"
    assert "teacher" in summary["skipped"]["entropy"]
    assert summary["outputs"]["rollout"]["axes"][1] == "CLS rollout"
    assert "DIST" not in json.loads((tmp_path / "rollout.json").read_text())["images"][0]


# --------------------------------------------------------------------------------------------
# MLflow


@pytest.mark.slow
def test_outputs_and_the_tracked_cosine_go_through_the_linked_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from deitlt_scale.analysis.tracked import COSINE_METRIC, open_tracker

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.create_experiment("analysis", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    for step, value in ((20, 0.5), (10, 0.8)):
        client.log_metric(run_id, COSINE_METRIC, value, step=step)
    (run_dir / "mlflow-run-id").write_text(run_id + "\n")
    plot = tmp_path / "rank.png"
    plot.write_bytes(b"png bytes")

    tracker = open_tracker(run_id, TrackingConfig(), run_dir)
    assert tracker is not None
    assert tracker.history(COSINE_METRIC) == [(10, 0.8), (20, 0.5)]
    tracker.log_files([plot])
    tracker.log_metrics({"analysis/x": 0.25, "analysis/nan": float("nan")})
    assert [a.path for a in client.list_artifacts(run_id, "analysis")] == ["analysis/rank.png"]
    assert client.get_run(run_id).data.metrics == {COSINE_METRIC: 0.5, "analysis/x": 0.25}


def test_a_run_without_its_mlflow_store_is_not_logged_and_gets_no_new_store(tmp_path, capsys):
    from deitlt_scale.analysis.tracked import open_tracker

    assert open_tracker(None, TrackingConfig(), tmp_path) is None
    assert open_tracker("abc123", TrackingConfig(), tmp_path) is None
    assert "not logging" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


# --------------------------------------------------------------------------------------------
# The command


def test_the_command_rejects_an_unknown_analysis_with_a_one_line_error(tmp_path, capsys):
    from deitlt_scale.cli import main

    code = main(["analyze", str(tmp_path), "--out", str(tmp_path / "o"), "--what", "bogus"])
    err = capsys.readouterr().err
    assert code == 2 and "bogus" in err and len(err.strip().splitlines()) == 1


def test_the_command_and_the_analysis_agree_on_the_analyses():
    from deitlt_scale.commands import analyze as command

    assert command.WHAT == WHAT


@pytest.mark.slow
def test_the_command_plots_everything_for_an_export_on_prepared_digits(tmp_path, capsys):
    from deitlt_scale.cli import main
    from deitlt_scale.data.prepare import prepare_dataset
    from deitlt_scale.models.teacher_file import TeacherInfo, save_teacher
    from deitlt_scale.models.teachers import create_teacher_arch

    data = tmp_path / "digits"
    prepare_dataset("digits-lt", out=data, progress=False)
    export = _write_export(_timm_copy(_tiny_student()), tmp_path / "export")
    baseline = _write_export(_timm_copy(_tiny_student(distilled=False)), tmp_path / "vit")
    teacher = save_teacher(
        tmp_path / "teacher",
        create_teacher_arch("resnet32", 10),
        TeacherInfo("resnet32", 10, 32, label_space="model"),
    )
    out = tmp_path / "out"
    args = ["analyze", str(export), "--data", str(data), "--out", str(out)]
    args += ["--compare", str(baseline), "--teacher", str(teacher), "--images", "100"]
    code = main([*args, "--batch-size", "50", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["outputs"]) == sorted(WHAT)
    assert summary["images"] == 100
    entropy_info = json.loads((out / "entropy.json").read_text())
    assert entropy_info["images"] == {"in_distribution": 100, "ood": 100}
    for name in WHAT:
        png = out / summary["outputs"][name]["png"]
        _check_png(png)
        assert f"{name}: {png}" in printed
