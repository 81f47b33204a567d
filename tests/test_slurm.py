"""The batch scripts in slurm/ on a real single-node SLURM (slurmctld + slurmd, see slurm_cluster.py).

Three groups:

* the harness itself (gloo all_reduce across two srun tasks; daemons stopped by PID);
* the scripts' contract with the trainer, checked with a stand-in interpreter (``PYTHON=``) that
  records how it was launched and exits as told: argument and environment passing, rendezvous,
  exit status 75 -> ``scontrol requeue``;
* the real trainer on the embedded digits with a tiny model, two tasks on CPU: a complete run, and
  a run signalled mid-way that is requeued, resumes and ends where the uninterrupted run ends.

Jobs get ``--gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 --overcommit`` on the sbatch
command line, which overrides the scripts' GPU resources for this CPU-only node.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from slurm_cluster import (
    JobEnd,
    SlurmCluster,
    process_alive,
    require_slurm,
    running_cluster,
    slurm_cluster_fixture,  # noqa: F401  (provides the session fixture `slurm_cluster`)
    unavailable_reason,
)

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
CPU_LAYOUT = ("--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--overcommit")
STANDIN_JOB_TIMEOUT_S = 90
REQUEUE_JOB_TIMEOUT_S = 180  # a requeued job waits ~10-15 s before it may start again
TRAINER_JOB_TIMEOUT_S = 600


# ------------------------------------------------------------------------------------ stand-in

STANDIN = '''#!{python}
"""Stands in for the trainer's interpreter: records how the batch script launched it.

