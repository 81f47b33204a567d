"""Malformed recipes: unknown keys, wrong types, impossible arithmetic, mismatched data and teacher.

Each case runs `deitlt train` in-process (cli.main) on the tiny recipe with one fault, in the recipe
file or as an override. Every case must exit 2 with exactly one stderr line that names the key
(or the file) at fault, and leave no run directory behind. None of them reaches DeepSpeed's
engine, so no case costs more than argument checking and, for the data-dependent ones, reading
meta.json and the teacher file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from deitlt_scale import cli
from faults import RECIPE, tiny_overrides


@dataclass(frozen=True)
class Case:
    description: str
    overrides: tuple[str, ...] = ()  # "key=value" items; "{teacher7}" is the 7-class teacher
    recipe_text: str | None = None  # a recipe file that replaces the tiny recipe
    names: tuple[str, ...] = ()  # what the error line must mention
    shown: str = ""  # what the table says the line names (default: the first of ``names``)


CASES: dict[str, Case] = {
    "unknown section": Case(
        "a section that does not exist",
        ("trainer.epochs=2",),
        names=("unknown key trainer",),
        shown="trainer",
    ),
    "unknown key": Case(
        "a misspelled key",
        ("train.epoch=2",),
        names=("unknown key train.epoch;",),
        shown="train.epoch",
    ),
    "unknown nested key": Case(
        "a misspelled nested key", ("data.augment.hflp=0.5",), names=("data.augment.hflp",)
    ),
    "int as text": Case(
        "a word where an integer belongs", ("train.epochs=ten",), names=("train.epochs",)
    ),
    "bool as text": Case(
        "a word where true/false belongs", ("deepspeed.bf16=maybe",), names=("deepspeed.bf16",)
    ),
    "bad choice": Case(
        "a value outside the allowed choices",
        ("train.on_nonfinite=ignore",),
        names=("train.on_nonfinite", "stop", "skip"),
    ),
    "zero stage 4": Case(
        "a ZeRO stage that does not exist", ("deepspeed.zero_stage=4",), names=("zero_stage",)
    ),
    "short tuple": Case(
        "a list of the wrong length", ("data.mean=[0.5,0.5]",), names=("data.mean", "3 values")
    ),
    "section as value": Case(
        "a value where a section belongs",
        ("train=5",),
        names=("train must be a mapping",),
        shown="train",
    ),
    "value as section": Case(
        "an override below a value", ("train.epochs.max=3",), names=("train.epochs",)
    ),
    "override without =": Case(
        "an override without '='", ("train.epochs",), names=("train.epochs", "section.key=value")
    ),
    "invalid yaml": Case(
        "a recipe that is not valid YAML",
        recipe_text="train: {epochs: [1, 2\n",
        names=("recipe.yaml is not valid YAML",),
        shown="the recipe file",
    ),
    "list recipe": Case(
        "a recipe that is a list, not sections",
        recipe_text="- train\n- data\n",
        names=("recipe.yaml must be a mapping",),
        shown="the recipe file",
    ),
    "zero micro-batch": Case(
        "a micro-batch of 0", ("train.micro_batch=0",), names=("train.micro_batch",)
    ),
    "odd micro-batch with mixup": Case(
        "an odd micro-batch while mixup pairs samples",
        ("train.micro_batch=15",),
        names=("train.micro_batch", "even"),
    ),
    "global batch arithmetic": Case(
        "global batch != micro-batch x accumulation x world",
        ("train.global_batch=64",),
        names=("train.global_batch=64", "train.micro_batch=16"),
    ),
    "odd last micro-batch with mixup": Case(
        "an epoch whose last micro-batch is odd while mixup pairs samples",
        ("data.epoch_multiple=1", "train.micro_batch=32"),
        names=("last micro-batch of an epoch holds 21 images", "train.micro_batch"),
        shown="train.micro_batch",
    ),
    "drw past the end": Case(
        "DRW starting after the last epoch", ("distill.drw_epoch=2",), names=("distill.drw_epoch",)
    ),
    "warm-up past the end": Case(
        "a warm-up longer than training",
        ("schedule.warmup_epochs=3",),
        names=("schedule.warmup_epochs",),
    ),
    "alpha out of range": Case(
        "a distillation weight outside [0, 1]", ("distill.alpha=1.5",), names=("distill.alpha",)
    ),
    "beta of 1": Case(
        "a DRW beta of 1 (infinite effective number)",
        ("distill.beta=1.0",),
        names=("distill.beta",),
    ),
    "negative lr": Case("a negative learning rate", ("optim.lr=-0.001",), names=("optim.lr",)),
    "sam on a student": Case(
        "SAM configured for a student", ("optim.sam_rho=0.05",), names=("optim.sam_rho",)
    ),
    "distillation without a dist token": Case(
        "hard distillation into a student without a DIST token",
        ("model.distilled=false",),
        names=("model.distilled",),
    ),
    "reversed crop scale": Case(
        "a crop scale with lo > hi",
        ("data.augment.scale=[0.9,0.1]",),
        names=("data.augment.scale",),
    ),
    "keep no checkpoint": Case(
        "keeping 0 checkpoints", ("checkpoint.keep_last=0",), names=("checkpoint.keep_last",)
    ),
    "teacher class count": Case(
        "a teacher with 7 classes for 10-class data",
        ("teacher.path={teacher7}",),
        names=("predicts 7 classes", "10"),
        shown="the teacher file and both class counts",
    ),
    "missing teacher": Case(
        "a teacher directory that does not exist",
        ("teacher.path={missing}",),
        names=("teacher.json does not exist",),
        shown="the missing teacher.json",
    ),
    "distillation without teacher": Case(
        "hard distillation with teacher.path empty", ("teacher.path=",), names=("teacher.path",)
    ),
    "label space mismatch": Case(
        "teacher.map_targets on a teacher that predicts model labels",
        ("teacher.map_targets=true",),
        names=("teacher.map_targets",),
    ),
    "data not prepared": Case(
        "data.shards pointing at a directory without meta.json",
        ("data.shards={missing}",),
        names=("meta.json", "deitlt data prepare"),
        shown="the directory and how to prepare it",
    ),
}


@pytest.fixture(scope="module")
def teacher7(tmp_path_factory) -> Path:
    """A real teacher file for 7 classes."""
    from deitlt_scale.models.teacher_file import TeacherInfo, save_teacher
    from deitlt_scale.models.teachers import create_teacher_arch

    out = tmp_path_factory.mktemp("teacher7") / "teacher"
    save_teacher(out, create_teacher_arch("resnet32", 7), TeacherInfo("resnet32", 7, 32))
    return out


@pytest.fixture
def clean_environ():
    """The data-dependent cases initialise torch.distributed in this process, which exports the
    launcher variables; restore the environment so later launches stay single-process."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name,
            id=name.replace(" ", "-"),
            marks=pytest.mark.fault(
                f"recipe: {case.description}",
                f"exit 2, one line naming {case.shown or case.names[0]}, no run directory",
            ),
        )
        for name, case in CASES.items()
    ],
)
def test_a_malformed_recipe_is_refused_with_one_line_naming_the_key(
    name, digits_lt, random_teacher, teacher7, tmp_path, capsys, clean_environ
):
    case = CASES[name]
    run_dir = tmp_path / "run"
    recipe = RECIPE
    if case.recipe_text is not None:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(case.recipe_text)
    values = {"teacher7": teacher7, "missing": tmp_path / "nowhere"}
    extra = [item.format(**values) for item in case.overrides]
    code = cli.main(
        ["train", str(recipe), *tiny_overrides(digits_lt, random_teacher, run_dir), *extra]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    # Libraries may warn once on import (torch: "No CUDA runtime is found"); the command's own
    # output is exactly one error line, the last one, and no traceback.
    errors = [line for line in err.splitlines() if line.startswith("deitlt train: error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert "Traceback" not in err
    for text in case.names:
        assert text in errors[0], errors[0]
    assert not run_dir.exists()
