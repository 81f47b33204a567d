"""`deitlt export`: ZeRO 0-3 checkpoints of a real 2-process DeepSpeed run become a directory timm
loads, whose eval-mode logits are the trained student's."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import timm
import torch
from mlflow import MlflowClient
from safetensors import safe_open
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from deitlt_scale import cli
from deitlt_scale.engine.checkpoint import CheckpointError, find_checkpoint, strip_prefixes
from deitlt_scale.export import export
from deitlt_scale.tracking import read_run_id

pytest_plugins = ["mlflow_fixture"]

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ds_tiny_run", REPO / "tests/scripts/ds_tiny_run.py")
ds_tiny_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ds_tiny_run)

STAGES = (0, 1, 2, 3)
FP32_ATOL = 1e-5
BF16_ATOL = 0.05  # the ZeRO-2 run trains in bf16: its module holds bf16 copies of fp32 masters


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mlflow_server) -> dict[int, Path]:
    """One 2-process launch writing a run per ZeRO stage: 0 fp32, 1 fp32 + EMA + tracked,
    2 bf16 + torch.compile'd student, 3 fp32."""
    root = tmp_path_factory.mktemp("ds-runs")
    dirs = {stage: root / f"zero{stage}" for stage in STAGES}
    jobs = [f"{dirs[0]}:0", f"{dirs[1]}:1:ema:track", f"{dirs[2]}:2:bf16:compile", f"{dirs[3]}:3"]
    env = {**os.environ, "DEITLT_TEST_TRACKING_URI": mlflow_server.uri}
    done = ds_tiny_run.launch(jobs, env, "--experiment", "tiny-export")
    assert done.returncode == 0, done.stderr[-3000:]
    return dirs


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict[int, Path]:
    out = tmp_path_factory.mktemp("exports")
    return {stage: export(runs[stage], out / f"zero{stage}").out_dir for stage in STAGES}


def _reference(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "reference.safetensors"))


