"""The one rendezvous rule (deitlt_scale/engine/rendezvous.py) as both of its users see it.

The batch shell (slurm/common.sh, ``deitlt_init``) runs the rule as a program and exports
MASTER_ADDR/MASTER_PORT; the trainer (``detect_launch``) imports it. For the same SLURM
environment both must give the same answer, and both must refuse the same bad input.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import require_slurm

from deitlt_scale.engine import distributed
from deitlt_scale.engine.rendezvous import RendezvousError, first_host, master_port

REPO = Path(__file__).resolve().parents[1]

NODELISTS = [
    "gpu[003-006,010],cpu01",
    "rack[2-3]-node[07-08]",
    "n1,n2",
    "a.b-c",
    "node[01-02]",
    "dgx-a100-[9-12]",
    "c[100-101,200],login1",
]


def slurm_env(**values: str) -> dict[str, str]:
    """A task's environment under srun, without this process's own SLURM/MASTER variables."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MASTER_", "DEITLT_MASTER_", "RANK", "WORLD_SIZE"))
    }
    task = {
        "SLURM_JOB_ID": "4321",
        "SLURM_JOB_NODELIST": "gpu[003-004]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_NTASKS": "8",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_ID": "0",
    }
    return {**base, **task, **values}


def shell_rendezvous(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``deitlt_init`` of slurm/common.sh in ``env``; its last line is "ADDR PORT"."""
    script = f'source "{REPO}/slurm/common.sh"; deitlt_init; echo "$MASTER_ADDR $MASTER_PORT"'
    env = {**env, "DEITLT_HOME": str(REPO), "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60
    )


def python_rendezvous(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> tuple[str, int]:
    monkeypatch.setattr(os, "environ", env)
    launch = distributed.detect_launch()
    assert launch.launcher == "slurm"
    return launch.master_addr, launch.master_port


@pytest.mark.parametrize("nodelist", NODELISTS)
def test_first_host_is_the_first_host_scontrol_expands(nodelist: str, tmp_path: Path) -> None:
    require_slurm()
    conf = tmp_path / "slurm.conf"  # scontrol needs a configuration, not a controller
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\n")
    done = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist],
        env={**os.environ, "SLURM_CONF": str(conf)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert first_host(nodelist) == done.stdout.split()[0]


def test_port_is_10000_plus_job_id_modulo_20000() -> None:
    assert [master_port(j) for j in (0, 4321, 19999, 20000, 54321)] == [
        10000,
        14321,
        29999,
        10000,
        24321,
    ]


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"SLURM_JOB_ID": "987654", "SLURM_JOB_NODELIST": "rack[2-3]-node[07-08]"},
        {"MASTER_ADDR": "stale-host", "MASTER_PORT": "1"},  # from the submitting shell: ignored
        {"DEITLT_MASTER_ADDR": "gpu003-ib0", "DEITLT_MASTER_PORT": "31337"},
    ],
    ids=["plain", "two-groups", "stale-master", "overrides"],
)
def test_batch_shell_and_trainer_agree_on_the_rendezvous(
    extra: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = slurm_env(**extra)
    shell = shell_rendezvous(env)
    assert shell.returncode == 0, shell.stderr
    addr, port = shell.stdout.splitlines()[-1].split()
    assert (addr, int(port)) == python_rendezvous(env, monkeypatch)


def test_both_sides_give_the_expected_rendezvous_for_a_plain_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert python_rendezvous(slurm_env(), monkeypatch) == ("gpu003", 14321)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"SLURM_JOB_NODELIST": "gpu[003-"}, "is not a SLURM host list"),
        ({"DEITLT_MASTER_PORT": "70000"}, "DEITLT_MASTER_PORT='70000': use a TCP port number"),
    ],
    ids=["bad-nodelist", "bad-port"],
)
def test_both_sides_refuse_the_same_bad_input_in_one_line(
    extra: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = slurm_env(**extra)
    shell = shell_rendezvous(env)
    assert shell.returncode == 2
    assert message in shell.stderr
    assert "deitlt[slurm]: error: no rendezvous for this job" in shell.stderr
    with pytest.raises(RendezvousError, match=message.replace("[", r"\[")):
        python_rendezvous(env, monkeypatch)
