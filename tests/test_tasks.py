"""Each Task in isolation: its targets rule in and out of the DRW phase, its loss parts, what it
predicts, and the config rules it owns. In process, tiny models, a fake teacher with fixed
logits; no DeepSpeed, no DALI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deitlt_scale import config, tasks
from deitlt_scale.data.loader import Batch
from deitlt_scale.data.longtail import drw_weights, groups_by_count, groups_by_index
from deitlt_scale.data.meta import DatasetMeta
from deitlt_scale.errors import UserError
from deitlt_scale.models.teacher_runner import TeacherRunner
from deitlt_scale.strict import ConfigError

REPO = Path(__file__).resolve().parent.parent
STUDENT_RECIPE = REPO / "recipes" / "tiny_digits.yaml"
TEACHER_RECIPE = REPO / "recipes" / "teacher_digits.yaml"
K = 4
COUNTS = [40, 20, 8, 2]
TINY = ["model.embed_dim=16", "model.depth=1", "model.num_heads=2", "data.image_size=16"]


def meta() -> DatasetMeta:
    return DatasetMeta(
        dataset="toy",
        num_classes=K,
        train_counts=COUNTS,
        eval_counts=[5] * K,
        class_map=list(range(K)),
        class_names=[str(c) for c in range(K)],
        groups={"paper": groups_by_index(K, (1, 3)), "count": groups_by_count(COUNTS)},
        boundaries=(1, 3),
        imbalance_factor=20.0,
        splits={"train": {"num_samples": 70, "shards": []}, "eval": {"num_samples": 20}},
    )


class FixedLogits(torch.nn.Module):
    """A 'teacher' that predicts class ``(first pixel > 0) * 3`` whatever else it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = (x[:, 0, 0, 0] > 0).long() * 3
        return F.one_hot(label, K).float() * 5.0


def batch(n: int = 6, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % K)


def student_task(*overrides: str, teacher: bool = True) -> tasks.Task:
    cfg = config.load(STUDENT_RECIPE, [*TINY, "teacher.path=unused", *overrides])
    task = tasks.create(cfg, meta())  # no device: no teacher file is read
    if teacher and cfg.distill.type != "none":
        task.teacher = TeacherRunner(FixedLogits().eval(), input_size=16)
    return task


def test_the_kind_of_run_follows_train_task_and_the_dist_token():
    assert tasks.task_class(config.load(STUDENT_RECIPE)) is tasks.DeiTLTTask
    vit = config.load(STUDENT_RECIPE, ["model.distilled=false", "distill.type=none"])
    assert tasks.task_class(vit) is tasks.ViTTask
    assert tasks.task_class(config.load(TEACHER_RECIPE)) is tasks.TeacherTask


def test_student_targets_are_mixed_and_smoothed_before_drw():
    task = student_task()
    b = batch()
    mb = task.inputs(b, seed=3, drw=False)
    assert mb.targets is not None and mb.targets.shape == (6, K)
    torch.testing.assert_close(mb.targets.sum(dim=1), torch.ones(6))
    assert mb.targets.min() > 0  # label smoothing puts mass on every class
    assert not torch.equal(mb.images, b.images)  # mixed (mixup or cutmix, prob 1)
    assert torch.equal(mb.labels, b.labels)


def test_cifar_drw_phase_trains_on_unmixed_images_and_hard_labels():
    task = student_task()  # the tiny recipe sets distill.no_mixup_drw: true
    b = batch()
    mb = task.inputs(b, seed=3, drw=True)
    assert mb.targets is None and torch.equal(mb.images, b.images)


def test_mixup_continues_in_drw_without_no_mixup_drw():
    task = student_task("distill.no_mixup_drw=false")
    assert task.inputs(batch(), seed=3, drw=True).targets is not None


def test_smoothing_alone_when_mixing_is_off():
    task = student_task("data.mixup.prob=0")
    b = batch()
    mb = task.inputs(b, seed=3, drw=False)
    assert torch.equal(mb.images, b.images)
    assert mb.targets is not None
    assert torch.equal(mb.targets.argmax(dim=1), b.labels)


