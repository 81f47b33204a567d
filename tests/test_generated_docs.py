"""Every generated block of README.md and docs/ is what its committed data gives.

Generated text is rebuilt here from the files it is made from (``docs/data/*.json``): the pages and
README summaries of ``deitlt experiment report --publish``, and the fault table of
docs/reliability.md (``scripts/reliability_table.py``). A hand edit inside one fails ``make test``
with a message naming the block and the command that regenerates it; a new kind of generated block
must come with its check here.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

from deitlt_scale.experiments import publish, report
from deitlt_scale.experiments.results import load as load_results

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
_spec = importlib.util.spec_from_file_location(
    "reliability_table", REPO / "scripts" / "reliability_table.py"
)
reliability_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reliability_table)


def test_published_experiment_pages_and_readme_blocks_are_what_their_results_give():
    problems = publish.check_published(DOCS)
    assert not problems, "\n".join(problems)


def test_every_measured_figure_a_claims_why_quotes_is_on_its_page():
    """A ``why`` is written by hand in the grid file; each mean ± std it quotes must be one the
    generated page shows elsewhere, so a rerun that moves the figures fails here."""
    quoted = re.compile(r"\d+\.\d ± \d+\.\d")
    checked = 0
    for data in publish.published_results(DOCS):
        doc = load_results(data)
        page = publish.published_paths(doc, DOCS)["page"].read_text()
        tables = page.split("Where a claim does not hold here:")[0]
        for claim in doc["grid"]["claims"]:
            for figure in quoted.findall(claim.get("why") or ""):
                assert figure in tables, f"{data.name}: '{claim['statement']}' quotes {figure}"
                checked += 1
    assert checked  # the paper grid's whys quote its tables


def test_the_figures_benchmarks_md_quotes_from_results_md_are_on_it():
    """docs/benchmarks.md quotes the paper grid's control comparison in prose: every mean ± std
    and interval of a bullet that cites results.md must still be on that page."""
    results = (DOCS / "results.md").read_text()
    figure = re.compile(r"\d+\.\d ± \d+\.\d|\d+ ± \d+|[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]")
    bullets = (DOCS / "benchmarks.md").read_text().split("\n* ")
    quoted = [
        f for b in bullets if "results.md" in b for f in figure.findall(b.replace("\n  ", " "))
    ]
    assert len(quoted) >= 5, quoted  # the accuracy pair, the interval, the two speeds
    missing = [f for f in quoted if f not in results]
    assert not missing, (
        f"docs/benchmarks.md quotes {missing}, which docs/results.md no longer shows"
    )


def test_the_fault_table_is_what_the_fault_suites_results_give():
    problem = reliability_table.drift(DOCS / "reliability.md", DOCS / "data" / "faults.json")
    assert problem is None, problem


def test_every_generated_block_is_one_this_module_checks():
    """A marker that says "generated" must belong to a generator checked above."""
    checked = {reliability_table.BEGIN}
    for data in publish.published_results(DOCS):
        name = data.stem
        checked.add(publish.README_START.format(name=name))
        checked.add(report.PAGE_MARK.format(data=f"docs/data/{name}.json"))
    for page in [REPO / "README.md", *DOCS.glob("*.md")]:
        for marker in re.findall(r"<!--[^>]*generated[^>]*-->", page.read_text()):
            assert marker in checked, f"{page}: {marker} has no check in this module"


def test_a_hand_edited_generated_line_is_caught_naming_the_block_and_the_command(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    table = docs / "reliability.md"
    text = table.read_text()
    body = text.split(reliability_table.BEGIN, 1)[1].split(reliability_table.END, 1)[0]
    line = next(x for x in body.splitlines() if x.startswith("| ") and "| pass |" in x)
    table.write_text(text.replace(line, line.replace("| pass |", "| **FAIL** |"), 1))
    problem = reliability_table.drift(table, docs / "data" / "faults.json")
    assert problem and reliability_table.BEGIN in problem and "reliability_table.py" in problem
    for data in publish.published_results(docs):
        page = publish.published_paths(load_results(data), docs)["page"]
        # A table cell with a figure (mean ± std over seeds, or one seed's figure).
        figures = re.search(r"\| \d+\.\d( ± \d+\.\d)? \|", page.read_text()).group(0)
        page.write_text(page.read_text().replace(figures, "| 99.9 |", 1))
        problems = publish.check_published(docs)
        assert any(str(page) in p and "deitlt experiment report" in p for p in problems)


def test_every_relative_link_of_readme_and_docs_names_a_file_that_exists():
    """A page that links to a result not yet published (or moved) sends readers nowhere."""
    broken = []
    for page in [REPO / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{page.relative_to(REPO)}: ({target})")
    assert not broken, "links to missing files:\n" + "\n".join(broken)
