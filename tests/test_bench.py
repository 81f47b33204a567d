"""`deitlt bench step` and the model-FLOP counts it reports.

The benchmark runs for real (DeepSpeed engine, frozen teacher, reference loop) on CPU with a tiny
student for two steps; the tests check that every figure and ratio is printed, parses and is
positive, and that the FLOPs per image equal a count made independently by torch's
``FlopCounterMode`` on real forward passes. No timing is asserted.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from deitlt_scale.benchmarks.flops import (
    student_forward_flops,
    teacher_forward_flops,
    vit_forward_flops,
)
from deitlt_scale.config import ModelConfig

REPO = Path(__file__).resolve().parent.parent


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script("gpu_check")  # scripts/gpu_check.py, the GPU check's log reader
TINY = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}
TINY_ARCH = "deit_tiny_distilled_patch16_224"
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


def counted_forward_flops(model: torch.nn.Module, image_size: int) -> int:
    """FLOPs of one real forward as torch's FlopCounterMode counts them (matmuls, convolutions;
    attention through the math kernel, whose two batched matmuls it counts)."""
    model.eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(torch.randn(1, 3, image_size, image_size))
    assert torch.isfinite(out).all()
    return counter.get_total_flops()


def tiny_student_flops_by_counting(num_classes: int, image_size: int) -> int:
    from deitlt_scale.models.student import create_student

    cfg = ModelConfig(arch=TINY_ARCH, **TINY)
    return counted_forward_flops(create_student(cfg, num_classes, image_size), image_size)


def teacher_flops_by_counting(arch: str, num_classes: int, image_size: int) -> int:
    from deitlt_scale.models.teachers import create_teacher_arch

    return counted_forward_flops(create_teacher_arch(arch, num_classes), image_size)


# --------------------------------------------------------------------------------------------
# FLOP counts


def test_student_flops_formula_equals_a_counted_forward():
    cfg = ModelConfig(arch=TINY_ARCH, **TINY)
    assert student_forward_flops(cfg, 10, 32) == tiny_student_flops_by_counting(10, 32)


@pytest.mark.parametrize("normed", [False, True])
def test_teacher_flops_walk_equals_a_counted_forward(normed):
    from deitlt_scale.models.teachers import create_teacher_arch

    model = create_teacher_arch("resnet32", 10, normed=normed)
    assert teacher_forward_flops("resnet32", 10, 32, normed=normed) == counted_forward_flops(
        model, 32
    )


def test_deit_base_and_resnet50_flops_match_their_published_multiply_adds():
    # DeiT-B/16 (distilled: one more token): 17.6 GMACs; ResNet-50: 4.1 GMACs (both at 224 px).
    deit_b = student_forward_flops(ModelConfig(), 1000, 224)
    assert deit_b / 2 == pytest.approx(17.6e9, rel=0.01)
    assert teacher_forward_flops("resnet50", 1000, 224) / 2 == pytest.approx(4.1e9, rel=0.01)


def test_flops_do_not_depend_on_the_head_count():
    common = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_classes=10, distilled=True)
    assert vit_forward_flops(num_heads=3, **common) == vit_forward_flops(num_heads=1, **common)


# --------------------------------------------------------------------------------------------
# The command


def bench_step(*extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "deitlt_scale.cli", "bench", "step", "--synthetic",
        "--device", "cpu", "--model", TINY_ARCH,
        "--model-args", *(f"{k}={v}" for k, v in TINY.items()),
        "--image-size", "32", "--teacher", "resnet32", "--classes", "10", "--batch", "8",
        "--steps", "2", "--rounds", "2", "--warmup", "1", *extra,
    ]  # fmt: skip
    return run_bench(cmd, timeout)


def run_bench(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    """``cmd`` as one process on one thread, with no launcher variables from elsewhere."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def field(pattern: str, text: str) -> float:
    match = re.search(pattern, text, flags=re.MULTILINE)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return float(match.group(1))


@pytest.mark.slow
def test_bench_step_prints_figures_for_both_recipes_and_the_ratios_last():
    out = bench_step()
    assert out.returncode == 0, f"STDOUT:\n{out.stdout[-3000:]}\nSTDERR:\n{out.stderr[-3000:]}"
    text = out.stdout

    flops = int(field(r"^model FLOPs per image: .*? \(([0-9]+)\) = student 3 x", text))
    expected = 3 * tiny_student_flops_by_counting(10, 32) + teacher_flops_by_counting(
        "resnet32", 10, 32
    )
    assert flops == expected

    assert field(rf"^matmul ceiling: {NUMBER} [GMT]FLOP/s \(fp32 ", text) > 0
    for recipe in ("step", "reference"):
        line = rf"^{recipe}: {NUMBER} images/s, {NUMBER} ms/step, .*MFU {NUMBER}%, peak memory "
        match = re.search(line, text, flags=re.MULTILINE)
        assert match, f"no {recipe} line in:\n{text}"
        assert all(float(g) > 0 for g in match.groups())
        rounds = field(rf"^{recipe}: .*; rounds {NUMBER}, {NUMBER} images/s$", text)
        assert rounds > 0
        assert field(rf"^{recipe}: .* loss {NUMBER}", text) > 0
    assert "DeepSpeed ZeRO 1" in text and "fp16 autocast + GradScaler" in text

    last = text.strip().splitlines()[-3:]
    assert re.fullmatch(rf"ratio step/reference images/s: {NUMBER}x", last[0])
    assert re.fullmatch(rf"ratio step/ceiling \(MFU\): {NUMBER}%", last[1])
    assert re.fullmatch(rf"ratio reference/ceiling \(MFU\): {NUMBER}%", last[2])
    assert all(float(re.search(NUMBER, line).group(1)) > 0 for line in last)


