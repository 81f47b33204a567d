"""The generator of docs/reliability.md's fault table (scripts/reliability_table.py)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from faults import REPO

_spec = importlib.util.spec_from_file_location(
    "reliability_table", REPO / "scripts" / "reliability_table.py"
)
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)


def _entry(file: str, area: str, line: int, outcome: str = "passed", detail: str = "") -> dict:
    return {
        "description": f"fault at {file}:{line}",
        "expected": "it | recovers",
        "area": area,
        "test": f"test_{line}",
        "file": f"tests/faults/{file}",
        "order": [line, 0],
        "outcome": outcome,
        "detail": detail,
        "seconds": 1.0,
    }


RESULTS = {
    "generated": "2026-01-02",
    "platform": "Linux x86_64, Python 3.11",
    "faults": {
        "tests/faults/test_security.py::test_9": _entry("test_security.py", "Hostile files", 9),
        "tests/faults/test_kills.py::test_20": _entry(
            "test_kills.py", "Process kills", 20, "xfailed", "init is unseeded"
        ),
        "tests/faults/test_kills.py::test_10": _entry("test_kills.py", "Process kills", 10),
    },
}


def _doc(body: str = "old") -> str:
    return f"# Title\n\nIntro.\n\n{table.BEGIN}\n{body}\n{table.END}\n\nOutro.\n"


def test_themes_follow_the_reading_order_and_faults_their_definition_order():
    text = table.render(RESULTS)
    assert text.index("**Process kills**") < text.index("**Hostile files**")
    assert text.index("fault at test_kills.py:10") < text.index("fault at test_kills.py:20")
    assert text.startswith("3 checks, 2 pass, 1 known gap; results of 2026-01-02")


def test_a_known_gap_is_marked_and_its_reason_listed_below_the_tables():
    text = table.render(RESULTS)
    assert "| known gap [1] |" in text
    assert "1. known gap: init is unseeded (`tests/faults/test_kills.py::test_20`)" in text
    assert "it \\| recovers" in text, "a | inside a cell is escaped"


def test_only_the_text_between_the_markers_is_replaced_and_twice_is_once():
    once = table.replace_table(_doc(), "NEW")
    assert once == _doc("NEW")
    assert table.replace_table(once, "NEW") == once


def test_check_reports_a_stale_document_and_the_update_makes_it_current(tmp_path, capsys):
    results, doc = tmp_path / "faults.json", tmp_path / "reliability.md"
    results.write_text(json.dumps(RESULTS))
    doc.write_text(_doc())
    args = ["--results", str(results), "--doc", str(doc)]
    assert table.main([*args, "--check"]) == 1
    assert table.main(args) == 0
    assert table.main([*args, "--check"]) == 0
    assert "Intro." in doc.read_text() and "Outro." in doc.read_text()
    capsys.readouterr()


@pytest.mark.parametrize("broken", ["missing results", "no markers"])
def test_bad_input_is_one_line_and_exit_2(broken, tmp_path, capsys):
    results, doc = tmp_path / "faults.json", tmp_path / "reliability.md"
    if broken != "missing results":
        results.write_text(json.dumps(RESULTS))
    doc.write_text("# no markers\n" if broken == "no markers" else _doc())
    assert table.main(["--results", str(results), "--doc", str(doc)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reliability_table: error: ")