def test_deitlt_loss_parts_are_the_paper_objective_on_the_teachers_labels():
    task = student_task("distill.alpha=0.5")
    model = task.build_model().train()
    b = batch()
    mb = task.inputs(b, seed=1, drw=True)  # DRW: hard CLS labels, weighted DIST CE
    out = model(mb.images)
    teacher_logits = task.teacher(mb.images)
    parts = task.loss(out, mb, teacher_logits, drw=True)
    t_labels = (mb.images[:, 0, 0, 0] > 0).long() * 3
    weights = torch.tensor(drw_weights(COUNTS, 0.9999), dtype=torch.float32)
    expected_cls = 0.5 * F.cross_entropy(out.cls_logits, b.labels)
    expected_dist = 0.5 * F.cross_entropy(out.dist_logits, t_labels, weight=weights)
    torch.testing.assert_close(parts["cls"], expected_cls.detach())
    torch.testing.assert_close(parts["dist"], expected_dist.detach())
    torch.testing.assert_close(parts["loss"], expected_cls + expected_dist)
    assert parts["teacher_agreement"] == (t_labels == b.labels).float().mean()
    cosine = F.cosine_similarity(out.cls_feat, out.dist_feat, dim=-1).mean()
    torch.testing.assert_close(parts["cls_dist_cosine"], cosine)


def test_dist_loss_is_unweighted_before_drw():
    task = student_task()
    model = task.build_model().train()
    mb = task.inputs(batch(), seed=1, drw=False)
    out = model(mb.images)
    parts = task.loss(out, mb, task.teacher(mb.images), drw=False)
    t_labels = (mb.images[:, 0, 0, 0] > 0).long() * 3
    torch.testing.assert_close(parts["dist"], 0.5 * F.cross_entropy(out.dist_logits, t_labels))


def test_student_predicts_cls_dist_and_their_mean():
    task = student_task()
    model = task.build_model().eval()
    x = batch().images
    heads = task.predict(model, x)
    assert set(heads) == {"cls", "dist", "mean"}
    torch.testing.assert_close(heads["mean"], (heads["cls"] + heads["dist"]) / 2)
    torch.testing.assert_close(heads["mean"], model(x))  # what timm's eval forward returns
    assert task.headline == "mean/mean_class"


def test_vit_baseline_has_no_teacher_and_predicts_with_cls():
    task = student_task("model.distilled=false", "distill.type=none")
    assert task.teacher is None
    model = task.build_model().train()
    mb = task.inputs(batch(), seed=1, drw=False)
    parts = task.loss(model(mb.images), mb, None, drw=False)
    assert set(parts) == {"loss", "cls", "dist"} and parts["dist"] == 0
    assert set(task.predict(model.eval(), batch().images)) == {"cls"}
    assert task.headline == "cls/mean_class"


def test_vit_baseline_refuses_a_distillation_type():
    cfg = config.load(STUDENT_RECIPE, ["model.distilled=false", "distill.type=hard"])
    with pytest.raises(ConfigError, match="model.distilled must be true"):
        tasks.check(cfg)


def test_teacher_trains_on_unmixed_images_with_the_ldam_loss():
    cfg = config.load(TEACHER_RECIPE, ["data.image_size=16"])
    task = tasks.create(cfg, meta())
    b = batch()
    mb = task.inputs(b, seed=0, drw=False)
    assert mb.targets is None and torch.equal(mb.images, b.images)
    model = task.build_model().train()
    logits = model(mb.images)
    before = task.loss(logits, mb, None, drw=False)["loss"]
    after = task.loss(logits, mb, None, drw=True)["loss"]
    assert torch.isfinite(before) and not torch.isclose(before, after)  # DRW weights the CE
    assert set(task.predict(model.eval(), b.images)) == {"teacher"}


def test_teacher_recipe_with_mixup_is_refused():
    cfg = config.load(TEACHER_RECIPE, ["data.mixup.prob=1.0", "data.mixup.mixup_alpha=0.8"])
    with pytest.raises(ConfigError, match=r"data.mixup.prob must be 0 for train.task=teacher"):
        tasks.check(cfg)


def test_sam_is_refused_for_students():
    cfg = config.load(STUDENT_RECIPE, ["optim.sam_rho=0.05"])
    with pytest.raises(ConfigError, match="optim.sam_rho"):
        tasks.check(cfg)


def test_a_recipe_given_to_the_wrong_command_names_the_right_one():
    cfg = config.load(TEACHER_RECIPE)
    with pytest.raises(UserError, match="deitlt teacher train"):
        tasks.require_command(cfg, TEACHER_RECIPE, "train")
    tasks.require_command(cfg, TEACHER_RECIPE, "teacher train")
