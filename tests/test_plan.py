"""`deitlt train RECIPE --dry-run --world-size W`: a cluster job's layout, planned from a laptop
with only the dataset's meta.json (the reference's epoch arithmetic, METHOD.md 1.6)."""

from __future__ import annotations

import json
from pathlib import Path

from deitlt_scale import cli
from deitlt_scale.data import meta as meta_io
from deitlt_scale.data.meta import DatasetMeta

REPO = Path(__file__).resolve().parent.parent


def inat_sized_meta(root: Path) -> Path:
    """A meta.json with iNaturalist-2018's train size; no shard is read by a plan."""
    k = 8142
    meta = DatasetMeta(
        dataset="inat2018",
        num_classes=k,
        train_counts=[1000] + [53] * (k - 1),
        eval_counts=[3] * k,
        class_map=list(range(k)),
        class_names=[""] * k,
        groups={"paper": [0] * k, "count": [0] * k},
        boundaries=(842, 4543),
        imbalance_factor=500.0,
        splits={
            "train": {"num_samples": 437_513, "shards": []},
            "eval": {"num_samples": 24_426, "shards": []},
        },
    )
    root.mkdir(parents=True)
    meta_io.save(meta, root)
    return root


def test_plan_of_the_inat_recipe_on_four_processes_is_the_references(tmp_path, capsys):
    data = inat_sized_meta(tmp_path / "inat")
    recipe = REPO / "recipes" / "inat18_deitlt_b.yaml"
    run_dir = tmp_path / "run"
    code = cli.main(["train", str(recipe), f"data.shards={data}", f"runtime.run_dir={run_dir}",
                     "--dry-run", "--world-size", "4"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "per rank and epoch 109376 samples" in out
    assert "855 micro-batches per rank (last of 64 images), 214 optimizer steps (last of 3" in out
    assert "214000 steps" in out and "DRW from step 192600" in out and "peak lr 0.0005" in out
    ds = json.loads(
        next(line for line in out.splitlines() if line.startswith("deepspeed")).split(None, 1)[1]
    )
    assert ds["train_batch_size"] == 2048 and ds["zero_optimization"]["stage"] == 1
    assert "nothing was built" in out
    assert not run_dir.exists()  # a plan writes no run directory


def test_world_size_without_dry_run_is_refused(tmp_path, capsys):
    recipe = REPO / "recipes" / "tiny_digits.yaml"
    assert cli.main(["train", str(recipe), "--world-size", "4"]) == 2
    assert "--dry-run" in capsys.readouterr().err
