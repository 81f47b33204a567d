"""Real SLURM clusters for tests: munged, slurmctld and slurmd on this machine.

:class:`SlurmCluster` is one node on 127.0.0.1. :class:`MultiNodeCluster` is a controller and
several nodes, each in network, UTS and mount namespaces of its own on a private subnet (see
"two nodes" below); a machine that cannot create the namespaces fails its tests with the reason.

Everything a cluster needs lives under one directory (munge key and socket, slurm.conf, state and
spool directories, logs, PID files) and the daemons listen on free ports, so two test sessions on
one machine do not clash. Clients reach the cluster through ``SLURM_CONF`` (see
:meth:`SlurmCluster.env`), which batch jobs inherit. Daemons are stopped by the PIDs they wrote,
never by name.

The session fixture ``slurm_cluster`` installs the Debian packages when they are missing and
the tests run as root; where that is impossible it skips with one line saying why, except under
``CI=true``, where it fails instead.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

DEBIAN_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
_BINARIES = (
    *("munged", "munge", "unmunge"),
    *("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo"),
)
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Variables that would steer sbatch/srun in ways the tests did not ask for (an outer allocation,
# a user's SBATCH_* defaults).
_FOREIGN_ENV = re.compile(r"^(SLURM_|SBATCH_|SRUN_|SALLOC_|SQUEUE_|SCONTROL_)")


def in_ci() -> bool:
    """True under ``CI=true`` (also 1/yes), where SLURM tests must run and never skip."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + _SBIN_PATH)


