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


# --------------------------------------------------------------------------------------------
# Shared tiny data for the training tests: the real embedded dataset, prepared once per session.


@pytest.fixture(scope="session")
def digits_lt(tmp_path_factory: pytest.TempPathFactory):
    """The embedded long-tailed digits, prepared with small shards (several per split)."""
    from deitlt_scale.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("digits") / "digits-lt"
    prepare_dataset("digits-lt", out=out, shard_size="64KB", progress=False)
    return out


@pytest.fixture(scope="session")
def random_teacher(tmp_path_factory: pytest.TempPathFactory):
    """A real teacher file (ResNet-32, random weights) for the 10 digit classes at 32 px."""
    import torch

    from deitlt_scale.models.teacher_file import TeacherInfo, save_teacher
    from deitlt_scale.models.teachers import create_teacher_arch

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    model = create_teacher_arch("resnet32", 10)
    save_teacher(out, model, TeacherInfo("resnet32", 10, 32, label_space="model"))
    return out


@pytest.fixture(scope="module")
def world():
    """One process group for the trainers built inside a test module; the launcher variables
    are restored after."""
    import torch

    from deitlt_scale.engine.distributed import init_distributed, shutdown_distributed

    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    created = not torch.distributed.is_initialized()
    yield init_distributed("cuda" if torch.cuda.is_available() else "cpu")
    if created:
        shutdown_distributed()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