STANDIN_MODE: an exit status (default 0), or "save-on-signal": on the first attempt wait for
SIGUSR1/SIGTERM and exit 75 as the trainer does; on later attempts exit 0.
Anything but the trainer (`-m deitlt_scale.cli`), such as the scripts' rendezvous rule, runs on
the real interpreter.
"""
import json, os, signal, sys, time
from pathlib import Path

if sys.argv[1:3] != ["-m", "deitlt_scale.cli"]:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])

out = Path(os.environ["STANDIN_OUT"])
attempt = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
rank = int(os.environ["SLURM_PROCID"])
keys = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_ID", "MASTER_ADDR",
        "MASTER_PORT", "MLFLOW_TRACKING_URI", "OMP_NUM_THREADS", "PYTHONUNBUFFERED")
record = {{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {{k: os.environ.get(k) for k in keys}}}}
(out / f"attempt{{attempt}}-rank{{rank}}.json").write_text(json.dumps(record))
mode = os.environ.get("STANDIN_MODE", "0")
if mode == "save-on-signal":
    if attempt > 0:
        sys.exit(0)
    received = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda s, f: received.append(signal.Signals(s).name))
    (out / f"waiting-rank{{rank}}").touch()
    deadline = time.monotonic() + 120
    while not received and time.monotonic() < deadline:
        time.sleep(0.05)
    print(f"stand-in rank {{rank}} received {{received}}", flush=True)
    sys.exit(75 if received else 1)
sys.exit(int(mode))
'''


@dataclass(frozen=True)
class StandIn:
    program: Path  # give it as PYTHON=
    out: Path  # where it writes attempt<N>-rank<R>.json

    def env(self, **extra: str) -> dict[str, str]:
        return {"PYTHON": str(self.program), "STANDIN_OUT": str(self.out), **extra}

    def records(self, attempt: int = 0) -> dict[int, dict]:
        """rank -> {"argv", "cwd", "env"} of one attempt."""
        found = sorted(self.out.glob(f"attempt{attempt}-rank*.json"))
        return {int(p.stem.rsplit("rank", 1)[1]): json.loads(p.read_text()) for p in found}


def make_standin(directory: Path) -> StandIn:
    program = directory / "standin.py"
    program.write_text(STANDIN.format(python=sys.executable))
    program.chmod(0o755)
    out = directory / "records"
    out.mkdir()
    return StandIn(program, out)


@pytest.fixture
def standin(tmp_path: Path) -> StandIn:
    return make_standin(tmp_path)


def submit(
    cluster: SlurmCluster,
    script: str,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    options: tuple[str, ...] = CPU_LAYOUT,
    cwd: Path = REPO,
) -> int:
    """``sbatch`` one of slurm/*.sh from ``cwd`` (the repository, as the docs say)."""
    return cluster.sbatch(SLURM_DIR / script, args, env=env, options=options, cwd=cwd)


def assert_completed(end: JobEnd, restarts: int = 0) -> None:
    assert (end.state, end.exit_code, end.restarts) == ("COMPLETED", 0, restarts), end.report


# ------------------------------------------------------------------------------------ harness


@pytest.mark.slow
def test_gloo_all_reduce_spans_two_srun_tasks_meeting_at_the_first_host(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    program = (
        "import os, torch, torch.distributed as d\n"
        "d.init_process_group('gloo', rank=int(os.environ['SLURM_PROCID']),"
        " world_size=int(os.environ['SLURM_NTASKS']))\n"
        "t = torch.tensor([float(d.get_rank() + 1)])\n"
        "d.all_reduce(t)\n"
        "print(f'rank {d.get_rank()} of {d.get_world_size()}: sum {t.item():g}', flush=True)\n"
        "d.destroy_process_group()\n"
    )
    script = tmp_path / "gloo.sh"
    script.write_text(
        "#!/bin/bash\n"
        'source "$DEITLT_HOME/slurm/common.sh"\n'
        "deitlt_init\n"
        'deitlt_run srun "$PYTHON" -c "$GLOO_PROGRAM"\n'
    )
    env = {"DEITLT_HOME": str(REPO), "PYTHON": sys.executable, "GLOO_PROGRAM": program}
    job = slurm_cluster.sbatch(script, env=env, options=CPU_LAYOUT)
    end = slurm_cluster.wait_for_end(job, STANDIN_JOB_TIMEOUT_S)
    assert_completed(end)
    sums = sorted(re.findall(r"^rank (\d) of 2: sum (\S+)$", end.output, re.MULTILINE))
    assert sums == [("0", "3"), ("1", "3")], end.report
    assert f"MASTER_ADDR={slurm_cluster.hostname} " in end.output, end.report


def test_cluster_daemons_are_stopped_by_pid_when_the_body_raises(tmp_path: Path) -> None:
    require_slurm()
    pids: dict[str, int] = {}
    with pytest.raises(RuntimeError, match="body failed"), running_cluster(tmp_path) as cluster:
        pids.update(cluster.pids)
        raise RuntimeError("body failed")
    assert sorted(pids) == ["munged", "slurmctld", "slurmd"]
    assert [name for name, pid in pids.items() if process_alive(pid)] == []


def test_without_root_the_reason_slurm_cannot_start_says_so(monkeypatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert unavailable_reason() == (
        "not root (the test cluster runs munged, slurmctld and slurmd as root)"
    )


def test_without_slurm_or_apt_the_reason_names_what_is_missing(monkeypatch) -> None:
    import slurm_cluster

    monkeypatch.setattr(slurm_cluster, "_which", lambda name: None)
    reason = slurm_cluster.ensure_installed()
    assert reason is not None and reason.endswith("missing and no apt-get to install SLURM")
    assert "\n" not in reason


# ------------------------------------------------------------------------------------ contract


def test_script_outside_slurm_exits_2_with_one_line_saying_to_use_sbatch() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(
        ["bash", str(SLURM_DIR / "inat18_deitlt_b.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "submit it with sbatch" in done.stderr, done.stderr


@pytest.mark.slow
def test_batch_script_launches_the_trainer_in_every_task_with_env_overrides_then_args(
    slurm_cluster: SlurmCluster, standin: StandIn, tmp_path: Path
) -> None:
    env = standin.env(
        RECIPE="recipes/tiny_digits.yaml",
        DATA=str(tmp_path / "shards"),
        RUN_DIR=str(tmp_path / "run"),
        DEVICE="cpu",
    )
    job = submit(slurm_cluster, "inat18_deitlt_b.sh", ("optim.lr=0.1", "train.epochs=2"), env)
    end = slurm_cluster.wait_for_end(job, STANDIN_JOB_TIMEOUT_S)
    assert_completed(end)
    expected = [
        "-m",
        "deitlt_scale.cli",
        "train",
        "recipes/tiny_digits.yaml",
        f"data.shards={tmp_path / 'shards'}",
        f"runtime.run_dir={tmp_path / 'run'}",
        "runtime.device=cpu",
        "data.device=cpu",
        "optim.lr=0.1",
        "train.epochs=2",
    ]
    records = standin.records()
    assert sorted(records) == [0, 1], end.report
    assert [r["argv"] for r in records.values()] == [expected, expected], end.report
    assert {r["cwd"] for r in records.values()} == {str(REPO)}


@pytest.mark.slow
def test_batch_script_exports_rendezvous_at_first_host_on_a_port_from_the_job_id(
    slurm_cluster: SlurmCluster, standin: StandIn
) -> None:
    env = standin.env(MASTER_ADDR="stale-host", MASTER_PORT="1")  # ignored: computed per job
    job = submit(slurm_cluster, "inat18_deitlt_b.sh", env=env)
    end = slurm_cluster.wait_for_end(job, STANDIN_JOB_TIMEOUT_S)
    assert_completed(end)
    envs = [r["env"] for r in standin.records().values()]
    assert [(e["SLURM_PROCID"], e["SLURM_NTASKS"]) for e in envs] == [("0", "2"), ("1", "2")]
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {
        (slurm_cluster.hostname, str(10000 + job % 20000))
    }, end.report
    # --cpus-per-task unless the submitting shell chose a thread count itself
    assert {e["OMP_NUM_THREADS"] for e in envs} == {os.environ.get("OMP_NUM_THREADS", "1")}


@pytest.mark.slow
def test_dry_run_env_passes_dry_run_after_the_overrides(
    slurm_cluster: SlurmCluster, standin: StandIn
) -> None:
    job = submit(slurm_cluster, "inat18_deitlt_b.sh", ("optim.lr=0.1",), standin.env(DRY_RUN="1"))
    end = slurm_cluster.wait_for_end(job, STANDIN_JOB_TIMEOUT_S)
    assert_completed(end)
    argv = standin.records()[0]["argv"]
    assert argv[-2:] == ["optim.lr=0.1", "--dry-run"], end.report


@pytest.mark.slow
def test_batch_script_finds_the_repository_from_deitlt_home_when_submitted_elsewhere(
    slurm_cluster: SlurmCluster, standin: StandIn, tmp_path: Path
) -> None:
    env = standin.env(DEITLT_HOME=str(REPO))
    job = submit(slurm_cluster, "inat18_deitlt_b.sh", env=env, cwd=tmp_path)
    end = slurm_cluster.wait_for_end(job, STANDIN_JOB_TIMEOUT_S)
    assert_completed(end)
    assert standin.records()[0]["cwd"] == str(REPO)


DEFAULT_COMMANDS = {
    # id: (script, environment, arguments, expected command after `python -m deitlt_scale.cli`)
    "inat18": ("inat18_deitlt_b.sh", {}, (), ["train", "recipes/inat18_deitlt_b.yaml"]),
    "imagenetlt": ("imagenetlt_deitlt_b.sh", {}, (), ["train", "recipes/imagenetlt_deitlt_b.yaml"]),
    "cifar10-r100": ("cifar_lt.sh", {}, (), ["train", "recipes/cifar10lt_r100.yaml"]),
    "cifar100-r50": (
        "cifar_lt.sh",
        {"DATASET": "cifar100", "RHO": "50"},
        (),
        ["train", "recipes/cifar100lt_r50.yaml"],
    ),
    "teacher": ("teacher_sam.sh", {}, (), ["teacher", "train", "recipes/teacher_digits.yaml"]),
    "pretrain": ("pretrain_mae.sh", {}, (), ["pretrain", "recipes/mae_imagenetlt_b.yaml"]),
    "pretrain-inat18": (
        "pretrain_mae.sh",
        {"DATASET": "inat18"},
        (),
        ["pretrain", "recipes/mae_inat18_b.yaml"],
    ),
    "prepare": (
        "prepare_data.sh",
        {},
        ("digits-lt", "--out", "data/x"),
        ["data", "prepare", "digits-lt", "--out", "data/x"],
    ),
}


@pytest.fixture(scope="module")
def default_command_jobs(
    slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[int, StandIn]]:
    """One job per DEFAULT_COMMANDS case, all submitted at once: one task each, so two run at a
    time on the two CPUs."""
    one_task = ("--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1")
    jobs = {}
    for case, (script, env, args, _) in DEFAULT_COMMANDS.items():
        standin = make_standin(tmp_path_factory.mktemp(case))
        jobs[case] = (submit(slurm_cluster, script, args, standin.env(**env), one_task), standin)
    return jobs


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DEFAULT_COMMANDS))
def test_each_script_runs_its_command_with_its_default_recipe(
    slurm_cluster: SlurmCluster, default_command_jobs: dict[str, tuple[int, StandIn]], case: str
) -> None:
    job, standin = default_command_jobs[case]
    end = slurm_cluster.wait_for_end(job, STANDIN_JOB_TIMEOUT_S)
    assert_completed(end)
    records = standin.records()
    command = ["-m", "deitlt_scale.cli", *DEFAULT_COMMANDS[case][3]]
    assert records, end.report
    assert all(r["argv"] == command for r in records.values()), end.report


@pytest.mark.slow
def test_cifar_script_rejects_an_unknown_dataset_with_one_line(
    slurm_cluster: SlurmCluster, standin: StandIn
) -> None:
    job = submit(slurm_cluster, "cifar_lt.sh", env=standin.env(DATASET="svhn"))
    end = slurm_cluster.wait_for_end(job, STANDIN_JOB_TIMEOUT_S)
    assert (end.state, end.exit_code) == ("FAILED", 2), end.report
    assert "error: DATASET=svhn: use cifar10 or cifar100" in end.output
    assert standin.records() == {}


@pytest.mark.slow
@pytest.mark.parametrize("to_batch_shell", [False, True], ids=["tasks", "batch-shell"])
def test_exit_75_after_usr1_requeues_the_job_which_completes_on_restart(
    slurm_cluster: SlurmCluster, standin: StandIn, to_batch_shell: bool
) -> None:
    """``scancel --signal=USR1`` reaches the tasks; with ``--batch`` only the batch shell, which
    must survive it and forward it to srun."""
    job = submit(
        slurm_cluster, "inat18_deitlt_b.sh", env=standin.env(STANDIN_MODE="save-on-signal")
    )
    slurm_cluster.wait_until(
        lambda: len(list(standin.out.glob("waiting-rank*"))) == 2,
        STANDIN_JOB_TIMEOUT_S,
        "both tasks to wait for a signal",
        job,
    )
    slurm_cluster.signal(job, "USR1", batch=to_batch_shell)
    end = slurm_cluster.wait_for_end(job, REQUEUE_JOB_TIMEOUT_S)
    assert_completed(end, restarts=1)
    assert end.output.count("received ['SIGUSR1']") == 2, end.report
    assert f"scontrol requeue {job}, restart 1" in end.output
    first, second = standin.records(0), standin.records(1)
    assert sorted(second) == [0, 1], end.report
    assert second[0]["env"]["MASTER_PORT"] == first[0]["env"]["MASTER_PORT"]


@pytest.mark.slow
def test_exit_75_after_scancel_leaves_the_job_cancelled(
    slurm_cluster: SlurmCluster, standin: StandIn
) -> None:
    """``scancel JOB``: the tasks get SIGTERM, save and exit 75 while the job is completing;
    SLURM would accept a requeue then, so the script must not ask for one."""
    job = submit(
        slurm_cluster, "inat18_deitlt_b.sh", env=standin.env(STANDIN_MODE="save-on-signal")
    )
    slurm_cluster.wait_until(
        lambda: len(list(standin.out.glob("waiting-rank*"))) == 2,
        STANDIN_JOB_TIMEOUT_S,
        "both tasks to wait for a signal",
        job,
    )
    slurm_cluster.run(["scancel", str(job)])
    end = slurm_cluster.wait_for_end(job, STANDIN_JOB_TIMEOUT_S)
    assert (end.state, end.restarts) == ("CANCELLED", 0), end.report
    assert end.output.count("received ['SIGTERM'") == 2, end.report
    assert "but the job is ending (JobState=COMPLETING" in end.output, end.report
    assert standin.records(1) == {}


@pytest.mark.slow
def test_exit_status_other_than_75_fails_the_job_without_requeue(
    slurm_cluster: SlurmCluster, standin: StandIn
) -> None:
    job = submit(slurm_cluster, "inat18_deitlt_b.sh", env=standin.env(STANDIN_MODE="3"))
    end = slurm_cluster.wait_for_end(job, STANDIN_JOB_TIMEOUT_S)
    assert (end.state, end.exit_code, end.restarts) == ("FAILED", 3, 0), end.report


@pytest.mark.slow
def test_exit_75_beyond_max_restarts_fails_the_job_instead_of_requeueing(
    slurm_cluster: SlurmCluster, standin: StandIn
) -> None:
    env = standin.env(STANDIN_MODE="75", MAX_RESTARTS="0")
    job = submit(slurm_cluster, "inat18_deitlt_b.sh", env=env)
    end = slurm_cluster.wait_for_end(job, STANDIN_JOB_TIMEOUT_S)
    assert (end.state, end.exit_code, end.restarts) == ("FAILED", 75, 0), end.report
    assert "MAX_RESTARTS=0" in end.output


# ------------------------------------------------------------------------------------ trainer
#
# What these tests read from the trainer (its contract with the scripts):
# * a complete checkpoint is a directory holding a file named COMPLETE; the last integer in the
#   directory's name is the optimizer step it was taken after;
# * with train.log_every=1 every optimizer step logs its loss to MLflow at that step;
# * an evaluation table: a text file under the run directory with "eval" in its path (e.g.
#   eval/table.txt) naming the Head and Tail groups;
# * on resume it prints a line containing "resum" and the step it resumes from.

TINY_OVERRIDES = (
    "distill.type=none",  # no teacher: the tests are about launching and requeueing
    "teacher.path=",
    "distill.drw_epoch=null",
    "train.epochs=4",
    "schedule.warmup_epochs=1",
    "train.log_every=1",
    "checkpoint.every_epochs=1",
    "checkpoint.keep_last=100",  # keep every checkpoint, so the test can read the signal one
    "eval.every_epochs=4",
)


@pytest.fixture(scope="module")
def digits_lt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deitlt_scale.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "digits-lt"
    prepare_dataset("digits-lt", out=out)
    return out


@dataclass(frozen=True)
class TinyRun:
    end: JobEnd
    run_dir: Path
    tracking_uri: str


def tiny_env(digits: Path, root: Path) -> dict[str, str]:
    return {
        "RECIPE": "recipes/tiny_digits.yaml",
        "DATA": str(digits),
        "RUN_DIR": str(root / "run"),
        "DEVICE": "cpu",
        "PYTHON": sys.executable,
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def complete_checkpoints(run_dir: Path) -> dict[int, Path]:
    """step -> checkpoint directory, for every directory holding a COMPLETE marker."""
    found = {}
    for marker in run_dir.rglob("COMPLETE"):
        numbers = re.findall(r"\d+", marker.parent.name)
        if marker.is_file() and numbers:
            found[int(numbers[-1])] = marker.parent
    return found


def loss_steps(tracking_uri: str) -> tuple[int, list[int]]:
    """(number of runs, steps of the most-logged loss metric of the only run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    if len(runs) != 1:
        return len(runs), []
    run = runs[0]
    keys = [k for k in run.data.metrics if "loss" in k.lower()]
    histories = [client.get_metric_history(run.info.run_id, k) for k in keys]
    longest = max(histories, key=len, default=[])
    return 1, sorted(m.step for m in longest)


@pytest.fixture(scope="module")
def uninterrupted(
    slurm_cluster: SlurmCluster, digits_lt: Path, tmp_path_factory: pytest.TempPathFactory
) -> TinyRun:
    root = tmp_path_factory.mktemp("uninterrupted")
    env = tiny_env(digits_lt, root)
    job = submit(slurm_cluster, "inat18_deitlt_b.sh", TINY_OVERRIDES, env)
    end = slurm_cluster.wait_for_end(job, TRAINER_JOB_TIMEOUT_S)
    return TinyRun(end, Path(env["RUN_DIR"]), env["MLFLOW_TRACKING_URI"])


@dataclass(frozen=True)
class RequeuedRun(TinyRun):
    signal_step: int  # the newest complete checkpoint when the job asked to be requeued


@pytest.fixture(scope="module")
def requeued(
    slurm_cluster: SlurmCluster,
    digits_lt: Path,
    tmp_path_factory: pytest.TempPathFactory,
    uninterrupted: TinyRun,  # runs first, so the two jobs do not share the two CPUs
) -> RequeuedRun:
    root = tmp_path_factory.mktemp("requeued")
    env = tiny_env(digits_lt, root)
    run_dir = Path(env["RUN_DIR"])
    job = submit(slurm_cluster, "inat18_deitlt_b.sh", TINY_OVERRIDES, env)
    # Signal once the first epoch's checkpoint exists: training is under way, far from the end.
    slurm_cluster.wait_until(
        lambda: bool(complete_checkpoints(run_dir)),
        TRAINER_JOB_TIMEOUT_S,
        "the first complete checkpoint",
        job,
    )
    slurm_cluster.signal(job, "USR1")
    slurm_cluster.wait_until(
        lambda: "exit status 75" in slurm_cluster.output(job),
        TRAINER_JOB_TIMEOUT_S,
        "the trainer to exit 75 and the script to requeue",
        job,
    )
    signal_step = max(complete_checkpoints(run_dir))
    end = slurm_cluster.wait_for_end(job, TRAINER_JOB_TIMEOUT_S)
    return RequeuedRun(end, run_dir, env["MLFLOW_TRACKING_URI"], signal_step)


def final_step(run: TinyRun) -> int:
    steps = complete_checkpoints(run.run_dir)
    assert steps, f"no complete checkpoint under {run.run_dir}\n{run.end.report}"
    return max(steps)


@pytest.mark.slow
def test_tiny_run_job_completes(uninterrupted: TinyRun) -> None:
    assert_completed(uninterrupted.end)


@pytest.mark.slow
def test_tiny_run_leaves_a_complete_checkpoint(uninterrupted: TinyRun) -> None:
    assert final_step(uninterrupted) > 0


@pytest.mark.slow
def test_tiny_run_writes_an_eval_table_with_head_and_tail(uninterrupted: TinyRun) -> None:
    run_dir = uninterrupted.run_dir
    tables = [
        p
        for p in run_dir.rglob("*")
        if p.is_file()
        and "eval" in str(p.relative_to(run_dir)).lower()
        and p.suffix in (".txt", ".md", ".csv", ".json")
    ]
    texts = [p.read_text(errors="replace").lower() for p in tables]
    assert any("head" in t and "tail" in t for t in texts), (
        f"no eval table among {tables}\n{uninterrupted.end.report}"
    )


@pytest.mark.slow
def test_tiny_run_records_one_mlflow_run_with_a_loss_per_step(uninterrupted: TinyRun) -> None:
    runs, steps = loss_steps(uninterrupted.tracking_uri)
    assert runs == 1, uninterrupted.end.report
    assert len(steps) == final_step(uninterrupted), uninterrupted.end.report


@pytest.mark.slow
def test_signalled_job_is_requeued_once_and_completes(requeued: RequeuedRun) -> None:
    assert_completed(requeued.end, restarts=1)


@pytest.mark.slow
def test_signalled_job_saves_a_checkpoint_mid_run(
    requeued: RequeuedRun, uninterrupted: TinyRun
) -> None:
    assert 0 < requeued.signal_step < final_step(uninterrupted), requeued.end.report


@pytest.mark.slow
def test_requeued_run_ends_at_the_uninterrupted_step_count(
    requeued: RequeuedRun, uninterrupted: TinyRun
) -> None:
    assert final_step(requeued) == final_step(uninterrupted), requeued.end.report


@pytest.mark.slow
def test_requeued_run_resumes_from_the_checkpoint_saved_on_the_signal(
    requeued: RequeuedRun,
) -> None:
    restart = requeued.end.output.split("restart 1 on", 1)[-1]
    resume_lines = [
        line
        for line in restart.splitlines()
        if "resum" in line.lower() and requeued.signal_step in map(int, re.findall(r"\d+", line))
    ]
    assert resume_lines, f"no resume line naming step {requeued.signal_step}\n{requeued.end.report}"


@pytest.mark.slow
def test_requeued_run_trains_each_step_once_in_one_mlflow_run(
    requeued: RequeuedRun, uninterrupted: TinyRun
) -> None:
    runs, steps = loss_steps(requeued.tracking_uri)
    assert runs == 1, requeued.end.report  # the same MLflow run continues after the requeue
    _, expected = loss_steps(uninterrupted.tracking_uri)
    assert steps == expected, requeued.end.report  # no step repeated, none skipped


@pytest.mark.slow
def test_dry_run_builds_the_job_and_exits_0_before_step_one(
    slurm_cluster: SlurmCluster, digits_lt: Path, tmp_path: Path
) -> None:
    env = {**tiny_env(digits_lt, tmp_path), "DRY_RUN": "1"}
    job = submit(slurm_cluster, "inat18_deitlt_b.sh", TINY_OVERRIDES, env)
    end = slurm_cluster.wait_for_end(job, TRAINER_JOB_TIMEOUT_S)
    assert_completed(end)
    assert "world" in end.output.lower(), end.report  # the printed layout
    assert complete_checkpoints(tmp_path / "run") == {}, end.report