def _logits(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(inputs)


# --------------------------------------------------------------------------------------------
# Consolidation and loading


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_local_dir_export_reproduces_the_trained_students_logits(stage, runs, exports):
    ref = _reference(runs[stage])
    model = timm.create_model(f"local-dir:{exports[stage]}", pretrained=True)
    atol = BF16_ATOL if stage == 2 else FP32_ATOL
    torch.testing.assert_close(_logits(model, ref["inputs"]), ref["logits"], atol=atol, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", (1, 3))
def test_architecture_name_with_file_overlay_reproduces_the_logits(stage, runs, exports):
    config = json.loads((exports[stage] / "config.json").read_text())
    k = config["num_classes"]
    args = {key: v for key, v in config["model_args"].items() if key != "num_classes"}
    model = timm.create_model(
        config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(exports[stage] / "model.safetensors"), num_classes=k),
        num_classes=k,
        **args,
    )
    ref = _reference(runs[stage])
    torch.testing.assert_close(_logits(model, ref["inputs"]), ref["logits"], atol=FP32_ATOL, rtol=0)


@pytest.mark.slow
def test_bf16_export_stores_bf16_and_stays_close_to_the_student(runs, tmp_path):
    out = export(runs[1], tmp_path / "bf16", dtype="bf16").out_dir
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = f.keys()
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
    ref = _reference(runs[1])
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    torch.testing.assert_close(_logits(model, ref["inputs"]), ref["logits"], atol=BF16_ATOL, rtol=0)


@pytest.mark.slow
def test_compiled_students_prefixes_are_stripped_to_timm_keys(exports):
    keys = set(load_file(str(exports[2] / "model.safetensors")))
    plain = timm.create_model(
        "deit_tiny_distilled_patch16_224", num_classes=10, **ds_tiny_run.MODEL_ARGS
    )
    assert keys == set(plain.state_dict())


def test_strip_prefixes_removes_engine_and_compile_wrappers():
    t = torch.zeros(1)
    state = {
        "module._orig_mod.blocks.0.norm1.weight": t,
        "_orig_mod.module.head.bias": t,
        "cls_token": t,
    }
    assert set(strip_prefixes(state)) == {"blocks.0.norm1.weight", "head.bias", "cls_token"}


@pytest.mark.slow
def test_export_files_are_pickle_free(exports):
    out = exports[3]
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    state = load_file(str(out / "model.safetensors"))  # safetensors only: no torch.load anywhere
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    json.loads((out / "config.json").read_text())


@pytest.mark.slow
def test_another_image_size_resamples_the_position_embedding(exports):
    trained = load_file(str(exports[1] / "model.safetensors"))
    model = timm.create_model(f"local-dir:{exports[1]}", pretrained=True, img_size=64)
    assert _logits(model, torch.randn(2, 3, 64, 64)).shape == (2, 10)
    expected = resample_abs_pos_embed(
        trained["pos_embed"], new_size=(16, 16), old_size=(8, 8), num_prefix_tokens=2
    )
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    torch.testing.assert_close(
        model.blocks[0].attn.qkv.weight.detach(), trained["blocks.0.attn.qkv.weight"]
    )


@pytest.mark.slow
def test_a_dataset_without_class_names_exports_no_label_names(runs, tmp_path):
    """A list source whose classes share folders has no names ("" per class): the export then
    carries no ``label_names`` rather than empty strings timm users would read."""
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    spec = json.loads((run / "student.json").read_text())
    spec["class_names"] = [""] * len(spec["class_names"])
    (run / "student.json").write_text(json.dumps(spec))
    config = json.loads((export(run, tmp_path / "export").out_dir / "config.json").read_text())
    assert "label_names" not in config
    assert config["num_classes"] == 10


@pytest.mark.slow
def test_another_class_count_reinitialises_both_heads_and_keeps_the_rest(exports):
    trained = load_file(str(exports[1] / "model.safetensors"))
    model = timm.create_model(f"local-dir:{exports[1]}", pretrained=True, num_classes=5)
    assert model.head.weight.shape == (5, 96) and model.head_dist.weight.shape == (5, 96)
    assert _logits(model, torch.randn(2, 3, 32, 32)).shape == (2, 5)
    torch.testing.assert_close(model.pos_embed.detach(), trained["pos_embed"])
    torch.testing.assert_close(model.norm.weight.detach(), trained["norm.weight"])


# --------------------------------------------------------------------------------------------
# Metadata


@pytest.mark.slow
def test_config_json_carries_preprocessing_classes_and_groups(runs, exports):
    student = json.loads((runs[1] / "student.json").read_text())
    config = json.loads((exports[1] / "config.json").read_text())
    assert config["architecture"] == "deit_tiny_distilled_patch16_224"
    assert config["num_classes"] == 10
    assert config["label_names"] == student["class_names"]
    pcfg = config["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 32, 32]
    assert pcfg["mean"] == student["mean"] and pcfg["std"] == student["std"]
    assert pcfg["interpolation"] == "bicubic" and pcfg["crop_pct"] == student["crop_pct"]
    meta = config["deitlt"]
    assert meta["class_map"] == student["class_map"]
    assert meta["groups"] == student["groups"] and meta["boundaries"] == student["boundaries"]
    assert meta["checkpoint"]["tag"] == "step_00000002" and meta["checkpoint"]["zero_stage"] == 1
    model = timm.create_model(f"local-dir:{exports[1]}", pretrained=True)
    assert list(timm.data.resolve_data_config(model=model)["mean"]) == student["mean"]


@pytest.mark.slow
def test_model_card_reports_overall_head_mid_tail(exports):
    card = (exports[1] / "README.md").read_text()
    assert "| mean | 61.50 | 80.00 | 60.25 | 40.00 |" in card
    assert "ZeRO stage | 1" in card and "local-dir:" in card


# --------------------------------------------------------------------------------------------
# EMA, checkpoint choice, errors


@pytest.mark.slow
def test_ema_export_holds_the_ema_weights(runs, tmp_path):
    out = export(runs[1], tmp_path / "ema", ema=True).out_dir
    ref = _reference(runs[1])
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    torch.testing.assert_close(
        _logits(model, ref["inputs"]), ref["ema_logits"], atol=FP32_ATOL, rtol=0
    )
    assert not torch.allclose(ref["ema_logits"], ref["logits"])


@pytest.mark.slow
def test_ema_without_ema_weights_is_a_clear_error(runs, tmp_path):
    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        export(runs[3], tmp_path / "ema", ema=True)
    assert not (tmp_path / "ema").exists()


def _fake_tags(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of a run whose checkpoints are: step 1 (complete), 2 (complete), 3 (no COMPLETE)."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("mlflow*", "mlartifacts"))
    ckpts = copy / "checkpoints"
    shutil.copytree(ckpts / "step_00000002", ckpts / "step_00000001")
    (ckpts / "step_00000001" / "COMPLETE").write_text(json.dumps({"step": 1, "epoch": 0}))
    shutil.copytree(ckpts / "step_00000002", ckpts / "step_00000003")
    (ckpts / "step_00000003" / "COMPLETE").unlink()
    return copy


@pytest.mark.slow
def test_default_checkpoint_is_the_newest_complete_one(runs, tmp_path):
    copy = _fake_tags(runs[0], tmp_path)
    assert find_checkpoint(copy).tag == "step_00000002"
    assert find_checkpoint(copy, "step_00000001").step == 1
    assert find_checkpoint(copy / "checkpoints" / "step_00000001").tag == "step_00000001"


@pytest.mark.slow
def test_a_checkpoint_without_complete_is_never_used(runs, tmp_path):
    copy = _fake_tags(runs[0], tmp_path)
    with pytest.raises(CheckpointError, match="incomplete"):
        export(copy, tmp_path / "out", tag="step_00000003")


def test_a_directory_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="holds no DeepSpeed checkpoints"):
        find_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------------
# The command and the registry


@pytest.mark.slow
def test_cli_exports_and_registers_in_the_mlflow_registry(runs, tmp_path, mlflow_server, capsys):
    out = tmp_path / "registered"
    code = cli.main(["export", str(runs[1]), "--out", str(out), "--register", "tiny-student"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip() == str(out)
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run_id = read_run_id(runs[1])
    (version,) = client.search_model_versions("name='tiny-student'")
    assert version.run_id == run_id
    files = {f.path for f in client.list_artifacts(run_id, "model")}
    assert files == {"model/README.md", "model/config.json", "model/model.safetensors"}


@pytest.mark.slow
def test_cli_refuses_a_non_empty_output_directory(runs, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert cli.main(["export", str(runs[0]), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# docs/finetune.md


def _doc_snippets() -> list[str]:
    text = (REPO / "docs" / "finetune.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_doc_snippets())))
def test_finetune_doc_snippet_runs_as_shown(index, exports):
    code = _doc_snippets()[index]
    assert 'EXPORT = "/path/to/export"' in code
    code = code.replace('EXPORT = "/path/to/export"', f"EXPORT = {str(exports[1])!r}")
    exec(compile(code, f"docs/finetune.md[{index}]", "exec"), {"__name__": "__doc__"})
