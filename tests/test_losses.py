"""The DeiT-LT objective and the teacher losses against values computed by hand.

Expected values are computed with scalar ``math`` from the formulas of METHOD.md 5, independently
of the tensor code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from deitlt_scale.config import DistillConfig
from deitlt_scale.losses import (
    CEObjective,
    DeiTLTObjective,
    LDAMObjective,
    teacher_objective,
)
from deitlt_scale.models.student import StudentOutput

CLS = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
DIST = [[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]
TEACHER = [[0.1, 2.0, 0.3], [5.0, 0.0, 1.0]]  # argmax: [1, 0]
LABELS = [0, 1]
SOFT = [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1]]
COUNTS = [100, 10, 1]
BETA = 0.9999


def log_softmax(row: list[float]) -> list[float]:
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


def soft_ce(logits, targets) -> float:
    return sum(
        -sum(t * lp for t, lp in zip(trow, log_softmax(row))) for row, trow in zip(logits, targets)
    ) / len(logits)


def hard_ce(logits, labels) -> float:
    return sum(-log_softmax(row)[y] for row, y in zip(logits, labels)) / len(logits)


def ce_terms(logits, labels) -> list[float]:
    return [-log_softmax(row)[y] for row, y in zip(logits, labels)]


def effective_number_weights(counts, beta) -> list[float]:
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    return [w / sum(raw) * len(counts) for w in raw]


def out(cls=CLS, dist=DIST) -> StudentOutput:
    c = torch.tensor(cls, requires_grad=True)
    d = torch.tensor(dist, requires_grad=True) if dist is not None else None
    return StudentOutput(c, d, torch.zeros(len(cls), 4), None if d is None else torch.zeros(2, 4))


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def labels(x=LABELS):
    return torch.tensor(x, dtype=torch.long)


def objective(**cfg) -> DeiTLTObjective:
    return DeiTLTObjective(DistillConfig(**cfg), COUNTS)


def test_standard_phase_is_half_soft_target_ce_plus_half_ce_on_teacher_argmax():
    res = objective()(out(), t(SOFT), labels(), t(TEACHER), drw=False)
    l_cls = soft_ce(CLS, SOFT)
    l_dist = hard_ce(DIST, [1, 0])
    assert res["cls"].item() == pytest.approx(0.5 * l_cls, rel=1e-6)
    assert res["dist"].item() == pytest.approx(0.5 * l_dist, rel=1e-6)
    assert res["loss"].item() == pytest.approx(0.5 * l_cls + 0.5 * l_dist, rel=1e-6)


def test_alpha_weighs_the_two_terms():
    res = objective(alpha=0.25)(out(), t(SOFT), labels(), t(TEACHER), drw=False)
    assert res["cls"].item() == pytest.approx(0.75 * soft_ce(CLS, SOFT), rel=1e-6)
    assert res["dist"].item() == pytest.approx(0.25 * hard_ce(DIST, [1, 0]), rel=1e-6)


def test_drw_weights_dist_ce_by_the_teacher_class_with_weighted_mean_reduction():
    res = objective()(out(), t(SOFT), labels(), t(TEACHER), drw=True)
    w = effective_number_weights(COUNTS, BETA)
    ce = ce_terms(DIST, [1, 0])
    by_teacher = (w[1] * ce[0] + w[0] * ce[1]) / (w[1] + w[0])
    by_truth = (w[0] * ce[0] + w[1] * ce[1]) / (w[0] + w[1])
    assert res["dist"].item() == pytest.approx(0.5 * by_teacher, rel=1e-6)
    assert res["dist"].item() != pytest.approx(0.5 * by_truth, rel=1e-3)
    # The CLS head is not re-weighted in DRW.
    assert res["cls"].item() == pytest.approx(0.5 * soft_ce(CLS, SOFT), rel=1e-6)


def test_label_smoothing_under_mixup_reaches_only_the_cls_head():
    lam, eps, k = 0.7, 0.1, 3
    on, off = 1 - eps + eps / k, eps / k
    y, y_flip = [0, 1], [1, 0]
    mixed = [
        [
            lam * (on if c == y[i] else off) + (1 - lam) * (on if c == y_flip[i] else off)
            for c in range(k)
        ]
        for i in range(2)
    ]
    obj = objective()
    res = obj(out(), t(mixed), labels(), t(TEACHER), drw=False)
    hard = obj(out(), None, labels(), t(TEACHER), drw=False)
    assert res["cls"].item() == pytest.approx(0.5 * soft_ce(CLS, mixed), rel=1e-6)
    assert res["dist"].item() == pytest.approx(hard["dist"].item(), rel=1e-7)
    assert res["dist"].item() == pytest.approx(0.5 * hard_ce(DIST, [1, 0]), rel=1e-6)


def test_targets_none_uses_hard_label_ce_without_smoothing_on_cls():
    res = objective()(out(), None, labels(), t(TEACHER), drw=True)
    assert res["cls"].item() == pytest.approx(0.5 * hard_ce(CLS, LABELS), rel=1e-6)


def test_map_targets_moves_the_teacher_argmax_to_model_labels():
    class_map = [2, 0, 1]  # original label -> model label
    obj = DeiTLTObjective(DistillConfig(), COUNTS, class_map=class_map)
    # Teacher argmax in original labels is [1, 0] -> model labels [0, 2].
    res = obj(out(), t(SOFT), labels([0, 2]), t(TEACHER), drw=True)
    w = effective_number_weights(COUNTS, BETA)
    ce = ce_terms(DIST, [0, 2])
    assert res["dist"].item() == pytest.approx(0.5 * (w[0] * ce[0] + w[2] * ce[1]) / (w[0] + w[2]))
    assert res["teacher_agreement"].item() == 1.0
    assert obj.teacher_labels(t(TEACHER)).tolist() == [0, 2]


def test_teacher_agreement_is_the_fraction_of_teacher_labels_equal_to_the_labels():
    res = objective()(out(), t(SOFT), labels([1, 1]), t(TEACHER), drw=False)
    assert res["teacher_agreement"].item() == 0.5
    assert not res["teacher_agreement"].requires_grad


def test_loss_backpropagates_into_both_heads():
    o = out()
    objective()(o, t(SOFT), labels(), t(TEACHER), drw=True)["loss"].backward()
    assert o.cls_logits.grad.abs().sum() > 0 and o.dist_logits.grad.abs().sum() > 0


def test_soft_distillation_is_kl_at_temperature_times_tau_squared_over_numel():
    tau = 2.0
    res = objective(type="soft", tau=tau)(out(), t(SOFT), labels(), t(TEACHER), drw=False)
    kl = 0.0
    for s_row, t_row in zip(DIST, TEACHER):
        ls = log_softmax([v / tau for v in s_row])
        lt = log_softmax([v / tau for v in t_row])
        kl += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
    assert res["dist"].item() == pytest.approx(0.5 * kl * tau * tau / 6, rel=1e-6)


def test_type_none_plain_vit_trains_only_the_cls_head():
    res = objective(type="none")(out(dist=None), t(SOFT), labels(), None, drw=False)
    assert res["loss"].item() == pytest.approx(soft_ce(CLS, SOFT), rel=1e-6)
    assert res["dist"].item() == 0.0
    assert "teacher_agreement" not in res


def test_type_none_distilled_student_trains_dist_on_the_same_ground_truth():
    res = objective(type="none")(out(), t(SOFT), labels(), None, drw=False)
    assert res["cls"].item() == pytest.approx(0.5 * soft_ce(CLS, SOFT), rel=1e-6)
    assert res["dist"].item() == pytest.approx(0.5 * soft_ce(DIST, SOFT), rel=1e-6)


def test_type_none_in_drw_weights_ce_by_the_ground_truth_class():
    res = objective(type="none")(out(dist=None), None, labels(), None, drw=True)
    w = effective_number_weights(COUNTS, BETA)
    ce = ce_terms(CLS, LABELS)
    assert res["loss"].item() == pytest.approx((w[0] * ce[0] + w[1] * ce[1]) / (w[0] + w[1]))


def test_teacher_with_another_class_count_is_refused():
    with pytest.raises(ValueError, match="teacher predicts 4 classes"):
        objective()(out(), t(SOFT), labels(), torch.zeros(2, 4), drw=False)


def test_ldam_margins_are_proportional_to_n_to_the_minus_quarter_with_max_half():
    obj = LDAMObjective(DistillConfig(), COUNTS)
    expected = [0.5 * n**-0.25 / 1**-0.25 for n in COUNTS]
    assert obj.margins.tolist() == pytest.approx(expected, rel=1e-6)
    assert obj.margins.max().item() == pytest.approx(0.5)


COSINE = [[0.2, 0.1, -0.1], [0.0, 0.15, 0.1]]  # cosine-classifier sized logits for LDAM


def ldam_by_hand(logits, ys, margins, s, weights=None) -> float:
    terms, norm = 0.0, 0.0
    for row, y in zip(logits, ys):
        adjusted = [s * (v - margins[y] if c == y else v) for c, v in enumerate(row)]
        w = 1.0 if weights is None else weights[y]
        terms += w * -log_softmax(adjusted)[y]
        norm += w
    return terms / norm


def test_ldam_loss_subtracts_the_true_class_margin_and_scales_by_s():
    obj = LDAMObjective(DistillConfig(ldam_scale=30.0), COUNTS)
    margins = [0.5 * n**-0.25 for n in COUNTS]
    loss = obj(t(COSINE), labels(), drw=False)["loss"].item()
    assert loss == pytest.approx(ldam_by_hand(COSINE, LABELS, margins, 30.0), rel=1e-5)


def test_ldam_drw_weights_by_the_ground_truth_class():
    obj = LDAMObjective(DistillConfig(), COUNTS)
    margins = [0.5 * n**-0.25 for n in COUNTS]
    w = effective_number_weights(COUNTS, BETA)
    loss = obj(t(COSINE), labels([0, 2]), drw=True)["loss"].item()
    assert loss == pytest.approx(ldam_by_hand(COSINE, [0, 2], margins, 30.0, w), rel=1e-5)


def test_teacher_loss_ce_is_plain_cross_entropy():
    obj = teacher_objective(DistillConfig(teacher_loss="ce"), COUNTS)
    assert isinstance(obj, CEObjective)
    assert obj(t(CLS), labels(), drw=False)["loss"].item() == pytest.approx(hard_ce(CLS, LABELS))
    assert isinstance(teacher_objective(DistillConfig(), COUNTS), LDAMObjective)