def test_unknown_model_arg_is_one_line_and_exit_2(capsys):
    from deitlt_scale.cli import main

    assert main(["bench", "step", "--synthetic", "--model-args", "width=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "width=3" in err and "embed_dim" in err


@pytest.mark.slow
def test_bench_step_ablations_are_measured_in_the_same_run_with_their_ratio_to_the_step():
    variants = ("teacher.side_stream=false,optim.fused=false", "model.depth=1")
    out = bench_step("--ablate", *variants)
    assert out.returncode == 0, f"STDOUT:\n{out.stdout[-3000:]}\nSTDERR:\n{out.stderr[-3000:]}"
    text = out.stdout
    for variant in variants:
        name = re.escape(f"step[{variant}]")
        assert field(rf"^{name}: {NUMBER} images/s, .*MFU {NUMBER}%", text) > 0
    assert re.search(r"^step\[model\.depth=1\]: student: .*depth 1,", text, flags=re.MULTILINE)
    assert re.search(r"^step: student: .*depth 2,", text, flags=re.MULTILINE)
    # On CPU neither the side stream nor fused AdamW acts, and the lines say so.
    for line in re.findall(r"^step.*\]; rounds.*$", text, flags=re.MULTILINE):
        assert "side stream" not in line and "fused AdamW" not in line, line
    # The GPU check's summary reads these lines from its log.
    section = "== bench step tiny (limit 60s) at 00:00:00 UTC"
    figures = gpu_check.parse_benchmarks(f"{section}\n{text}")["bench step tiny"]
    assert figures["step images/s"] > 0 and figures["x reference"] > 0
    assert {f"variant {v}" for v in variants} <= set(figures)
    last = text.strip().splitlines()[-2:]
    for line, variant in zip(last, variants, strict=True):
        assert re.fullmatch(
            rf"ratio {re.escape(f'step[{variant}]')}/step images/s: {NUMBER}x", line
        )
        assert float(re.search(NUMBER, line).group(1)) > 0


def test_ablation_with_an_unknown_config_key_is_one_line_naming_it(capsys):
    from deitlt_scale.cli import main

    args = ["bench", "step", "--synthetic", "--device", "cpu", "--teacher", "none"]
    assert main([*args, "--ablate", "teacher.side_streem=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "side_streem" in err
    assert main([*args, "--ablate", "optim.fused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "KEY=VALUE" in err


def test_step_description_names_what_acts_on_the_device(tmp_path):
    from deitlt_scale import config as config_mod
    from deitlt_scale.benchmarks.step import _step_how

    cfg = config_mod.load(None, ["model.compile=true"])
    assert _step_how(cfg, tmp_path, on_cuda=True) == (
        "DeepSpeed ZeRO 1, bf16, compiled (default) student, teacher bf16 channels_last, "
        "side stream, fused AdamW"
    )
    assert "side stream" not in _step_how(cfg, tmp_path, on_cuda=False)
    off = config_mod.load(None, ["teacher.side_stream=false", "optim.fused=false"])
    assert _step_how(off, tmp_path, on_cuda=True) == (
        "DeepSpeed ZeRO 1, bf16, eager student, teacher bf16 channels_last"
    )
    assert _step_how(off, None, on_cuda=True).endswith("eager student, no teacher")


def test_gpu_check_summary_reads_the_data_pipeline_and_training_figures(capsys, tmp_path):
    from deitlt_scale.cli import main

    argv = ["bench", "data", "--device", "cpu", "--image-size", "32", "--batch-size", "8",
            "--batches", "2", "--warmup", "1", "--threads", "1", "--source-size", "48", "64"]  # fmt: skip
    assert main(argv) == 0
    data_out = capsys.readouterr().out
    # the line format of `deitlt train`'s log windows (engine/trainer.py, Trainer._log)
    train_out = (
        "[step 4/12] loss=6.9 cls=3.4 dist=3.5 images_per_s=812.5 data_wait_fraction=0.0125 lr=1e-06\n"
        "[step 8/12] loss=6.8 cls=3.4 dist=3.4 images_per_s=2750 data_wait_fraction=0.004 lr=2e-06\n"
    )
    log = tmp_path / "gpu_check.log"
    log.write_text(
        f"== bench data --device gpu (limit 120s) at 00:00:00 UTC\n{data_out}"
        f"== train DeiT-S/16 (limit 150s) at 00:00:01 UTC\n{train_out}"
    )
    results = gpu_check.parse_benchmarks(log.read_text())
    data = results["bench data --device gpu"]
    # the first DALI line is the configuration "ratio dali/reference" compares
    dali = float(re.search(rf"^dali \(cpu[^)]*\): {NUMBER} images/s", data_out, re.M).group(1))
    assert data["dali images/s"] == dali and data["reference images/s"] > 0
    assert data["x reference"] == pytest.approx(dali / data["reference images/s"], abs=0.006)
    train = results["train DeiT-S/16"]
    assert train == {"train images/s": 2750.0, "train data wait %": pytest.approx(0.4)}
    assert gpu_check.cmd_summary(log) == 1  # no DeiT-B step figures: the goals cannot be judged
    table = capsys.readouterr().out
    assert f"DALI {dali:.1f} images/s" in table
    assert "last log window 2750.0 images/s, data wait 0.4%" in table