def ensure_installed(timeout_s: float = 600.0) -> str | None:
    """Make the SLURM and munge programs available; return ``None``, or one line saying why not.

    Installs :data:`DEBIAN_PACKAGES` with apt-get when a program is missing and this process is
    root. apt's lock is waited for (another session may be installing at the same moment).
    """
    missing = [name for name in _BINARIES if _which(name) is None]
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"{', '.join(missing)} missing and not root, so apt-get cannot install SLURM"
    if _which("apt-get") is None:
        return f"{', '.join(missing)} missing and no apt-get to install SLURM"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-qq"]
    for cmd in (
        [*apt, "update"],
        [*apt, "install", "-y", "--no-install-recommends", *DEBIAN_PACKAGES],
    ):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` did not finish within {timeout_s:.0f} s"
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return f"`{' '.join(cmd)}` failed: {last}"
    missing = [name for name in _BINARIES if _which(name) is None]
    return f"{', '.join(missing)} still missing after apt-get install" if missing else None


def unavailable_reason() -> str | None:
    """``None`` when this process can run a test cluster, else one line saying why not."""
    if os.geteuid() != 0:
        return "not root (the test cluster runs munged, slurmctld and slurmd as root)"
    return ensure_installed()


def require_slurm() -> None:
    """Skip the calling test with one line when SLURM cannot run here; under CI=true, fail."""
    reason = unavailable_reason()
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"CI=true requires SLURM, which cannot be started: {reason}", pytrace=False)
    pytest.skip(f"SLURM cannot be started here: {reason}")


def _free_ports(count: int) -> list[int]:
    """Ports free right now on every interface (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"({path}: {err.strerror})"
    return "\n".join(text.splitlines()[-lines:])


def process_alive(pid: int) -> bool:
    """The process exists and is not a zombie (an exited daemon nobody has reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


# slurm.conf lines shared by the one-node and the multi-node cluster.
_COMMON_CONF = (
    "SlurmUser=root",
    "SlurmdUser=root",
    "AuthType=auth/munge",
    "CredType=cred/munge",
    "MpiDefault=none",
    "ProctrackType=proctrack/pgid",  # linuxproc leaks orphaned processes here
    "TaskPlugin=task/none",
    "SelectType=select/cons_tres",
    "SelectTypeParameters=CR_CPU",
    "SchedulerParameters=bf_interval=1,sched_interval=2",
    "MailProg=/bin/true",  # slurmctld refuses to start without a mail program
    "JobCompType=jobcomp/none",
    "AccountingStorageType=accounting_storage/none",
    "ReturnToService=2",  # a node that was DOWN returns to service when its slurmd registers
    "MinJobAge=600",  # finished jobs stay visible to `scontrol show job` for the tests
)


@dataclass(frozen=True)
class JobEnd:
    """A job that has left the queue, as ``scontrol show job`` reports it, and its log."""

    job_id: int
    state: str  # COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    exit_code: int  # of the batch script (the first half of scontrol's ExitCode=a:b)
    restarts: int  # how many times it was requeued (SLURM_RESTART_COUNT of its last attempt)
    output: str  # the job's output file (all attempts: the scripts use --open-mode=append)
    report: str  # everything worth reading when an assertion about this job fails


class SlurmCluster:
    """One controller and one compute node on this machine, all state under ``root``.

    Use :func:`running_cluster` (or the ``slurm_cluster`` fixture) rather than calling
    :meth:`start` and :meth:`stop` by hand: it stops the daemons even when the body raises.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.conf = self.root / "slurm.conf"
        self.jobs_dir = self.root / "jobs"
        self.hostname = subprocess.run(
            ["hostname", "-s"], capture_output=True, text=True, check=True
        ).stdout.strip()
        self._munge = self.root / "munge"
        self._logs = self.root / "log"
        self._run = self.root / "run"
        # munged wants every directory above its socket searchable by all, which pytest's
        # temporary directories are not (0700): the socket gets its own directory in /tmp.
        self._socket_dir: Path | None = None
        self.munge_socket = Path()
        self.ports: tuple[int, int] = (0, 0)  # SlurmctldPort, SlurmdPort (chosen at start)
        self.first_job_id = 0  # FirstJobId (chosen at start)
        self.pids: dict[str, int] = {}  # daemon name -> PID, as read from its PID file
        self.client_prefix: tuple[str, ...] = ()  # wraps every client command (a namespace)

    # ---------------------------------------------------------------- life cycle

    def start(self, timeout_s: float = 60.0) -> None:
        """Start munged, slurmctld and slurmd; return once the node is idle."""
        for d in (self._munge, self._logs, self._run, self.jobs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._start_munge(timeout_s)
        self._write_conf()
        env = self.env()
        self._start_daemon("slurmctld", ["slurmctld", "-f", str(self.conf)], env, timeout_s)
        self._wait(
            lambda: "UP" in self.run(["scontrol", "ping"], check=False).stdout,
            timeout_s,
            "slurmctld to answer `scontrol ping`",
        )
        self._start_daemon("slurmd", ["slurmd", "-f", str(self.conf)], env, timeout_s)
        self._wait(
            lambda: self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip() == "idle",
            timeout_s,
            "the node to become idle in sinfo",
        )

    def stop(self, timeout_s: float = 60.0) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged by PID (KILL if TERM fails)."""
        if "slurmctld" in self.pids and process_alive(self.pids["slurmctld"]):
            self.run(["scancel", "--user", "root"], check=False)
            with contextlib.suppress(TimeoutError):
                self._wait(
                    lambda: not self.run(["squeue", "-h"], check=False).stdout.strip(),
                    timeout_s,
                    "cancelled jobs to leave the queue",
                )
        for name in ("slurmd", "slurmctld", "munged"):
            self._stop_daemon(name)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _stop_daemon(self, name: str) -> None:
        """TERM the daemon started as ``name`` (``slurmd@node01``: program slurmd), KILL after 15 s."""
        pid, program = self.pids.get(name), name.split("@")[0]
        if pid is None or not process_alive(pid) or _command_name(pid) != program:
            return  # gone already (a PID reused by another program is left alone)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        try:
            self._wait(lambda: not process_alive(pid), 15.0, f"{name} ({pid}) to exit")
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _start_munge(self, timeout_s: float) -> None:
        key = self._munge / "munge.key"
        key.write_bytes(secrets.token_bytes(128))
        key.chmod(0o400)
        self._socket_dir = Path(tempfile.mkdtemp(prefix="deitlt-munge-"))
        self._socket_dir.chmod(0o755)
        self.munge_socket = self._socket_dir / "munge.socket"
        self._start_daemon(
            "munged",
            [
                "munged",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self._run / 'munged.pid'}",
                f"--log-file={self._logs / 'munged.log'}",
                f"--seed-file={self._munge / 'munged.seed'}",
            ],
            dict(os.environ),
            timeout_s,
        )

        def round_trip() -> bool:
            cred = subprocess.run(
                ["munge", "-S", str(self.munge_socket), "-n"], capture_output=True, timeout=10
            )
            if cred.returncode != 0:
                return False
            check = subprocess.run(
                ["unmunge", "-S", str(self.munge_socket)],
                input=cred.stdout,
                capture_output=True,
                timeout=10,
            )
            return check.returncode == 0

        self._wait(round_trip, timeout_s, "a munge credential round trip")

    def _write_conf(self) -> None:
        node = subprocess.run(
            ["slurmd", "-C"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[0]
        if not node.startswith(f"NodeName={self.hostname} "):
            raise RuntimeError(f"`slurmd -C` printed {node!r}, not a line for {self.hostname}")
        ctld_port, slurmd_port = _free_ports(2)
        self.ports = (ctld_port, slurmd_port)
        # A random first job id moves the job-id-derived MASTER_PORT between sessions.
        self.first_job_id = random.randrange(1_000, 1_000_000)
        state, spool = self.root / "state", self.root / "spool"
        state.mkdir(exist_ok=True)
        spool.mkdir(exist_ok=True)
        lines = [
            f"ClusterName=deitlt{secrets.token_hex(3)}",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            *_COMMON_CONF,
            # A short credential lifetime lets a requeued job start again in seconds, not minutes.
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            "KillWait=10",
            f"FirstJobId={self.first_job_id}",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={self._run / 'slurmctld.pid'}",
            f"SlurmdPidFile={self._run / 'slurmd.pid'}",
            f"SlurmctldLogFile={self._logs / 'slurmctld.log'}",
            f"SlurmdLogFile={self._logs / 'slurmd.log'}",
            f"{node} NodeAddr=127.0.0.1 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _start_daemon(
        self,
        name: str,
        cmd: list[str],
        env: Mapping[str, str],
        timeout_s: float,
        pid_file: Path | None = None,
        log_file: Path | None = None,
    ) -> None:
        pid_file = pid_file or self._run / f"{name}.pid"
        pid_file.unlink(missing_ok=True)  # a restarted daemon: wait for its new PID
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(
                f"{name} failed to start ({done.returncode}): {done.stderr.strip()}\n"
                f"{_tail(log_file or self._logs / f'{name}.log')}"
            )

        def written() -> bool:
            text = pid_file.read_text().strip() if pid_file.exists() else ""
            return text.isdigit() and process_alive(int(text))

        self._wait(written, timeout_s, f"{name} to write {pid_file}")
        self.pids[name] = int(pid_file.read_text().strip())

    def _wait(self, ready, timeout_s: float, what: str, poll_s: float = 0.2) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.logs()}"
                )
            time.sleep(poll_s)

    # ---------------------------------------------------------------- clients

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """This process's environment pointed at this cluster, plus ``extra``."""
        env = {k: v for k, v in os.environ.items() if not _FOREIGN_ENV.match(k)}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + ":" + _SBIN_PATH
        env.update(extra or {})
        return env

    def run(
        self, cmd: Sequence[str], *, check: bool = True, timeout_s: float = 30.0, **kwargs
    ) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command against this cluster."""
        env = self.env(kwargs.pop("env", None))
        done = subprocess.run(
            [*self.client_prefix, *cmd],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            **kwargs,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` exited {done.returncode}: {done.stderr.strip()}")
        return done

    def sbatch(
        self,
        script: str | Path,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        options: Sequence[str] = (),
        cwd: str | Path | None = None,
    ) -> int:
        """Submit ``script`` with ``options`` (which override its #SBATCH lines); return the id.

        The output goes to :meth:`output_path` unless ``options`` name one.
        """
        opts = list(options)
        if not any(o.startswith(("--output", "-o")) for o in opts):
            opts.append(f"--output={self.jobs_dir}/job-%j.out")
        done = self.run(["sbatch", "--parsable", *opts, str(script), *args], env=env, cwd=cwd)
        return int(done.stdout.strip().split(";")[0])

    def output_path(self, job_id: int) -> Path:
        return self.jobs_dir / f"job-{job_id}.out"

    def state(self, job_id: int) -> str:
        """PENDING, RUNNING, COMPLETING, ...; "" once the job has left the queue."""
        done = self.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    def job_fields(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` as a mapping (empty when the job is unknown)."""
        done = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        return dict(re.findall(r"(\w[\w/:]*)=(\S*)", done.stdout)) if done.returncode == 0 else {}

    def signal(self, job_id: int, sig: str = "USR1", *, batch: bool = False) -> None:
        """``scancel --signal``: to the tasks of the job steps, or with ``batch`` to the batch shell."""
        self.run(["scancel", f"--signal={sig}", *(["--batch"] if batch else []), str(job_id)])

    def wait_until(self, ready, timeout_s: float, what: str, job_id: int | None = None) -> None:
        """Poll ``ready()`` every 0.2 s, for at most ``timeout_s``.

        With ``job_id``, waiting also ends (with an AssertionError) when the job leaves the queue
        first, and on timeout the job is cancelled; both errors carry the job's report.
        """
        deadline = time.monotonic() + timeout_s
        while not ready():
            if job_id is not None and self.state(job_id) == "" and not ready():
                raise AssertionError(f"job {job_id} ended before {what}\n{self.report(job_id)}")
            if time.monotonic() > deadline:
                report = self.report(job_id) if job_id is not None else self.logs()
                if job_id is not None:
                    self.run(["scancel", str(job_id)], check=False)
                raise TimeoutError(
                    f"timed out after {timeout_s:.0f} s waiting for {what}\n{report}"
                )
            time.sleep(0.2)

    def wait_for_end(self, job_id: int, timeout_s: float) -> JobEnd:
        """Poll ``squeue -h -j ID`` until the job has left the queue (requeues included)."""
        self.wait_until(lambda: self.state(job_id) == "", timeout_s, f"job {job_id} to end", job_id)
        fields = self.job_fields(job_id)
        exit_code = fields.get("ExitCode", "-1:0").split(":")[0]
        return JobEnd(
            job_id=job_id,
            state=fields.get("JobState", "UNKNOWN"),
            exit_code=int(exit_code) if exit_code.lstrip("-").isdigit() else -1,
            restarts=int(fields.get("Restarts", "0") or 0),
            output=self.output(job_id),
            report=self.report(job_id),
        )

    def output(self, job_id: int) -> str:
        path = self.output_path(job_id)
        return path.read_text(errors="replace") if path.exists() else ""

    def report(self, job_id: int | None) -> str:
        """The job's scontrol record and output, then the daemons' log tails."""
        parts = []
        if job_id is not None:
            show = self.run(["scontrol", "show", "job", str(job_id)], check=False)
            parts += [
                f"--- scontrol show job {job_id}\n{show.stdout or show.stderr}",
                f"--- {self.output_path(job_id)}\n{_tail(self.output_path(job_id), 200)}",
            ]
        parts.append(self.logs())
        return "\n".join(parts)

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} log (tail)\n{_tail(self._logs / f'{name}.log', 25)}"
            for name in ("slurmctld", "slurmd", "munged")
        )


@contextlib.contextmanager
def running_cluster(root: Path) -> Iterator[SlurmCluster]:
    """A started cluster under ``root``; its daemons are stopped on exit, also on error."""
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One real cluster for the test session (installs SLURM with apt when root and missing)."""
    require_slurm()
    with running_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


# -------------------------------------------------------------------------------- two nodes
#
# Each SLURM host gets its own network namespace (its own interfaces, addresses and ports), UTS
# namespace (its own hostname) and mount namespace (its own /etc/hosts, bind-mounted over the
# machine's), joined by veth pairs to a bridge that lives in the controller's namespace. Nothing
# is added to the machine's own network namespace: the subnet exists only between the namespaces
# created here. Every other file is shared, which plays the part of the cluster's shared file
# system: repository, run directories, job logs and munge's socket are the same files on every
# host. (`ip netns exec` is not used to enter a host: it remounts /sys, hiding the cgroup file
# system slurmd needs.)

SUBNET = "10.213.0"  # /24, inside the namespaces only
CONTROLLER = "ctl"  # hostname of the slurmctld namespace, on SUBNET.1 (the bridge)


@dataclass(frozen=True)
class Host:
    name: str  # hostname and SLURM node name
    namespace: str  # network namespace (global name under /run/netns)
    address: str  # on SUBNET


class NodeNetwork:
    """The namespaces, bridge and veth pairs of one multi-node cluster; :meth:`remove` undoes all.

    Creation failures raise ``RuntimeError`` naming the ``ip`` command and its error, so a
    machine that cannot build the network fails the tests instead of skipping them.
    """

    def __init__(self, nodes: Sequence[str], etc: Path) -> None:
        tag = f"deitlt-{secrets.token_hex(3)}"
        self.controller = Host(CONTROLLER, f"{tag}-{CONTROLLER}", f"{SUBNET}.1")
        self.nodes = [
            Host(name, f"{tag}-{name}", f"{SUBNET}.{11 + i}") for i, name in enumerate(nodes)
        ]
        self.hosts_file = etc / "hosts"  # every host's /etc/hosts
        self.created: list[str] = []  # namespaces, in creation order

    @property
    def hosts(self) -> list[Host]:
        return [self.controller, *self.nodes]

    def create(self) -> None:
        for program in ("ip", "nsenter", "unshare"):
            if _which(program) is None:
                raise RuntimeError(f"`{program}` is missing: apt-get install iproute2 util-linux")
        hub = self.controller.namespace
        for host in self.hosts:
            _ip("netns", "add", host.namespace)
            self.created.append(host.namespace)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
        names = "".join(f"{h.address}\t{h.name}\n" for h in self.hosts)
        self.hosts_file.parent.mkdir(parents=True, exist_ok=True)
        self.hosts_file.write_text(f"127.0.0.1\tlocalhost\n{names}")
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "addr", "add", f"{self.controller.address}/24", "dev", "br0")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, node in enumerate(self.nodes):
            # Created inside the hub and moved straight into the node: never in the host's view.
            _ip("-n", hub, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0",
                "netns", node.namespace)  # fmt: skip
            _ip("-n", hub, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", "eth0")
            _ip("-n", node.namespace, "link", "set", "eth0", "up")

    def exec_prefix(self, host: Host, hostname: bool = False) -> list[str]:
        """Run a command on ``host``: in its network namespace, and with ``hostname`` also in
        UTS and mount namespaces of its own, with the host's name and /etc/hosts (for daemons
        and the jobs they start; clients need only the network)."""
        prefix = ["nsenter", f"--net=/run/netns/{host.namespace}"]
        if hostname:
            # unshare makes the new mount namespace private: the bind stays inside it.
            setup = 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"'
            prefix += ["unshare", "--mount", "--uts", "--", "sh", "-c", setup, host.name]
            prefix.append(str(self.hosts_file))
        return prefix

    def pids(self, host: Host) -> list[int]:
        """Every process in the host's network namespace (daemons, job steps, tasks)."""
        if host.namespace not in self.created:
            return []
        done = subprocess.run(
            ["ip", "netns", "pids", host.namespace], capture_output=True, text=True, timeout=10
        )
        return [int(p) for p in done.stdout.split() if p.isdigit()]

    def kill_all(self, host: Host, sig: signal.Signals = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to every process of the host at once (a node dying); return their PIDs."""
        pids = self.pids(host)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def remove(self, timeout_s: float = 20.0) -> None:
        """Kill what is still running on the hosts, then delete the namespaces (which removes
        their links and the bridge). Safe to call twice."""
        hosts = [h for h in self.hosts if h.namespace in self.created]
        deadline = time.monotonic() + timeout_s
        for host in hosts:
            while self.kill_all(host) and time.monotonic() < deadline:
                time.sleep(0.1)
        errors = []
        for host in reversed(hosts):
            done = subprocess.run(
                ["ip", "netns", "del", host.namespace], capture_output=True, text=True, timeout=10
            )
            if done.returncode != 0:
                errors.append(f"ip netns del {host.namespace}: {done.stderr.strip()}")
            self.created.remove(host.namespace)
        if errors:
            raise RuntimeError("; ".join(errors))


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(
            f"cannot build the test network: `ip {' '.join(args)}` exited {done.returncode}:"
            f" {done.stderr.strip() or 'no output'}"
        )


def netns_namespaces() -> set[str]:
    """Names of the network namespaces under /run/netns (for leak checks)."""
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


class MultiNodeCluster(SlurmCluster):
    """slurmctld and one slurmd per node, each in its own network and UTS namespace.

    Nodes are ``node01``, ``node02``, ... on ``SUBNET.11``, ``.12``, ...; the controller is
    ``ctl`` on ``SUBNET.1``. munged runs once (its socket is a file every host reaches), as a
    site would run one munged per host with the same key. Client commands run in the
    controller's namespace (:attr:`client_prefix`). Each node declares ``cpus`` CPUs (all
    nodes share this machine's cores; ``SlurmdParameters=config_overrides`` lets a node declare
    more than it has, so that several small jobs can run side by side).
    """

    def __init__(self, root: Path, nodes: int = 2, cpus: int = 2) -> None:
        super().__init__(root)
        self.network = NodeNetwork([f"node{i + 1:02d}" for i in range(nodes)], self.root / "etc")
        self.hostname = CONTROLLER
        self.cpus = cpus
        self.client_prefix = tuple(self.network.exec_prefix(self.network.controller))

    @property
    def nodes(self) -> list[Host]:
        return self.network.nodes

    def start(self, timeout_s: float = 60.0) -> None:
        for d in (self._munge, self._logs, self._run, self.jobs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.network.create()
        self._start_munge(timeout_s)
        self._write_conf()
        env = self.env()
        ctl = self.network.exec_prefix(self.network.controller, hostname=True)
        self._start_daemon("slurmctld", [*ctl, "slurmctld", "-f", str(self.conf)], env, timeout_s)
        self._wait(
            lambda: "UP" in self.run(["scontrol", "ping"], check=False).stdout,
            timeout_s,
            "slurmctld to answer `scontrol ping`",
        )
        for node in self.nodes:
            self.start_slurmd(node, timeout_s)
        self.wait_until(self.all_idle, timeout_s, "every node to become idle in sinfo")

    def start_slurmd(self, node: Host, timeout_s: float = 60.0) -> None:
        """Start (or restart, after :meth:`kill_node`) the node's slurmd in its namespace."""
        cmd = [*self.network.exec_prefix(node, hostname=True), "slurmd", "-N", node.name]
        self._start_daemon(
            f"slurmd@{node.name}",
            [*cmd, "-f", str(self.conf)],
            self.env(),
            timeout_s,
            pid_file=self._run / f"slurmd-{node.name}.pid",
            log_file=self._logs / f"slurmd-{node.name}.log",
        )

    def node_states(self) -> dict[str, str]:
        done = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
        return dict(line.split()[:2] for line in done.stdout.splitlines() if line.strip())

    def all_idle(self) -> bool:
        states = self.node_states()
        return sorted(states) == [n.name for n in self.nodes] and set(states.values()) == {"idle"}

    def kill_node(self, node: Host) -> list[int]:
        """SIGKILL every process on ``node`` (slurmd, job steps, tasks): the node dies."""
        return self.network.kill_all(node, signal.SIGKILL)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Cancel every job, stop the daemons by PID, then remove the namespaces (always)."""
        try:
            if "slurmctld" in self.pids and process_alive(self.pids["slurmctld"]):
                self.run(["scancel", "--user", "root"], check=False)
                with contextlib.suppress(TimeoutError):
                    self._wait(
                        lambda: not self.run(["squeue", "-h"], check=False).stdout.strip(),
                        timeout_s,
                        "cancelled jobs to leave the queue",
                    )
            for node in self.nodes:
                self._stop_daemon(f"slurmd@{node.name}")
            self._stop_daemon("slurmctld")
            self._stop_daemon("munged")
        finally:
            try:
                self.network.remove()
            finally:
                if self._socket_dir is not None:
                    shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _write_conf(self) -> None:
        memory = re.search(r"RealMemory=(\d+)", _slurmd_c()).group(1)
        self.first_job_id = random.randrange(1_000, 1_000_000)
        self.ports = (6817, 6818)  # each host has its own network stack: nothing else uses them
        state, spool = self.root / "state", self.root / "spool"
        state.mkdir(exist_ok=True)
        for node in self.nodes:
            (spool / node.name).mkdir(parents=True, exist_ok=True)
        ctl = self.network.controller
        lines = [
            f"ClusterName=deitlt{secrets.token_hex(3)}",
            f"SlurmctldHost={ctl.name}({ctl.address})",
            f"SlurmctldPort={self.ports[0]}",
            f"SlurmdPort={self.ports[1]}",
            *_COMMON_CONF,
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            # A dead node is declared DOWN within ~10 s instead of the default 300 s.
            "SlurmdTimeout=10",
            "SlurmdParameters=config_overrides",
            "KillWait=30",  # a preempted trainer has 30 s to finish its step and checkpoint
            f"FirstJobId={self.first_job_id}",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={spool}/%n",
            f"SlurmctldPidFile={self._run / 'slurmctld.pid'}",
            f"SlurmdPidFile={self._run / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self._logs / 'slurmctld.log'}",
            f"SlurmdLogFile={self._logs / 'slurmd-%n.log'}",
            *(
                f"NodeName={n.name} NodeHostname={n.name} NodeAddr={n.address} CPUs={self.cpus}"
                f" Boards=1 SocketsPerBoard=1 CoresPerSocket={self.cpus} ThreadsPerCore=1"
                f" RealMemory={memory} State=UNKNOWN"
                for n in self.nodes
            ),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def logs(self) -> str:
        names = ["slurmctld", *(f"slurmd-{n.name}" for n in self.nodes), "munged"]
        return "\n".join(
            f"--- {name} log (tail)\n{_tail(self._logs / f'{name}.log', 25)}" for name in names
        )


def _slurmd_c() -> str:
    return subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout


@contextlib.contextmanager
def running_multinode_cluster(
    root: Path, nodes: int = 2, cpus: int = 2
) -> Iterator[MultiNodeCluster]:
    """A started multi-node cluster; daemons stopped and namespaces removed on exit, also on error."""
    cluster = MultiNodeCluster(root, nodes, cpus)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
