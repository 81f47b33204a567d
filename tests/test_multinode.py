"""The batch scripts on a real two-node SLURM: slurmctld and two slurmd, each node in its own
network namespace with its own hostname and address, joined by a bridge (slurm_cluster.py,
MultiNodeCluster). The repository and the run directories are the same files on both nodes, as on
a shared file system.

What only multi-node jobs do, end to end with slurm/inat18_deitlt_b.sh and the real trainer on the
embedded digits (tiny student, the random ResNet-32 teacher, CPU, gloo):

* the rendezvous at the first node of the allocation, node-local ranks, and a checkpoint that
  processes on two hosts write into one directory;
* 2 nodes x 1 process end with bitwise the weights of 1 node x 2 processes (same ranks, same
  data, same reduction order on the same CPU);
* a node whose every process is SIGKILLed mid-run: SLURM declares it DOWN and requeues the job
  (``#SBATCH --requeue``); when the node is back, the job resumes from the last complete
  checkpoint;
* that job preempted (``scancel``: SIGTERM to every task) and resubmitted on one node with 2
  processes (ends with the uninterrupted weights) or with 1 process (through the universal
  checkpoint; the step count and the lr of every step are the uninterrupted run's);
* ``DRY_RUN=1`` prints every task's host, rank, local rank and resolved rendezvous.

Jobs run side by side where they can (each node declares 4 CPUs for 2 real cores): the one-node
reference runs on node01 while node02 dies, the other references start once node02 is back.
"""

from __future__ import annotations

import re
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from slurm_cluster import (
    SUBNET,
    JobEnd,
    MultiNodeCluster,
    NodeNetwork,
    netns_namespaces,
    process_alive,
    require_slurm,
    running_multinode_cluster,
)

from deitlt_scale.engine import checkpoint
from deitlt_scale.engine.rendezvous import master_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "inat18_deitlt_b.sh"
JOB_TIMEOUT_S = 400  # one tiny run, several sharing two cores
NODE_DOWN_TIMEOUT_S = 60  # SlurmdTimeout=10 plus a ping interval or two
STEP_LINE = re.compile(r"^\[step (\d+)/(\d+)\] .*\blr=(\S+)", re.MULTILINE)
ATTEMPT_LINE = re.compile(r"^deitlt\[slurm\]: job \d+ .* restart (\d+) on ", re.MULTILINE)

# An epoch is floor(405 / 64) * 64 = 384 images (data.epoch_multiple=64): 6 steps of 2 x 32
# images on two processes, or of 32 x 2 accumulated on one.
EPOCHS, STEPS_PER_EPOCH = 3, 6
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH

pytestmark = pytest.mark.slow


def tiny_overrides(teacher: Path, **extra: object) -> tuple[str, ...]:
    values: dict[str, object] = {
        "teacher.path": teacher,
        "model.embed_dim": 48,
        "model.depth": 2,
        "model.num_heads": 2,
        "train.epochs": EPOCHS,
        "train.micro_batch": 32,
        "data.epoch_multiple": 64,
        "train.log_every": 1,
        "schedule.warmup_epochs": 1,
        "distill.drw_epoch": 2,
        "checkpoint.every_epochs": 1,
        "checkpoint.keep_last": 100,  # every checkpoint stays for the assertions
        "eval.every_epochs": 100,  # evaluate once, at the end
        "data.num_threads": 1,
        "deepspeed.zero_stage": 1,  # the paper recipes': one optimizer-state shard per rank
        "tracking.enabled": "false",  # MLflow across requeues: tests/test_slurm.py
        **extra,
    }
    return tuple(f"{k}={v}" for k, v in values.items())


def layout(nodes: int, tasks_per_node: int) -> tuple[str, ...]:
    return (
        "--gpus-per-node=0",
        f"--nodes={nodes}",
        f"--ntasks-per-node={tasks_per_node}",
        "--cpus-per-task=1",
    )


def attempt_output(output: str, restart: int) -> str:
    """The part of a job's log written by one attempt (requeued attempts append to one log)."""
    parts = ATTEMPT_LINE.split(output)  # [before, "0", text0, "1", text1, ...]
    return dict(zip(parts[1::2], parts[2::2], strict=True)).get(str(restart), "")


@dataclass(frozen=True)
class Job:
    job_id: int
    run_dir: Path


