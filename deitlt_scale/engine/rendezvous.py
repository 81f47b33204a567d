"""The one rendezvous rule of a SLURM job: where rank 0 listens (MASTER_ADDR, MASTER_PORT).

Both sides use this module: the trainer (:func:`deitlt_scale.engine.distributed.detect_launch`)
imports it, and the batch scripts (``slurm/common.sh``) run it as a program, so the batch shell,
every task and the dry-run layout agree by construction:

* ``MASTER_ADDR``: ``DEITLT_MASTER_ADDR`` when set, else the first host of
  ``SLURM_JOB_NODELIST`` (where srun starts rank 0). A ``MASTER_ADDR`` inherited from the
  submitting shell is ignored: it names a host of some earlier job.
* ``MASTER_PORT``: ``DEITLT_MASTER_PORT`` when set, else ``10000 + SLURM_JOB_ID % 20000``: the
  same for every attempt of a requeued job, different for jobs sharing a node, and below the
  Linux ephemeral range (32768-60999) so that no outgoing connection holds it by chance.

Run as a program (stdlib only, so the batch shell pays no import of torch)::

    python -m deitlt_scale.engine.rendezvous            # prints "ADDR PORT"
    python -m deitlt_scale.engine.rendezvous --layout   # inside srun: this task's place

Errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Mapping

from deitlt_scale.errors import UserError  # stdlib-only, like this module

PORT_BASE = 10000
PORT_SPAN = 20000


class RendezvousError(UserError, ValueError):
    """The SLURM environment does not determine a rendezvous; the message says what to set."""


def master_port(job_id: int) -> int:
    """The job's port: ``10000 + job_id % 20000`` (10000-29999)."""
    return PORT_BASE + job_id % PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list, as ``scontrol show hostnames`` would print it.

    Handles ranges with zero padding and several bracket groups: ``gpu[003-006,010],cpu01`` ->
    ``gpu003``, ``rack[2-3]-node[07-08]`` -> ``rack2-node07``, ``n1,n2`` -> ``n1``.
    """
    text = nodelist.strip()
    if not text:
        raise RendezvousError("SLURM_JOB_NODELIST is empty: cannot tell the first host")
    host, depth, group = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
            group = []
        elif char == "]":
            depth -= 1
            # The first element of the group, and of a range its lower end (padding kept).
            host.append("".join(group).split(",")[0].split("-")[0])
        elif depth:
            group.append(char)
        elif char == ",":
            break
        else:
            host.append(char)
    name = "".join(host)
    if depth or not name or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise RendezvousError(f"SLURM_JOB_NODELIST={nodelist!r} is not a SLURM host list")
    return name


def _port(text: str, name: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise RendezvousError(f"{name}={text!r}: use a TCP port number (1-65535)")
    return int(text)


def rendezvous(env: Mapping[str, str]) -> tuple[str, int]:
    """(MASTER_ADDR, MASTER_PORT) of the SLURM job described by ``env`` (see the module doc)."""
    addr = env.get("DEITLT_MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", ""))
    if env.get("DEITLT_MASTER_PORT"):
        return addr, _port(env["DEITLT_MASTER_PORT"], "DEITLT_MASTER_PORT")
    job = env.get("SLURM_JOB_ID", "")
    if not job.isdigit():
        raise RendezvousError(
            f"SLURM_JOB_ID={job!r}: not inside a SLURM job (or set DEITLT_MASTER_PORT)"
        )
    return addr, master_port(int(job))


def layout_line(env: Mapping[str, str]) -> str:
    """One task's place in the job, as every rank will see it: host, rank, local rank, and the
    rendezvous resolved from this host (a name other nodes cannot resolve fails here, before
    any GPU hour is spent)."""
    addr, port = rendezvous(env)
    host = socket.gethostname()
    try:
        resolved = socket.getaddrinfo(addr, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except OSError as err:
        raise RendezvousError(f"{host} cannot resolve MASTER_ADDR={addr}: {err}") from None
    return (
        f"rank {env.get('SLURM_PROCID', '?')}/{env.get('SLURM_NTASKS', '?')}"
        f" local {env.get('SLURM_LOCALID', '?')} on {host}"
        f" (node {env.get('SLURM_NODEID', '?')} of {env.get('SLURM_JOB_NUM_NODES', '?')}):"
        f" rendezvous {addr}:{port} -> {resolved}"
    )


def main(argv: list[str]) -> int:
    try:
        if argv == ["--layout"]:
            print(f"deitlt[layout]: {layout_line(os.environ)}", flush=True)
        elif not argv:
            addr, port = rendezvous(os.environ)
            print(addr, port)
        else:
            raise RendezvousError(f"unknown arguments {argv}: use none or --layout")
    except RendezvousError as err:
        print(f"deitlt rendezvous: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
