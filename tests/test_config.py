"""The config tree: precedence, strictness, types, epoch-to-step resolution, every recipe valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from deitlt_scale import config
from deitlt_scale.steps import resolve_steps
from deitlt_scale.strict import ConfigError

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_apply_without_a_recipe():
    cfg = config.load(None)
    assert cfg.distill.alpha == 0.5
    assert cfg.distill.beta == 0.9999
    assert cfg.data.mixup.label_smoothing == 0.1


def test_recipe_overrides_defaults(tmp_path):
    cfg = config.load(write(tmp_path, "optim:\n  lr: 1.0e-3\n"))
    assert cfg.optim.lr == 1e-3
    assert cfg.optim.weight_decay == 0.05  # untouched default


def test_cli_overrides_recipe(tmp_path):
    recipe = write(tmp_path, "optim:\n  lr: 1.0e-3\ntrain:\n  epochs: 50\n")
    cfg = config.load(recipe, ["optim.lr=2e-3", "train.epochs=7", "data.augment.hflip=0"])
    assert cfg.optim.lr == 2e-3
    assert cfg.train.epochs == 7
    assert cfg.data.augment.hflip == 0.0


def test_unknown_key_names_the_key_and_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, "optim:\n  learning_rate: 1.0\n"))
    message = str(err.value)
    assert "optim.learning_rate" in message
    assert "lr" in message and "weight_decay" in message
    assert "\n" not in message


def test_unknown_section_is_refused():
    with pytest.raises(ConfigError, match="unknown key optimizer"):
        config.load(None, ["optimizer.lr=1"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.epochs must be an integer"):
        config.load(None, ["train.epochs=ten"])
    with pytest.raises(ConfigError, match=r"model\.compile must be true or false"):
        config.load(None, ["model.compile=3"])
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage must be one of"):
        config.load(None, ["deepspeed.zero_stage=4"])


def test_tuple_values_need_the_right_length():
    with pytest.raises(ConfigError, match=r"data\.augment\.scale must be a list of 2"):
        config.load(None, ["data.augment.scale=[0.1]"])


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="section.key=value"):
        config.load(None, ["optim.lr"])


def test_drw_epoch_past_the_end_is_refused():
    with pytest.raises(ConfigError, match="distill.drw_epoch"):
        config.load(None, ["train.epochs=10", "distill.drw_epoch=10"])


def test_odd_micro_batch_is_refused_under_mixup():
    with pytest.raises(ConfigError, match="train.micro_batch must be even"):
        config.load(None, ["train.micro_batch=33"])
    config.load(None, ["train.micro_batch=33", "data.mixup.prob=0"])


def test_batch_identity_is_checked_against_the_world():
    cfg = config.load(
        None, ["train.micro_batch=128", "train.grad_accum=4", "train.global_batch=2048"]
    )
    config.validate_world(cfg, 4)
    with pytest.raises(ConfigError, match="train.global_batch=2048"):
        config.validate_world(cfg, 2)


def test_epochs_resolve_to_optimizer_steps():
    cfg = config.load(
        None,
        [
            "train.epochs=10",
            "train.micro_batch=16",
            "train.grad_accum=2",
            "schedule.warmup_epochs=1.5",
            "distill.drw_epoch=8",
        ],
    )
    steps = resolve_steps(cfg, train_samples=1000, world_size=2)
    # The reference's epoch: 1000 // 256 * 256 = 768 samples, 384 per rank, 24 micro-batches.
    assert steps.samples_per_rank == 384
    assert steps.micro_batches_per_epoch == 24
    assert steps.steps_per_epoch == 12
    assert steps.total == steps.scheduled == 120
    assert steps.warmup == round(1.5 * 12)
    assert steps.drw_start == 8 * 12
    assert steps.epoch_of(44) == 3


def test_a_partial_last_micro_batch_and_step_close_the_epoch():
    cfg = config.load(None, ["train.micro_batch=16", "train.grad_accum=4", "data.epoch_multiple=1"])
    steps = resolve_steps(cfg, train_samples=100, world_size=1)
    assert steps.micro_batches_per_epoch == 7  # 6 x 16 + 4
    assert steps.last_micro_batch == 4
    assert steps.steps_per_epoch == 2
    assert [steps.micro_batches_in_step(s) for s in range(4)] == [4, 3, 4, 3]
    assert [steps.micro_batch_size(1, m) for m in range(3)] == [16, 16, 4]


def test_max_steps_cuts_the_run_but_not_the_schedule():
    cfg = config.load(
        None,
        ["train.epochs=10", "train.micro_batch=10", "train.max_steps=5", "data.epoch_multiple=1"],
    )
    steps = resolve_steps(cfg, train_samples=100, world_size=1)
    assert (steps.total, steps.scheduled) == (5, 100)


def test_fewer_images_than_ranks_is_refused():
    cfg = config.load(None, ["train.micro_batch=64"])
    with pytest.raises(ConfigError, match="the 3 training images are fewer than the 4 ranks"):
        resolve_steps(cfg, train_samples=3, world_size=4)


def test_dump_and_reload_round_trip(tmp_path):
    cfg = config.load(None, ["optim.lr=3e-4", "data.augment.scale=[0.2, 1.0]"])
    path = config.dump(cfg, tmp_path / "config.yaml")
    again = config.load(path)
    assert again == cfg
    assert config.config_hash(again) == config.config_hash(cfg)


def test_hash_ignores_where_outputs_go():
    a = config.load(None, ["runtime.run_dir=a"])
    b = config.load(None, ["runtime.run_dir=b"])
    c = config.load(None, ["optim.lr=1e-3"])
    assert config.config_hash(a) == config.config_hash(b) != config.config_hash(c)


def test_flatten_gives_dotted_keys():
    flat = config.flatten(config.load(None))
    assert flat["optim.lr"] == 5e-4
    assert flat["data.mixup.cutmix_alpha"] == 1.0


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_loads_and_validates(recipe):
    text = recipe.read_text()
    assert text.startswith("#"), "a recipe starts with a comment: command, hardware, result"
    assert "Run:" in text and "Hardware:" in text and "Paper:" in text
    config.load(recipe)


def test_paper_recipes_carry_the_paper_hyperparameters():
    for name, epochs, drw, global_batch, no_mix in [
        ("cifar10lt_r100", 1200, 1100, 1024, True),
        ("cifar100lt_r50", 1200, 1100, 1024, True),
        ("imagenetlt_deitlt_b", 1400, 1200, 2048, False),
        ("inat18_deitlt_b", 1000, 900, 2048, False),
    ]:
        cfg = config.load(Path(RECIPES[0]).parent / f"{name}.yaml")
        assert (cfg.train.epochs, cfg.distill.drw_epoch) == (epochs, drw)
        assert cfg.train.global_batch == global_batch
        assert cfg.distill.no_mixup_drw is no_mix
        assert (cfg.optim.lr, cfg.optim.lr_scale_batch, cfg.optim.weight_decay) == (5e-4, 512, 0.05)
        assert (cfg.schedule.warmup_epochs, cfg.schedule.min_lr, cfg.schedule.warmup_lr) == (
            5,
            1e-5,
            1e-6,
        )
        mix = cfg.data.mixup
        assert (mix.mixup_alpha, mix.cutmix_alpha, mix.switch_prob, mix.label_smoothing) == (
            0.8,
            1.0,
            0.5,
            0.1,
        )
        aug = cfg.data.augment
        assert (aug.randaugment_ops, aug.randaugment_magnitude, aug.random_erasing) == (2, 9, 0.25)
        assert (cfg.model.drop_path, cfg.distill.alpha, cfg.distill.beta) == (0.1, 0.5, 0.9999)
        assert cfg.train.micro_batch == 128 and cfg.train.grad_accum == 4