@dataclass(frozen=True)
class Run:
    end: JobEnd
    run_dir: Path

    def attempt(self, restart: int) -> str:
        return attempt_output(self.end.output, restart)

    def lrs(self, restart: int | None = None) -> dict[int, str]:
        """step -> lr as rank 0 printed it (4 significant digits), of one attempt or all."""
        text = self.end.output if restart is None else self.attempt(restart)
        return {int(m.group(1)): m.group(3) for m in STEP_LINE.finditer(text)}

    def final_step(self) -> int:
        ref = checkpoint.latest_checkpoint(self.run_dir)
        assert ref is not None, f"no complete checkpoint in {self.run_dir}\n{self.end.report}"
        return ref.step


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from deitlt_scale.export import consolidate

    ref = checkpoint.latest_checkpoint(run_dir)
    assert ref is not None, f"no complete checkpoint in {run_dir}"
    state, _ = consolidate(ref.path)
    return state


def assert_same_weights(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert want.keys() == got.keys()
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert differ == [], f"{len(differ)} of {len(want)} tensors differ, e.g. {differ[:3]}"


def newest_step(run_dir: Path) -> int:
    ref = checkpoint.latest_checkpoint(run_dir)
    return ref.step if ref is not None else -1


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    require_slurm()  # namespaces that cannot be built fail in start(), never skip
    with running_multinode_cluster(tmp_path_factory.mktemp("multinode"), cpus=4) as c:
        yield c


class Submitter:
    def __init__(self, cluster: MultiNodeCluster, digits: Path, teacher: Path, root: Path):
        self.cluster, self.digits, self.teacher, self.root = cluster, digits, teacher, root

    def env(self, run_dir: Path, **extra: str) -> dict[str, str]:
        return {
            "RECIPE": "recipes/tiny_digits.yaml",
            "DATA": str(self.digits),
            "RUN_DIR": str(run_dir),
            "DEVICE": "cpu",
            "PYTHON": sys.executable,
            **extra,
        }

    def submit(
        self, name: str, nodes: int, tasks: int, *, run_dir: Path | None = None, **kw
    ) -> Job:
        run_dir = run_dir or self.root / name
        overrides = tiny_overrides(self.teacher, **kw.pop("overrides", {}))
        env = self.env(run_dir, **kw.pop("env", {}))
        options = (*layout(nodes, tasks), *kw.pop("options", ()))
        job = self.cluster.sbatch(SCRIPT, overrides, env=env, options=options, cwd=REPO)
        return Job(job, run_dir)

    def wait(self, job: Job) -> Run:
        return Run(self.cluster.wait_for_end(job.job_id, JOB_TIMEOUT_S), job.run_dir)


@pytest.fixture(scope="module")
def submitter(cluster, digits_lt, random_teacher, tmp_path_factory) -> Submitter:
    return Submitter(cluster, digits_lt, random_teacher, tmp_path_factory.mktemp("runs"))


@dataclass(frozen=True)
class NodeFailure:
    run: Run  # both attempts, the second ended by the preemption
    killed_pids: list[int]
    newest_at_kill: int  # the newest complete checkpoint when the node died
    state_after_kill: str  # the job's state once the node was declared DOWN
    node_state_after_kill: str
    preempted_at: int  # the step of the checkpoint the preempted trainer saved
    side_jobs: tuple[Job, Job, Job]  # one-node, two-node and dry-run references, started meanwhile


@pytest.fixture(scope="module")
def node_failure(cluster: MultiNodeCluster, submitter: Submitter) -> NodeFailure:
    """A 2-node run whose second node dies (SIGKILL to every process of it) after the first
    checkpoint; the node comes back, the job runs again and is then preempted. The references
    run meanwhile: the one-node run on the first node from the start (untouched by the failure
    of the second), the two-node run and the dry run once the second node is back."""
    first, victim = cluster.nodes
    one_node = submitter.submit("one-node", 1, 2, options=(f"--nodelist={first.name}",))
    job = submitter.submit("node-failure", 2, 1)
    run_dir = job.run_dir
    cluster.wait_until(
        lambda: newest_step(run_dir) >= STEPS_PER_EPOCH,
        JOB_TIMEOUT_S,
        "the first complete checkpoint",
        job.job_id,
    )
    killed = cluster.kill_node(victim)
    newest_at_kill = newest_step(run_dir)
    cluster.wait_until(
        lambda: cluster.node_states().get(victim.name, "").startswith("down"),
        NODE_DOWN_TIMEOUT_S,
        f"{victim.name} to be declared down",
    )
    node_state = cluster.node_states()[victim.name]
    cluster.wait_until(
        lambda: (
            cluster.job_fields(job.job_id).get("JobState") in ("PENDING", "FAILED", "NODE_FAIL")
        ),
        NODE_DOWN_TIMEOUT_S,
        "the job to leave its failed allocation",
    )
    state_after_kill = cluster.job_fields(job.job_id).get("JobState", "")
    cluster.start_slurmd(victim)  # the node is back: ReturnToService=2 puts it in service
    two_nodes = submitter.submit("two-nodes", 2, 1)
    dry_run = submitter.submit("dry-run", 2, 1, env={"DRY_RUN": "1"})
    # Preempt the requeued attempt as soon as it trains: mid-epoch, far from the end.
    cluster.wait_until(
        lambda: STEP_LINE.search(attempt_output(cluster.output(job.job_id), 1)) is not None,
        JOB_TIMEOUT_S,
        "the requeued attempt to train a step",
        job.job_id,
    )
    cluster.run(["scancel", str(job.job_id)])  # SIGTERM to the batch shell and every task
    end = cluster.wait_for_end(job.job_id, JOB_TIMEOUT_S)
    match = re.search(r"stopped at step (\d+) after a checkpoint", end.output)
    assert match, end.report
    return NodeFailure(
        Run(end, run_dir),
        killed,
        newest_at_kill,
        state_after_kill,
        node_state,
        int(match[1]),
        (one_node, two_nodes, dry_run),
    )


@dataclass(frozen=True)
class Runs:
    two_nodes: Run  # uninterrupted, 2 nodes x 1 process
    one_node: Run  # uninterrupted, 1 node x 2 processes
    dry_run: Run  # DRY_RUN=1, 2 nodes x 1 process
    one_node_two: Run  # the preempted run resumed on 1 node x 2 processes
    one_process: Run  # the preempted run resumed on 1 process, twice the accumulation


@pytest.fixture(scope="module")
def runs(submitter: Submitter, node_failure: NodeFailure, tmp_path_factory) -> Runs:
    """The references started during the node failure, and the preempted run directory copied
    twice and resubmitted on one node."""
    copies = []
    for name in ("resumed-1x2", "resumed-1x1"):
        copy = tmp_path_factory.mktemp(name) / "run"
        shutil.copytree(node_failure.run.run_dir, copy)
        copies.append(copy)
    one_node, two_nodes, dry_run = node_failure.side_jobs
    jobs = (
        two_nodes,
        one_node,
        dry_run,
        submitter.submit("resumed-1x2", 1, 2, run_dir=copies[0]),
        submitter.submit("resumed-1x1", 1, 1, run_dir=copies[1], overrides={"train.grad_accum": 2}),
    )
    return Runs(*(submitter.wait(job) for job in jobs))


def assert_completed(run: Run, restarts: int = 0) -> None:
    end = run.end
    assert (end.state, end.exit_code, end.restarts) == ("COMPLETED", 0, restarts), end.report


# ------------------------------------------------------------------------------------ harness


def test_nodes_have_their_own_hostname_address_and_no_route_off_the_subnet(
    cluster: MultiNodeCluster,
) -> None:
    for node in cluster.nodes:
        prefix = cluster.network.exec_prefix(node, hostname=True)
        hostname, addresses, routes = (
            cluster.run([*prefix, *cmd]).stdout
            for cmd in (["hostname"], ["ip", "-o", "-4", "addr"], ["ip", "-4", "route"])
        )
        assert hostname.strip() == node.name
        assert sorted(re.findall(r"inet (\S+)", addresses)) == sorted(
            ["127.0.0.1/8", f"{node.address}/24"]
        )
        # No default route: nothing off the subnet is reachable from a node.
        want = f"{SUBNET}.0/24 dev eth0 proto kernel scope link src {node.address}"
        assert routes.split() == want.split()


def test_namespaces_and_daemons_are_gone_after_a_failing_body(tmp_path: Path) -> None:
    require_slurm()
    seen: dict[str, set[str] | dict[str, int]] = {}
    with (
        pytest.raises(RuntimeError, match="body failed"),
        running_multinode_cluster(tmp_path) as c,
    ):
        seen.update(pids=dict(c.pids), namespaces={h.namespace for h in c.network.hosts})
        assert seen["namespaces"] <= netns_namespaces()
        raise RuntimeError("body failed")
    assert sorted(seen["pids"]) == ["munged", "slurmctld", "slurmd@node01", "slurmd@node02"]
    assert [name for name, pid in seen["pids"].items() if process_alive(pid)] == []
    assert seen["namespaces"] & netns_namespaces() == set()


def test_a_network_that_cannot_be_built_fails_naming_the_ip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No skip for lack of namespaces: the error names the command and what ip said."""
    require_slurm()
    monkeypatch.setattr(secrets, "token_hex", lambda n: "c0ffee")  # both networks: same names
    first, second = NodeNetwork(["node01"], tmp_path), NodeNetwork(["node01"], tmp_path)
    try:
        first.create()
        with pytest.raises(RuntimeError) as failure:
            second.create()
    finally:
        second.remove()
        first.remove()
    message = str(failure.value)
    assert message.startswith("cannot build the test network: `ip netns add deitlt-c0ffee-ctl`")
    assert "exists" in message and "\n" not in message
    assert {h.namespace for h in first.hosts} & netns_namespaces() == set()


def test_rendezvous_of_a_two_node_job_is_the_first_node_on_both_sides(
    cluster: MultiNodeCluster, tmp_path: Path
) -> None:
    """The batch shell's exported MASTER_ADDR/PORT and what the trainer's detect_launch computes
    in each task are the same, on both nodes, and resolve to the first node's address."""
    probe = (
        "import os, socket\n"
        "from deitlt_scale.engine.distributed import detect_launch\n"
        "l = detect_launch()\n"
        "addr = socket.gethostbyname(l.master_addr)\n"
        "print('probe', socket.gethostname(), l.rank, l.local_rank, l.world_size,"
        " os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'], l.master_addr, l.master_port,"
        " addr, flush=True)\n"
    )
    script = tmp_path / "probe.sh"
    script.write_text(
        "#!/bin/bash\n"
        'source "$DEITLT_HOME/slurm/common.sh"\n'
        "deitlt_init\n"
        'deitlt_run srun "$PYTHON" -c "$PROBE"\n'
    )
    env = {"DEITLT_HOME": str(REPO), "PYTHON": sys.executable, "PROBE": probe}
    # The submitting shell's rendezvous and torchrun ranks: ignored.
    env |= {"MASTER_ADDR": "stale-host", "MASTER_PORT": "1", "RANK": "5", "WORLD_SIZE": "9"}
    job = cluster.sbatch(script, env=env, options=layout(2, 1))
    end = cluster.wait_for_end(job, JOB_TIMEOUT_S)
    assert (end.state, end.exit_code) == ("COMPLETED", 0), end.report
    rows = sorted(line.split()[1:] for line in end.output.splitlines() if line.startswith("probe"))
    port = str(master_port(job))
    first = cluster.nodes[0]
    assert rows == [
        ["node01", "0", "0", "2", "node01", port, "node01", port, first.address],
        ["node02", "1", "0", "2", "node01", port, "node01", port, first.address],
    ], end.report


# ------------------------------------------------------------------------------------ training


def test_two_node_run_completes_every_step(runs: Runs) -> None:
    assert_completed(runs.two_nodes)
    assert sorted(runs.two_nodes.lrs()) == list(range(1, TOTAL_STEPS + 1))


def test_two_node_run_meets_at_the_first_node(runs: Runs, cluster: MultiNodeCluster) -> None:
    port = master_port(runs.two_nodes.end.job_id)
    assert "on node[01-02]: 2 node(s) x 1 process(es)" in runs.two_nodes.end.output
    assert f"rendezvous MASTER_ADDR=node01 MASTER_PORT={port}" in runs.two_nodes.end.output


def test_both_hosts_write_their_shards_into_one_checkpoint_directory(
    runs: Runs,
) -> None:
    ref = checkpoint.latest_checkpoint(runs.two_nodes.run_dir)
    assert ref is not None and ref.step == TOTAL_STEPS, runs.two_nodes.end.report
    shards = sorted(p.name for p in ref.path.rglob("*optim_states.pt"))
    assert len(shards) == 2 and shards[0] != shards[1], shards  # one per rank, i.e. per host


def test_two_nodes_end_with_bitwise_the_weights_of_one_node_with_two_processes(
    runs: Runs,
) -> None:
    assert_completed(runs.one_node)
    assert_same_weights(final_weights(runs.one_node.run_dir), final_weights(runs.two_nodes.run_dir))


def test_dry_run_prints_the_layout_of_both_nodes_and_trains_nothing(
    runs: Runs, cluster: MultiNodeCluster
) -> None:
    run = runs.dry_run
    assert_completed(run)
    port = master_port(run.end.job_id)
    address = cluster.nodes[0].address
    lines = sorted(re.findall(r"^deitlt\[layout\]: (.*)$", run.end.output, re.MULTILINE))
    assert lines == [
        f"rank 0/2 local 0 on node01 (node 0 of 2): rendezvous node01:{port} -> {address}",
        f"rank 1/2 local 0 on node02 (node 1 of 2): rendezvous node01:{port} -> {address}",
    ], run.end.report
    assert "world        2 process(es) on cpu (gloo)" in run.end.output
    assert "dry run: stopping before step 1" in run.end.output
    assert checkpoint.latest_checkpoint(run.run_dir) is None


# ------------------------------------------------------------------------------------ failures


def test_killing_every_process_of_a_node_declares_it_down(node_failure: NodeFailure) -> None:
    assert node_failure.killed_pids, "the node had processes to kill"
    assert node_failure.node_state_after_kill.startswith("down"), node_failure.run.end.report


def test_a_job_on_a_dead_node_is_requeued_by_slurm(node_failure: NodeFailure) -> None:
    """``#SBATCH --requeue``: SLURM requeues a job whose node failed. The surviving rank fails
    its collective; then either srun returns 1, which common.sh reports as a failure, or the
    TERM with which SLURM ends the batch step for the requeue comes first and common.sh reports
    143. Either way the requeue is SLURM's, not the exit-status rule's (75 only)."""
    first = node_failure.run.attempt(0)
    report = node_failure.run.end.report
    # gloo words the lost peer by what the socket saw first: closed, or reset mid-read
    assert re.search(r"Connection (closed|reset) by peer", first), report
    assert "Node failure on node02" in first
    ended = re.search(r"^deitlt\[slurm\]: failed with exit status (\d+) ", first, re.MULTILINE)
    assert ended, report
    if ended[1] != "1":
        assert ended[1] == "143" and "batch shell received SIGTERM" in first, report
    assert node_failure.state_after_kill == "PENDING", node_failure.run.end.report
    assert node_failure.run.end.restarts == 1, node_failure.run.end.report


def test_the_requeued_job_resumes_from_the_last_complete_checkpoint(
    node_failure: NodeFailure,
) -> None:
    second = node_failure.run.attempt(1)
    step = node_failure.newest_at_kill
    assert (
        f"resumed from {node_failure.run.run_dir}/checkpoints/step_{step:08d} at step {step}"
        in second
    ), node_failure.run.end.report


def test_a_preempted_two_node_job_saves_and_is_not_requeued(node_failure: NodeFailure) -> None:
    end = node_failure.run.end
    assert end.state == "CANCELLED", end.report
    assert (
        "exit status 75 (checkpoint saved) but the job is ending (JobState=COMPLETING" in end.output
    )
    assert node_failure.newest_at_kill < node_failure.preempted_at < TOTAL_STEPS
    assert newest_step(node_failure.run.run_dir) == node_failure.preempted_at


def test_resumed_on_one_node_with_two_processes_it_ends_with_the_uninterrupted_weights(
    runs: Runs,
) -> None:
    run = runs.one_node_two
    assert_completed(run)
    assert_same_weights(final_weights(runs.two_nodes.run_dir), final_weights(run.run_dir))


def test_resumed_on_one_process_it_goes_through_the_universal_checkpoint(
    runs: Runs, node_failure: NodeFailure
) -> None:
    run = runs.one_process
    assert_completed(run)
    step = node_failure.preempted_at
    assert f"universal_step_{step:08d} at step {step}" in run.end.output, run.end.report


@pytest.mark.parametrize("layout_name", ["one_node_two", "one_process"])
def test_resumed_runs_keep_the_step_count_and_the_lr_schedule(
    runs: Runs, node_failure: NodeFailure, layout_name: str
) -> None:
    run = getattr(runs, layout_name)
    want = {s: lr for s, lr in runs.two_nodes.lrs().items() if s > node_failure.preempted_at}
    assert run.final_step() == TOTAL_STEPS
    assert run.lrs() == want, run.end.report
