"""deitlt_scale.analysis.claims: a paper's claims checked seed by seed, and the grid's claims."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from deitlt_scale.analysis.claims import Claim, Side, check, claims_markdown

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("paper_tables", REPO / "scripts" / "paper_tables.py")
paper_tables = sys.modules.get("paper_tables") or importlib.util.module_from_spec(_spec)
if "paper_tables" not in sys.modules:
    sys.modules["paper_tables"] = paper_tables  # dataclasses look their module up
    _spec.loader.exec_module(paper_tables)

CLAIM = Claim("DIST is the tail expert", "Section 3.1",
              Side("deitlt", "dist/paper/tail", "DIST tail"),
              Side("deitlt", "cls/paper/tail", "CLS tail"))  # fmt: skip


def _runs(*pairs: tuple[float, float]) -> dict[str, list[dict[str, float]]]:
    return {"deitlt": [{"dist/paper/tail": d, "cls/paper/tail": c} for d, c in pairs]}


def test_a_claim_every_seed_agrees_with_holds_and_reports_the_paired_differences():
    per_seed = _runs((0.30, 0.10), (0.25, 0.00), (0.40, 0.05))
    (verdict,) = check([CLAIM], per_seed)
    assert verdict.differences == pytest.approx((20.0, 25.0, 35.0))
    assert verdict.mean == pytest.approx(80 / 3)
    assert verdict.std == pytest.approx(math.sqrt(((20 - 80 / 3) ** 2 + (25 - 80 / 3) ** 2
                                                   + (35 - 80 / 3) ** 2) / 2))  # fmt: skip
    assert (verdict.agreeing, verdict.outcome) == (3, "holds")


@pytest.mark.parametrize(
    ("pairs", "outcome"),
    [
        (((0.1, 0.3), (0.2, 0.2)), "fails"),  # a tie does not support the claim
        (((0.3, 0.1), (0.1, 0.3)), "mixed"),
        (((0.3, 0.1),), "holds (one seed)"),
        (((0.1, 0.3),), "fails (one seed)"),
    ],
)
def test_the_verdict_follows_the_seeds_that_agree(pairs, outcome):
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


def test_the_markdown_row_gives_both_means_the_difference_and_the_verdict():
    per_seed = _runs((0.30, 0.10), (0.20, 0.10))
    table = claims_markdown(check([CLAIM], per_seed), per_seed)
    row = table.splitlines()[2]
    assert row == (
        "| DIST is the tail expert | Section 3.1 | DIST tail: 25.0 | CLS tail: 10.0 | "
        "+15.0 ± 7.1 | 2 of 2 | **holds** |"
    )


def test_every_claim_of_the_grid_names_a_row_or_teacher_and_a_head_it_reports():
    students = {name: paper_tables.head_of(row) for name, row in paper_tables.ROWS.items()}
    for claim in paper_tables.CLAIMS:
        for side in (claim.better, claim.worse):
            head, _, group = side.metric.partition("/")
            assert group in ("overall", "paper/head", "paper/mid", "paper/tail"), side
            if side.runs.startswith("teacher "):
                assert side.runs.removeprefix("teacher ") in paper_tables.TEACHERS, side
                assert head == "teacher", side
            else:
                assert head in students[side.runs], side


def test_the_readme_summary_names_both_models_and_counts_the_claims_that_hold():
    agg = paper_tables.aggregate
    students = {
        "deitlt": agg([{"mean/overall": 0.35, "mean/paper/tail": 0.15},
                       {"mean/overall": 0.37, "mean/paper/tail": 0.17}]),
        "vit": agg([{"cls/overall": 0.20, "cls/paper/tail": 0.0},
                    {"cls/overall": 0.22, "cls/paper/tail": 0.0}]),
    }  # fmt: skip
    per_seed = {"deitlt": [{"mean/overall": 0.35}, {"mean/overall": 0.37}],
                "vit": [{"cls/overall": 0.20}, {"cls/overall": 0.22}]}  # fmt: skip
    vit_claims = [c for c in paper_tables.CLAIMS if c.worse.runs == "vit"]
    verdicts = check(vit_claims, per_seed)
    assert [v.outcome for v in verdicts] == ["holds"]
    assert paper_tables.summary(students, verdicts, [0, 1]) == (
        "On digits-lt over 2 seed(s), DeiT-LT's averaged prediction scores 36.0 ± 1.4 overall "
        "against 21.0 ± 1.4 for the ViT trained alone (tail: 16.0 ± 1.4 against 0.0 ± 0.0); "
        "1 of the paper's 1 claims tested hold on every seed."
    )
