"""`deitlt --help` and every subcommand's help work and exit 0."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deitlt_scale.cli import COMMANDS, build_parser


def test_top_level_help_lists_every_command():
    help_text = build_parser().format_help()
    for name in COMMANDS:
        assert name in help_text


def test_console_script_help_exits_zero():
    out = subprocess.run(
        [sys.executable, "-m", "deitlt_scale.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "train" in out.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_every_subcommand_has_help(name, capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage: deitlt" in capsys.readouterr().out


def test_bad_recipe_is_one_line_and_exit_2(tmp_path, capsys):
    from deitlt_scale.cli import main

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("optim:\n  lrr: 1\n")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "optim.lrr" in err
