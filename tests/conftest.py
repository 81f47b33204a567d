"""Shared test policy.

* Tests marked ``gpu`` skip without CUDA; they are the only tests allowed to skip in CI.
* With ``CI=true`` the session fails when any other test skips, so that a missing dependency
  can never turn a real test into a silent skip.
"""

from __future__ import annotations

import os

import pytest

_unexpected_skips: list[str] = []


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "gpu" not in report.keywords:
        _unexpected_skips.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and _unexpected_skips:
        print("\nCI forbids skips outside tests marked gpu; these skipped:")
        for nodeid in _unexpected_skips:
            print(f"  {nodeid}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
