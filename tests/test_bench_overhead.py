"""`deitlt bench step --overhead`: the framework's step against a plain torch loop doing the same
work.

The command runs for real (the tiny recipe's Trainer with its DeepSpeed engine, the plain loop, a
random-weight ResNet-32 teacher) on CPU with a smaller student for a few steps. The tests check
that both sides end with the same weights, that a plain side doing other work is caught, and that
every figure prints and parses. No timing is asserted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from test_bench import field, run_bench

from deitlt_scale.benchmarks.plain_step import WEIGHT_TOLERANCE, compare_weights

REPO = Path(__file__).resolve().parent.parent
SMALL = ("patch_size=8", "embed_dim=48", "depth=1", "num_heads=2")
NUMBER = r"([0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)"
# warm-up 1, then 2 timed rounds and (with --breakdown) 2 more, of 2 steps each
ARGS = ["--device", "cpu", "--model-args", *SMALL, "--batch", "8", "--steps", "2",
        "--rounds", "2", "--warmup", "1"]  # fmt: skip


def bench_overhead(*extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "deitlt_scale.cli", "bench", "step", "--overhead", *ARGS, *extra]
    return run_bench(cmd, timeout)


def same_work_line(text: str) -> str:
    match = re.search(r"^same work: .*$", text, flags=re.MULTILINE)
    assert match, f"no same-work line in:\n{text}"
    return match.group(0)


@pytest.mark.slow
def test_overhead_sides_end_with_the_same_weights_and_the_ratio_prints_last():
    out = bench_overhead("--breakdown")
    assert out.returncode == 0, f"STDOUT:\n{out.stdout[-3000:]}\nSTDERR:\n{out.stderr[-3000:]}"
    text = out.stdout
    assert "recipes/tiny_digits.yaml" in text and "DeepSpeed ZeRO 0, fp32, eager" in text
    line = same_work_line(text)
    assert "after 9 steps each" in line and "weights agree" in line
    assert field(r"\|\|difference\|\| / \|\|update\|\| " + NUMBER, line) <= WEIGHT_TOLERANCE
    losses = re.search(rf"mean loss framework {NUMBER}, plain {NUMBER}$", line)
    assert losses and float(losses.group(1)) == pytest.approx(float(losses.group(2)), rel=1e-5)
    # At the recipe's ZeRO 0 the engine steps torch AdamW itself: no ZeRO optimizer in between.
    assert "of which the ZeRO optimizer" not in text
    for part in ("backward (engine)", "optimizer step (engine)", "of which torch AdamW",
                 "flag exchange", "StepWindow.add", "torch AdamW step", "outside the parts"):  # fmt: skip
        assert field(rf"^  +{re.escape(part)} +(-?[0-9.]+) ms/step$", text) is not None
    for side in ("framework", "plain"):
        median = field(rf"^{side}: {NUMBER} ms/step \(median of rounds ", text)
        assert median > 0
    last = text.strip().splitlines()[-1]
    match = re.fullmatch(
        rf"ratio framework/plain ms/step: {NUMBER}x \(median of the per-round ratios {NUMBER}x\)",
        last,
    )
    assert match, last
    assert float(match.group(1)) > 0 and float(match.group(2)) > 0


@pytest.mark.slow
def test_overhead_under_zero_3_gathers_the_partitioned_weights_and_agrees():
    out = bench_overhead("--zero", "3")
    assert out.returncode == 0, f"STDOUT:\n{out.stdout[-3000:]}\nSTDERR:\n{out.stderr[-3000:]}"
    assert "DeepSpeed ZeRO 3, fp32" in out.stdout
    line = same_work_line(out.stdout)
    assert "after 5 steps each" in line and "weights agree" in line


@pytest.mark.slow
def test_a_plain_side_with_a_one_percent_larger_lr_is_caught(monkeypatch, capsys):
    from deitlt_scale.benchmarks.plain_step import PlainStep
    from deitlt_scale.cli import main

    set_lr = PlainStep._set_lr

    def larger_lr(self, step: int) -> None:
        set_lr(self, step)
        for group in self.optimizer.param_groups:
            group["lr"] *= 1.01

    monkeypatch.setattr(PlainStep, "_set_lr", larger_lr)
    # The launcher variables the in-process run exports are dropped after the test too, so that
    # later jobs started from this process (SLURM, torchrun) do not inherit them.
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1"}):
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
        assert main(["bench", "step", "--overhead", *ARGS]) == 1
    captured = capsys.readouterr()
    assert "weights DISAGREE" in same_work_line(captured.out)
    assert "ratio framework/plain" not in captured.out  # no ratio between different work
    assert "did not do the same work" in captured.err


def test_weights_apart_by_more_than_the_tolerance_of_the_update_disagree():
    initial = {"w": torch.zeros(4), "b": torch.zeros(2)}
    plain = {"w": torch.full((4,), 1e-3), "b": torch.full((2,), -1e-3)}
    near = {k: v * (1 + WEIGHT_TOLERANCE / 2) for k, v in plain.items()}
    far = {k: v * (1 + WEIGHT_TOLERANCE * 2) for k, v in plain.items()}
    assert compare_weights(plain, plain, initial).max_abs == 0.0
    assert compare_weights(near, plain, initial).ok
    check = compare_weights(far, plain, initial)
    assert not check.ok and check.relative == pytest.approx(2 * WEIGHT_TOLERANCE, rel=1e-3)
    assert check.describe().startswith("DISAGREE: 2 tensors, 6 values")


def test_weights_of_different_networks_are_an_error():
    a = {"w": torch.zeros(4)}
    with pytest.raises(ValueError, match="different parameters"):
        compare_weights(a, {"v": torch.zeros(4)}, a)
    with pytest.raises(ValueError, match="shape"):
        compare_weights(a, {"w": torch.zeros(5)}, a)


def test_overhead_refuses_the_throughput_flags_in_one_line(capsys):
    from deitlt_scale.cli import main

    assert main(["bench", "step", "--overhead", "--device", "cpu", "--bf16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--overhead compares fp32 eager steps" in err
    assert main(["bench", "step", "--synthetic", "--device", "cpu", "--breakdown"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--breakdown needs --overhead" in err
