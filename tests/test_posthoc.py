"""Post-hoc analyses on constructed logits with known answers: logit adjustment, head fusion,
calibration (ECE, NLL, reliability bins), the choice of tau/w and the aggregate over seeds."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from deitlt_scale.analysis.aggregate import aggregate, format_aggregate
from deitlt_scale.analysis.posthoc import PosthocOptions, run_posthoc
from deitlt_scale.engine import posthoc
from deitlt_scale.engine.posthoc import Logits
from deitlt_scale.models.student import mean_logits

# Three classes, training counts 100 / 10 / 1: class 0 head, 1 mid, 2 tail.
COUNTS = [100, 10, 1]
GROUPS = [0, 1, 2]


def prior_logits(labels: torch.Tensor, margin: float) -> torch.Tensor:
    """A classifier biased by the training prior: log prior plus ``margin`` on the true class.

    With ``margin`` below the log-prior gap the head class wins every sample; subtracting the
    whole log prior (tau = 1) leaves only the margin, so every sample is right.
    """
    lp = posthoc.log_prior(COUNTS).float()
    logits = lp.repeat(len(labels), 1)
    logits[torch.arange(len(labels)), labels] += margin
    return logits


def test_log_prior_is_log_of_class_frequency():
    lp = posthoc.log_prior([3, 1])
    assert torch.allclose(lp, torch.log(torch.tensor([0.75, 0.25], dtype=torch.float64)))


def test_logit_adjustment_at_tau_one_removes_the_prior_bias():
    labels = torch.tensor([0, 1, 2] * 4)
    logits = prior_logits(labels, margin=1.0)  # log-prior gaps are log 10 = 2.3 > 1
    rows = posthoc.sweep_tau(logits, labels, posthoc.log_prior(COUNTS), GROUPS, taus=(0.0, 1.0))
    at0, at1 = rows
    assert at0["tau"] == 0.0 and at0["head"] == 1.0 and at0["mid"] == 0.0 and at0["tail"] == 0.0
    assert at0["overall"] == pytest.approx(1 / 3)
    assert at1["overall"] == 1.0 and at1["tail"] == 1.0 and at1["mean_class"] == 1.0


def test_adjust_subtracts_tau_times_log_prior():
    logits = torch.zeros(1, 3)
    lp = posthoc.log_prior(COUNTS)
    assert torch.allclose(posthoc.adjust(logits, lp, 0.5), (-0.5 * lp).float()[None])


def test_tau_is_chosen_on_the_best_row_and_ties_keep_no_adjustment():
    rows = [
        {"tau": 0.0, "mean_class": 0.5},
        {"tau": 0.5, "mean_class": 0.7},
        {"tau": 1.0, "mean_class": 0.7},
        {"tau": 1.5, "mean_class": 0.6},
    ]
    assert posthoc.choose(rows, "tau", prefer=0.0) == 0.5
    flat = [{"tau": t, "mean_class": 0.4} for t in (0.0, 1.0, 2.0)]
    assert posthoc.choose(flat, "tau", prefer=0.0) == 0.0


def test_fusion_weight_half_equals_the_mean_head():
    torch.manual_seed(0)
    cls, dist = torch.randn(8, 5), torch.randn(8, 5)
    assert torch.equal(posthoc.fuse(cls, dist, 0.5), mean_logits(cls, dist))
    assert torch.equal(posthoc.fuse(cls, dist, 1.0), cls)
    assert torch.equal(posthoc.fuse(cls, dist, 0.0), dist)


def test_fusion_sweep_ends_are_the_dist_and_cls_heads():
    labels = torch.tensor([0, 1, 2, 2])
    cls = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 0]), 3).float()  # head expert
    dist = torch.nn.functional.one_hot(torch.tensor([1, 1, 2, 2]), 3).float()  # tail expert
    rows = posthoc.sweep_fusion(cls, dist, labels, GROUPS, weights=(0.0, 1.0))
    assert rows[0]["weight"] == 0.0 and rows[0]["tail"] == 1.0 and rows[0]["head"] == 0.0
    assert rows[1]["weight"] == 1.0 and rows[1]["tail"] == 0.0 and rows[1]["head"] == 1.0


def test_fusion_weight_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match="fusion weight"):
        posthoc.fuse(torch.zeros(1, 2), torch.zeros(1, 2), 1.5)


def confident_logits(confidence: float, predicted: torch.Tensor, k: int) -> torch.Tensor:
    """Logits whose softmax puts ``confidence`` on ``predicted`` and the rest evenly on the
    other ``k - 1`` classes."""
    rest = (1 - confidence) / (k - 1)
    probs = torch.full((len(predicted), k), rest, dtype=torch.float64)
    probs[torch.arange(len(predicted)), predicted] = confidence
    return probs.log()


def test_ece_of_a_perfectly_calibrated_predictor_is_zero():
    # Confidence 0.8 on class 0 for ten samples, eight of which are class 0.
    labels = torch.tensor([0] * 8 + [1] * 2)
    logits = confident_logits(0.8, torch.zeros(10, dtype=torch.long), 2)
    assert posthoc.expected_calibration_error(logits, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_an_over_confident_predictor_is_confidence_minus_accuracy():
    # Confidence 0.99 everywhere, half right: ECE = 0.99 - 0.5.
    labels = torch.tensor([0, 1] * 10)
    logits = confident_logits(0.99, torch.zeros(20, dtype=torch.long), 2)
    assert posthoc.expected_calibration_error(logits, labels) == pytest.approx(0.49)


def test_ece_weights_each_bin_by_its_share_of_samples():
    # Bin of 0.6 (3 samples, all right: gap 0.4) and bin of 0.95 (1 sample, wrong: gap 0.95).
    labels = torch.tensor([0, 0, 0, 1])
    logits = torch.cat(
        [
            confident_logits(0.6, torch.zeros(3, dtype=torch.long), 2),
            confident_logits(0.95, torch.zeros(1, dtype=torch.long), 2),
        ]
    )
    expected = 3 / 4 * 0.4 + 1 / 4 * 0.95
    assert posthoc.expected_calibration_error(logits, labels) == pytest.approx(expected)


def test_reliability_bins_are_right_closed_and_count_every_sample():
    labels = torch.tensor([0, 0])
    logits = confident_logits(1 / 3 + 1e-9, torch.zeros(2, dtype=torch.long), 3)
    rel = posthoc.reliability(logits, labels, bins=3)
    assert rel.counts == [0, 2, 0]  # 1/3 + eps lies in (1/3, 2/3]
    assert math.isnan(rel.accuracy[0]) and rel.accuracy[1] == 1.0
    one = posthoc.reliability(confident_logits(0.999999, torch.zeros(1, dtype=torch.long), 2),
                              torch.tensor([0]), bins=15)  # fmt: skip
    assert one.counts[-1] == 1


def test_nll_is_minus_mean_log_probability_of_the_label():
    labels = torch.tensor([0, 1])
    logits = confident_logits(0.8, torch.zeros(2, dtype=torch.long), 2)
    assert posthoc.nll(logits, labels) == pytest.approx(-(math.log(0.8) + math.log(0.2)) / 2)


def test_group_accuracy_leaves_classes_without_samples_out_of_their_group():
    labels = torch.tensor([0, 0, 1])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 1]), 3).float()
    acc = posthoc.group_accuracy(logits, labels, GROUPS)
    assert acc["head"] == 0.5 and acc["mid"] == 1.0 and math.isnan(acc["tail"])
    assert acc["overall"] == pytest.approx(2 / 3) and acc["mean_class"] == pytest.approx(0.75)


def test_report_chooses_tau_on_val_and_reports_test_at_that_tau(tmp_path):
    labels = torch.tensor([0, 1, 2] * 5)
    biased = prior_logits(labels, margin=1.0)
    split = Logits({"cls": biased}, labels)
    groups = {"paper": GROUPS, "count": GROUPS}
    options = PosthocOptions(logit_adjust=True, calibration=True, taus=(0.0, 0.5, 1.0, 1.5))
    report = run_posthoc(split, split, COUNTS, groups, options, tmp_path)
    assert report.metrics["la/cls/tau"] == 1.0  # the first tau at which val is perfect
    assert report.metrics["la/cls/overall"] == 1.0
    assert report.metrics["la/cls/tau0/overall"] == pytest.approx(1 / 3)
    assert (tmp_path / "reliability_cls.png").stat().st_size > 0
    assert (tmp_path / "logit_adjust.csv").read_text().count("\n") == 1 + 2 * 4  # val and test


def test_report_without_val_chooses_nothing_and_says_so(tmp_path):
    labels = torch.tensor([0, 1, 2])
    split = Logits({"cls": prior_logits(labels, 1.0)}, labels)
    report = run_posthoc(
        split, None, COUNTS, {"paper": GROUPS}, PosthocOptions(logit_adjust=True), tmp_path
    )
    assert "la/cls/tau" not in report.metrics
    assert any("no val split" in line for line in report.lines)


def test_report_fusion_needs_both_heads(tmp_path):
    from deitlt_scale.errors import UserError

    labels = torch.tensor([0, 1, 2])
    split = Logits({"cls": torch.zeros(3, 3)}, labels)
    with pytest.raises(UserError, match="CLS and a DIST head"):
        run_posthoc(split, None, COUNTS, {"paper": GROUPS}, PosthocOptions(fusion=True), tmp_path)


def test_aggregate_gives_mean_and_sample_standard_deviation():
    agg = aggregate([{"cls/overall": 0.2, "la/cls/tau": 1.0}, {"cls/overall": 0.4}])
    assert agg["cls/overall"].mean == pytest.approx(0.3)
    assert agg["cls/overall"].std == pytest.approx(math.sqrt(0.02))  # n - 1 = 1
    assert agg["la/cls/tau"].n == 1 and math.isnan(agg["la/cls/tau"].std)
    assert "30.0 ± 14.1" in format_aggregate(agg)


def test_aggregate_table_lists_posthoc_figures_apart_from_the_heads():
    agg = aggregate([{"cls/overall": 0.2, "fusion/overall": 0.3}])
    rows = format_aggregate(agg).splitlines()
    assert not any(r.startswith("fusion ") for r in rows)  # not a head row
    assert any(r.startswith("fusion/overall") and "30.0" in r for r in rows)


# --------------------------------------------------------------------------------------------
# The command, on a trained tiny run whose dataset holds a val split


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, random_teacher):
    from deitlt_scale.data.prepare import prepare_dataset
    from tests.test_trainer import launch, tiny_overrides

    tmp = tmp_path_factory.mktemp("posthoc-run")
    data = tmp / "digits-val"
    prepare_dataset("digits-lt", data, val_per_class=4, progress=False)
    run_dir = tmp / "run"
    out = launch(tiny_overrides(data, random_teacher, run_dir, **{"train.epochs": 1,
                                                                  "distill.drw_epoch": "null"}))  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return run_dir


def deitlt_eval(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deitlt_scale.cli", "eval", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_training_with_a_val_split_chooses_its_best_checkpoint_there(trained_run):
    chosen = json.loads((trained_run / "eval" / "selection.json").read_text())
    assert chosen["split"] == "val" and chosen["metric"] == "mean/mean_class"
    val = json.loads((trained_run / "eval" / "val" / "latest.json").read_text())
    assert chosen["value"] == pytest.approx(val["metrics"]["mean/mean_class"])
    assert val["step"] == chosen["step"]


@pytest.mark.slow
def test_eval_flags_write_the_posthoc_outputs_with_choices_on_val(trained_run):
    out = deitlt_eval(trained_run, "--tag", "latest", "--logit-adjust", "--calibration",
                      "--fusion-weight")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    posthoc_dir = trained_run / "eval" / "posthoc"
    payload = json.loads((posthoc_dir / "posthoc.json").read_text())
    assert payload["choices"]["selected_on"] == "val"
    assert set(payload["choices"]["logit_adjust"]["tau"]) == {"cls", "dist", "mean"}
    for head in ("cls", "dist", "mean"):
        assert (posthoc_dir / f"reliability_{head}.png").stat().st_size > 0
        assert 0 <= payload["metrics"][f"calib/{head}/ece"] <= 1
    assert 0 <= payload["metrics"]["fusion/weight"] <= 1
    # The paper's mean head is the fusion sweep's w = 0.5 row, and tau = 0 leaves logits alone.
    standard = json.loads((trained_run / "eval" / "latest.json").read_text())["metrics"]
    rows = list(csv.DictReader((posthoc_dir / "fusion.csv").read_text().splitlines()))
    half = next(r for r in rows if r["split"] == "test" and float(r["weight"]) == 0.5)
    assert float(half["overall"]) == pytest.approx(standard["mean/overall"], abs=1e-6)
    assert payload["metrics"]["la/cls/tau0/overall"] == pytest.approx(standard["cls/overall"])
    assert "chosen on val" in out.stdout


@pytest.mark.slow
def test_eval_aggregate_reports_mean_and_standard_deviation_over_runs(trained_run, tmp_path):
    out = deitlt_eval(trained_run, trained_run, "--tag", "latest", "--aggregate", "--out", tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    agg = json.loads((tmp_path / "aggregate.json").read_text())["metrics"]
    assert agg["mean/overall"]["n"] == 2 and agg["mean/overall"]["std"] == 0.0
    assert "mean ± sample standard deviation over 2 runs" in out.stdout


def test_several_runs_without_aggregate_are_refused(tmp_path, capsys):
    from deitlt_scale.cli import main

    (tmp_path / "a").mkdir()
    code = main(["eval", str(tmp_path / "a"), str(tmp_path / "a")])
    assert code == 2 and "pass --aggregate" in capsys.readouterr().err
