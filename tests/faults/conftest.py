"""The fault suite's marker, its result recording and the uninterrupted reference run.

``@pytest.mark.fault(description, expected)`` tags a test as the check of one fault. After the
session, the outcome of every tagged test that ran is merged (by test id) into a JSON file,
``build/reliability/faults.json`` or ``$DEITLT_FAULT_RESULTS``; ``python
scripts/reliability_table.py`` renders it into docs/reliability.md. Outcomes: ``passed``,
``failed``, ``xfailed`` (a known gap, declared with a strict xfail naming the missing fix),
``xpassed`` and ``skipped``.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import pytest

from faults import REPO, TrainProcess, final_weights, kill_strays, tiny_overrides

RESULTS_ENV = "DEITLT_FAULT_RESULTS"
DEFAULT_RESULTS = REPO / "build" / "reliability" / "faults.json"
_KEY = pytest.StashKey[dict]()


def results_path() -> Path:
    return Path(os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "fault(description, expected): the test checks one injected fault and its expected "
        "outcome (docs/reliability.md's table is generated from these)",
    )
    config.stash[_KEY] = {}


def _fault_of(item: pytest.Item) -> tuple[str, str] | None:
    marker = item.get_closest_marker("fault")
    if marker is None:
        return None
    if len(marker.args) != 2 or not all(isinstance(a, str) and a for a in marker.args):
        raise pytest.UsageError(f"{item.nodeid}: use @pytest.mark.fault(description, expected)")
    return marker.args[0], marker.args[1]


def _area(item: pytest.Item) -> str:
    """The module's theme: its docstring's first line up to the colon ("Process kills")."""
    doc = getattr(item.module, "__doc__", None) or item.module.__name__
    return doc.strip().splitlines()[0].split(":")[0].rstrip(".")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    fault = _fault_of(item)
    if fault is None:
        return
    results: dict = item.config.stash[_KEY]
    entry = results.setdefault(
        item.nodeid,
        {
            "description": fault[0],
            "expected": fault[1],
            "area": _area(item),
            "test": item.nodeid.split("::", 1)[-1],
            "file": item.nodeid.split("::", 1)[0],
            # Definition order inside a file: the function's line, then the parameter's position.
            "order": [item.location[1] or 0, item.session.items.index(item)],
            "outcome": "passed",
            "detail": "",
            "seconds": 0.0,
        },
    )
    entry["seconds"] = round(entry["seconds"] + report.duration, 1)
    if entry["outcome"] != "passed":
        return  # the first phase that did not pass decides
    if report.skipped and hasattr(report, "wasxfail"):
        entry["outcome"], entry["detail"] = "xfailed", report.wasxfail
    elif report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        entry["outcome"], entry["detail"] = "skipped", reason.removeprefix("Skipped: ")
    elif report.failed:
        entry["outcome"] = "failed"
        entry["detail"] = (report.longreprtext.strip().splitlines() or [""])[-1][:300]
    elif report.passed and hasattr(report, "wasxfail"):
        entry["outcome"], entry["detail"] = "xpassed", report.wasxfail


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    ran: dict = session.config.stash.get(_KEY, {})
    if not ran:
        return
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Test processes running side by side (pytest -n) each merge their share: one at a time.
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged: dict = {}
        if path.is_file():
            try:
                merged = json.loads(path.read_text()).get("faults", {})
            except (json.JSONDecodeError, AttributeError):
                merged = {}
        merged.update(ran)
        payload = {
            "generated": dt.date.today().isoformat(),
            "platform": f"{platform.system()} {platform.machine()}, "
            f"Python {sys.version.split()[0]}",
            "faults": dict(sorted(merged.items())),
        }
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(path)


@pytest.fixture(scope="session", autouse=True)
def _no_stray_trainers():
    yield
    kill_strays()


# --------------------------------------------------------------------------------------------
# The shared start and the uninterrupted run every interrupted one must end up equal to.

# Checkpoint settings do not change the trajectory (config_hash ignores them), so every fault
# run may checkpoint as it needs and still be compared with the reference.
REFERENCE = {"checkpoint.every_steps": 10, "checkpoint.keep_last": 2}
START_STEP = 10
START_TAG = f"step_{START_STEP:08d}"


@pytest.fixture(scope="session")
def start_run(digits_lt, random_teacher, tmp_path_factory):
    """The first 10 steps of the tiny run, once: every comparable run continues from them.

    A fresh process initialises the student from torch's unseeded generator, so runs are
    compared from a shared checkpoint; test_kills checks the from-scratch case on its own.
    """
    run_dir = tmp_path_factory.mktemp("start") / "run"
    extra = {**REFERENCE, "train.max_steps": START_STEP}
    done = TrainProcess.start(
        tiny_overrides(digits_lt, random_teacher, run_dir, **extra), run_dir.parent / "logs"
    ).finish()
    assert done.returncode == 0, done.describe()
    return {"run_dir": run_dir, "stdout": done.stdout}


def continue_from_start(start_run: dict, run_dir: Path) -> Path:
    """Make ``run_dir`` a run directory holding only the shared step-10 checkpoint."""
    source = start_run["run_dir"]
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "student.json"):
        shutil.copy(source / name, run_dir / name)
    for script in (source / "checkpoints").glob("*.py"):
        shutil.copy(script, run_dir / "checkpoints" / script.name)
    shutil.copytree(source / "checkpoints" / START_TAG, run_dir / "checkpoints" / START_TAG)
    return run_dir


@pytest.fixture(scope="session")
def reference_run(digits_lt, random_teacher, start_run, tmp_path_factory):
    """The run continued from the shared start without interruption to its end (step 50)."""
    run_dir = continue_from_start(start_run, tmp_path_factory.mktemp("reference") / "run")
    done = TrainProcess.start(
        tiny_overrides(digits_lt, random_teacher, run_dir, **REFERENCE), run_dir.parent / "logs"
    ).finish()
    assert done.returncode == 0, done.describe()
    return {"run_dir": run_dir, "weights": final_weights(run_dir), "stdout": done.stdout}
