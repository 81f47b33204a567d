"""deitlt_scale.analysis.claims: a paper's claims checked seed by seed with a paired interval."""

from __future__ import annotations

import math

import pytest

from deitlt_scale.analysis.claims import Claim, Side, check, claims_markdown

CLAIM = Claim("DIST is the tail expert", "Section 3.1",
              Side("deitlt", "dist/paper/tail", "DIST tail"),
              Side("deitlt", "cls/paper/tail", "CLS tail"))  # fmt: skip


def _runs(*pairs: tuple[float, float]) -> dict[str, list[dict[str, float]]]:
    return {"deitlt": [{"dist/paper/tail": d, "cls/paper/tail": c} for d, c in pairs]}


def test_a_claim_reports_the_paired_differences_their_spread_and_interval():
    per_seed = _runs((0.30, 0.10), (0.25, 0.00), (0.40, 0.05))
    (verdict,) = check([CLAIM], per_seed)
    assert verdict.differences == pytest.approx((20.0, 25.0, 35.0))
    assert verdict.mean == pytest.approx(80 / 3)
    std = math.sqrt(((20 - 80 / 3) ** 2 + (25 - 80 / 3) ** 2 + (35 - 80 / 3) ** 2) / 2)
    assert verdict.std == pytest.approx(std)
    half = 4.302652729911275 * std / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert verdict.ci == pytest.approx((80 / 3 - half, 80 / 3 + half))
    assert (verdict.agreeing, verdict.outcome) == (3, "holds")


@pytest.mark.parametrize(
    ("pairs", "outcome"),
    [
        (((0.1, 0.3), (0.2, 0.35), (0.15, 0.3)), "fails"),  # the opposite, measured
        (((0.3, 0.1), (0.1, 0.3)), "undecided"),  # the interval contains zero
        (((0.2, 0.2), (0.3, 0.3)), "undecided"),  # ties: no difference at all
        (((0.3, 0.1),), "one seed"),
    ],
)
def test_the_verdict_follows_the_interval(pairs, outcome):
    (verdict,) = check([CLAIM], _runs(*pairs))
    assert verdict.outcome == outcome
    assert math.isnan(verdict.std) == (len(pairs) == 1)


def test_a_claim_whose_runs_were_not_measured_is_left_out():
    other = Claim("B beats S", "Table 6", Side("deitlt_b", "mean/overall", "B"),
                  Side("deitlt_s", "mean/overall", "S"))  # fmt: skip
    assert [v.claim for v in check([CLAIM, other], _runs((0.3, 0.1)))] == [CLAIM]


def test_sides_with_different_seed_counts_are_refused_by_name():
    claim = Claim("x", "y", Side("a", "m", "a"), Side("b", "m", "b"))
    with pytest.raises(ValueError, match="2 seed\\(s\\) of a against 1 of b"):
        check([claim], {"a": [{"m": 0.1}, {"m": 0.2}], "b": [{"m": 0.1}]})


def test_a_metric_a_run_lacks_is_named_with_its_claim():
    with pytest.raises(
        ValueError, match="'DIST is the tail expert': deitlt has no dist/paper/tail"
    ):
        check([CLAIM], {"deitlt": [{"cls/paper/tail": 0.1}]})


def test_the_markdown_row_gives_both_means_the_difference_its_interval_and_the_verdict():
    per_seed = _runs((0.30, 0.10), (0.20, 0.10))
    table = claims_markdown(check([CLAIM], per_seed), per_seed)
    row = table.splitlines()[2]
    assert row == (
        "| DIST is the tail expert | Section 3.1 | DIST tail: 25.0 | CLS tail: 10.0 | "
        "+15.0 [-48.5, +78.5] | 2 of 2 | **undecided** |"
    )
