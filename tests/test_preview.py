"""`deitlt data preview`: the student's first micro-batch as training builds it, the teacher's
label on each image, and the teacher recipe's first micro-batch, on digits-lt."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from deitlt_scale import config as config_mod
from deitlt_scale.analysis import preview
from deitlt_scale.cli import main
from deitlt_scale.data import meta as meta_mod

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tiny_digits.yaml"
TEACHER_RECIPE = REPO / "recipes" / "teacher_digits.yaml"


def _cfg(digits_lt: Path, teacher: Path) -> config_mod.Config:
    return config_mod.load(
        RECIPE, [f"data.shards={digits_lt}", f"teacher.path={teacher}", "data.num_threads=1"]
    )


def test_preview_draws_both_grids_and_prints_how_often_the_teacher_agrees(
    digits_lt, random_teacher, tmp_path, capsys
):
    out = tmp_path / "preview.png"
    argv = ["data", "preview", str(RECIPE), f"data.shards={digits_lt}",
            f"teacher.path={random_teacher}", "data.num_threads=1", "--images", "8",
            "--teacher-recipe", str(TEACHER_RECIPE), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"own label on \d of 8 images, one of the labels mixed into it on \d of 8",
                     printed), printed  # fmt: skip
    with Image.open(out) as image:
        image.verify()
    assert f"wrote {out}" in printed


def test_the_teachers_labels_are_its_networks_argmax_on_the_drawn_mixed_images(
    digits_lt, random_teacher
):
    from safetensors.torch import load_file

    from deitlt_scale.models.teachers import create_teacher_arch

    cfg = _cfg(digits_lt, random_teacher)
    batch = preview.student_batch(cfg, meta_mod.load(digits_lt), 8)
    info = json.loads((random_teacher / "teacher.json").read_text())
    net = create_teacher_arch(info["arch"], info["num_classes"], info["normed"]).eval()
    net.load_state_dict(load_file(random_teacher / "model.safetensors"))
    pixels = torch.from_numpy(batch.images).permute(0, 3, 1, 2)
    mean = torch.tensor(info["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(info["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net((pixels - mean) / std).argmax(dim=1).tolist()
    assert batch.teacher == expected
    assert 0 < batch.weight <= 1
    if batch.weight < 1:  # mixed with the flipped batch, as the trainer's Mixer does
        assert batch.partners == batch.labels[::-1]


def test_the_student_images_are_the_trainers_first_micro_batch(digits_lt, random_teacher):
    from deitlt_scale.data.loader import TrainLoader

    cfg = _cfg(digits_lt, random_teacher)
    meta = meta_mod.load(digits_lt)
    batch = preview.student_batch(cfg, meta, 8)
    loader = TrainLoader(meta, cfg.data, 8, 1, rank=0, world_size=1, seed=cfg.train.seed,
                         device=torch.device("cpu"))  # fmt: skip
    first = next(iter(loader.epoch(0)))
    assert batch.labels == first.labels.tolist()


def test_without_a_teacher_recipe_only_the_student_is_drawn_and_the_output_says_so(
    digits_lt, random_teacher, tmp_path, capsys
):
    out = tmp_path / "student.png"
    argv = ["data", "preview", str(RECIPE), f"data.shards={digits_lt}",
            f"teacher.path={random_teacher}", "data.num_threads=1", "--images", "4",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "pass --teacher-recipe" in capsys.readouterr().out
    assert out.stat().st_size > 0


@pytest.mark.parametrize("images", ["3", "0"])
def test_an_odd_or_empty_image_count_is_refused(digits_lt, tmp_path, capsys, images):
    argv = ["data", "preview", str(RECIPE), f"data.shards={digits_lt}", "--images", images,
            "--out", str(tmp_path / "x.png")]  # fmt: skip
    assert main(argv) == 2
    assert "--images must be an even number" in capsys.readouterr().err
