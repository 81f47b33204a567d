"""The teacher batch scripts (slurm/teacher_cifar.sh, slurm/teacher_large.sh) on the real
single-node SLURM of slurm_cluster.py, with the stand-in interpreter of test_slurm.py: each picks
its recipe from METHOD / DATASET / RHO, and refuses unknown values with one line."""

from __future__ import annotations

import pytest
from slurm_cluster import SlurmCluster, slurm_cluster_fixture  # noqa: F401  (session fixture)
from test_slurm import STANDIN_JOB_TIMEOUT_S, StandIn, assert_completed, make_standin, submit

ONE_TASK = ("--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1", "--overcommit")

CASES = {
    # id: (script, environment, expected command after `python -m deitlt_scale.cli`)
    "cifar-default": ("teacher_cifar.sh", {}, "recipes/teacher_ldsam_cifar10lt_r100.yaml"),
    "cifar100-r50": (
        "teacher_cifar.sh",
        {"DATASET": "cifar100-lt", "RHO": "50"},
        "recipes/teacher_ldsam_cifar100lt_r50.yaml",
    ),
    "paco-cifar100": (
        "teacher_cifar.sh",
        {"METHOD": "paco", "DATASET": "cifar100"},
        "recipes/teacher_paco_cifar100lt_r100.yaml",
    ),
    "large-default": ("teacher_large.sh", {}, "recipes/teacher_ldsam_imagenetlt.yaml"),
    "paco-inat": (
        "teacher_large.sh",
        {"METHOD": "paco", "DATASET": "inat18"},
        "recipes/teacher_paco_inat18.yaml",
    ),
}

REFUSED = {
    # id: (script, environment, the one-line error)
    "paco-r50": (
        "teacher_cifar.sh",
        {"METHOD": "paco", "RHO": "50"},
        "PaCo recipes exist for RHO=100 only",
    ),
    "method": ("teacher_large.sh", {"METHOD": "bbn"}, "error: METHOD=bbn: use ldsam or paco"),
    "dataset": (
        "teacher_large.sh",
        {"DATASET": "places"},
        "error: DATASET=places: use imagenetlt or inat18",
    ),
}


@pytest.fixture(scope="module")
def jobs(
    slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[int, StandIn]]:
    """All cases submitted at once, one task each."""
    out = {}
    for case, (script, env, *_) in {**CASES, **REFUSED}.items():
        standin = make_standin(tmp_path_factory.mktemp(case))
        job = submit(slurm_cluster, script, ("optim.lr=0.01",), standin.env(**env), ONE_TASK)
        out[case] = (job, standin)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_teacher_script_launches_the_recipe_its_environment_names(
    slurm_cluster: SlurmCluster, jobs: dict[str, tuple[int, StandIn]], case: str
) -> None:
    """What the batch script launches, read by the stand-in interpreter that records its argv
    instead of training (real training jobs under SLURM are test_slurm.py's and
    test_experiments_slurm.py's)."""
    job, standin = jobs[case]
    end = slurm_cluster.wait_for_end(job, STANDIN_JOB_TIMEOUT_S)
    assert_completed(end)
    records = standin.records()
    expected = ["-m", "deitlt_scale.cli", "teacher", "train", CASES[case][2], "optim.lr=0.01"]
    assert records and all(r["argv"] == expected for r in records.values()), end.report


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REFUSED))
def test_teacher_script_refuses_an_unknown_choice_with_one_line(
    slurm_cluster: SlurmCluster, jobs: dict[str, tuple[int, StandIn]], case: str
) -> None:
    job, standin = jobs[case]
    end = slurm_cluster.wait_for_end(job, STANDIN_JOB_TIMEOUT_S)
    assert (end.state, end.exit_code) == ("FAILED", 2), end.report
    assert REFUSED[case][2] in end.output
    assert standin.records() == {}
