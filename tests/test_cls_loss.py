"""``distill.cls_loss``: the CLS head's long-tail losses against values computed by hand; the
DIST term is unchanged."""

from __future__ import annotations

import math

import pytest

from deitlt_scale import config as config_mod
from deitlt_scale.strict import ConfigError
from tests.test_losses import (
    CLS,
    COUNTS,
    DIST,
    SOFT,
    TEACHER,
    hard_ce,
    labels,
    objective,
    out,
    soft_ce,
    t,
)

LOG_PRIOR = [math.log(n / sum(COUNTS)) for n in COUNTS]


def shifted(rows, tau: float):
    return [[v + tau * lp for v, lp in zip(row, LOG_PRIOR)] for row in rows]


def test_balanced_softmax_is_ce_on_logits_plus_log_prior():
    res = objective(cls_loss="balanced_softmax")(out(), None, labels(), t(TEACHER), drw=False)
    assert res["cls"].item() == pytest.approx(0.5 * hard_ce(shifted(CLS, 1.0), [0, 1]), rel=1e-6)


def test_logit_adjusted_loss_shifts_by_tau_times_log_prior_under_soft_targets():
    res = objective(cls_loss="logit_adjusted", cls_tau=0.5)(
        out(), t(SOFT), labels(), t(TEACHER), drw=False
    )
    assert res["cls"].item() == pytest.approx(0.5 * soft_ce(shifted(CLS, 0.5), SOFT), rel=1e-6)


def test_logit_adjusted_at_tau_one_equals_balanced_softmax():
    a = objective(cls_loss="logit_adjusted", cls_tau=1.0)(
        out(), t(SOFT), labels(), t(TEACHER), False
    )
    b = objective(cls_loss="balanced_softmax")(out(), t(SOFT), labels(), t(TEACHER), False)
    assert a["cls"].item() == pytest.approx(b["cls"].item(), rel=1e-7)


@pytest.mark.parametrize("loss", ["balanced_softmax", "logit_adjusted"])
def test_the_dist_term_is_unchanged(loss):
    res = objective(cls_loss=loss)(out(), t(SOFT), labels(), t(TEACHER), drw=False)
    assert res["dist"].item() == pytest.approx(0.5 * hard_ce(DIST, [1, 0]), rel=1e-6)


def test_the_vit_baseline_shifts_only_its_cls_head():
    res = objective(type="none", cls_loss="balanced_softmax")(
        out(dist=None), None, labels(), None, False
    )
    assert res["cls"].item() == pytest.approx(hard_ce(shifted(CLS, 1.0), [0, 1]), rel=1e-6)


def test_ce_is_the_default_and_leaves_the_logits_alone():
    res = objective()(out(), None, labels(), t(TEACHER), drw=False)
    assert res["cls"].item() == pytest.approx(0.5 * hard_ce(CLS, [0, 1]), rel=1e-6)


def test_cls_loss_is_a_config_key_with_its_choices():
    cfg = config_mod.load(None, ["distill.cls_loss=logit_adjusted", "distill.cls_tau=1.5"])
    assert cfg.distill.cls_loss == "logit_adjusted" and cfg.distill.cls_tau == 1.5
    with pytest.raises(ConfigError):
        config_mod.load(None, ["distill.cls_loss=focal"])


def test_a_negative_tau_is_refused():
    with pytest.raises(ValueError, match="cls_tau must be >= 0"):
        objective(cls_loss="logit_adjusted", cls_tau=-1.0)
