"""Hostile files and leaked secrets: pickles that would run code, secret-like config keys.

Every "code" payload below runs ``touch MARKER`` when unpickled; a test passes only if the file
is refused with a clear message and the marker never appears.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from deitlt_scale import cli
from deitlt_scale.config import Config, flatten
from deitlt_scale.engine import checkpoint
from deitlt_scale.errors import UserError
from deitlt_scale.models.teacher_file import INFO, WEIGHTS, load_teacher
from deitlt_scale.models.teachers import create_teacher_arch
from deitlt_scale.tracking import REDACTED, redact
from faults import TrainProcess, one_line_error, tiny_overrides
from faults.conftest import REFERENCE

MODEL_STATES = "mp_rank_00_model_states.pt"


class RunsCode:
    """Unpickling this object runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tampered_run(reference_run: dict, dest: Path, marker: Path) -> Path:
    """A copy of the reference run whose newest checkpoint also pickles a RunsCode object."""
    shutil.copytree(reference_run["run_dir"], dest)
    newest = checkpoint.latest_checkpoint(dest)
    assert newest is not None
    states = torch.load(newest.path / MODEL_STATES, weights_only=False)  # our own file
    states["hook"] = RunsCode(marker)
    torch.save(states, newest.path / MODEL_STATES)
    return dest


@pytest.mark.fault(
    "`deitlt teacher import` of a pickle that would run code",
    "refused (exit 2) with one line naming what it would call; nothing runs, nothing is written",
)
def test_teacher_import_refuses_a_pickle_that_would_run_code(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    state = create_teacher_arch("resnet32", 10).state_dict()
    torch.save({"state_dict": state, "hook": RunsCode(marker)}, tmp_path / "evil.pth")
    code = cli.main(
        ["teacher", "import", "--format", "ldam", "--checkpoint", str(tmp_path / "evil.pth"),
         "--arch", "resnet32", "--num-classes", "10", "--input-size", "32",
         "--out", str(tmp_path / "teacher")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "posix.system" in err[0] and "refusing to unpickle" in err[0], err
    assert not marker.exists()
    assert not (tmp_path / "teacher").exists()


@pytest.mark.fault(
    "a teacher file whose weights are a pickle that would run code",
    "refused as not safetensors; it is never unpickled",
)
def test_a_teacher_file_is_never_unpickled(random_teacher, tmp_path):
    marker = tmp_path / "code-ran"
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    shutil.copy(random_teacher / INFO, teacher / INFO)
    torch.save({"hook": RunsCode(marker)}, teacher / WEIGHTS)
    with pytest.raises(UserError, match="is not a readable safetensors file") as refused:
        load_teacher(teacher)
    assert "\n" not in str(refused.value)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.fault(
    "checkpoints written by training (ZeRO-1, fp32)",
    "pass the pickle check: only torch's weights_only allow-list and DeepSpeed's state classes",
)
def test_checkpoints_written_by_training_pass_the_pickle_check(reference_run):
    for ref in checkpoint.complete_checkpoints(reference_run["run_dir"]):
        checkpoint.check_pickles(ref.path)


@pytest.mark.slow
@pytest.mark.fault(
    "resuming from a checkpoint that would run code",
    "refused (exit 2) with one line naming the file and what it would call; nothing runs",
)
def test_resume_refuses_a_checkpoint_that_would_run_code(
    digits_lt, random_teacher, reference_run, tmp_path
):
    marker = tmp_path / "code-ran"
    run_dir = _tampered_run(reference_run, tmp_path / "run", marker)
    done = TrainProcess.start(
        tiny_overrides(digits_lt, random_teacher, run_dir, **REFERENCE), tmp_path / "logs"
    ).finish()
    assert done.returncode == 2, done.describe()
    line = one_line_error(done)
    assert MODEL_STATES in line and "posix.system" in line and "refusing" in line, line
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.fault(
    "`deitlt export` of a checkpoint that would run code",
    "refused (exit 2) before anything is unpickled; nothing runs",
)
def test_export_refuses_a_checkpoint_that_would_run_code(reference_run, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    run_dir = _tampered_run(reference_run, tmp_path / "run", marker)
    code = cli.main(["export", str(run_dir), "--out", str(tmp_path / "export")])
    capsys.readouterr()
    assert not marker.exists(), "unpickling the checkpoint ran its code"
    assert code == 2


@pytest.mark.fault(
    "config keys named like secrets (token, password, api_key...)",
    "their values are replaced by *** before params or config are logged; no other key is",
)
def test_secret_like_keys_are_redacted_before_logging():
    params = flatten(Config())
    secrets = {"hub.token": "hf_abc", "tracking.api_key": "k-123", "db.PASSWORD": "pw"}
    logged = redact({**params, **secrets})
    assert all(logged[k] == REDACTED for k in secrets)
    assert {k: logged[k] for k in params} == params
