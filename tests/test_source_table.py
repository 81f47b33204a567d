"""The source table drives `deitlt data prepare`: its choices, its help and which options each
source accepts."""

from __future__ import annotations

import pytest

from deitlt_scale.cli import main
from deitlt_scale.data.prepare import prepare_dataset
from deitlt_scale.data.source_table import OPTIONS, SOURCES
from deitlt_scale.errors import UserError

# A value of the right type for each option (never read: the refusal comes first).
VALUES = {
    "root": "raw",
    "train_list": "train.txt",
    "eval_list": "eval.txt",
    "num_classes": 3,
    "eval_root": "raw-eval",
    "eval_fraction": 0.5,
    "imbalance": 10.0,
    "name": "n",
    "profile": "step",
    "val_per_class": 5,
    "val_list": "val.txt",
}
REFUSED = [
    (name, option) for name, source in SOURCES.items() for option in OPTIONS
    if option not in source.options
]  # fmt: skip


def test_every_option_has_a_test_value():
    assert set(VALUES) == set(OPTIONS)


def test_prepare_help_describes_every_source(capsys):
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    described = capsys.readouterr().out.split("sources and what they read:")[1]
    rows = described.split("examples:")[0]
    for name in SOURCES:
        assert f"  {name}" in rows or f", {name}" in rows, name


@pytest.mark.parametrize(("source", "option"), REFUSED)
def test_an_option_the_source_does_not_accept_is_refused(tmp_path, source, option):
    flag = "--" + option.replace("_", "-")
    with pytest.raises(UserError, match=f"^{flag} does not apply to {source}; it is for "):
        prepare_dataset(source, tmp_path / "out", progress=False, **{option: VALUES[option]})


@pytest.mark.parametrize("source", [n for n, s in SOURCES.items() if "root" in s.required])
def test_a_source_that_requires_root_names_it_when_missing(tmp_path, source):
    with pytest.raises(UserError, match=f"^{source} needs --root "):
        prepare_dataset(source, tmp_path / "out", progress=False)
