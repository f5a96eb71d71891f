"""Who am I in a distributed job: rank, local rank, world size and the rendezvous address, from one source.

Sources, tried in this order, the first present wins and is used alone:
  torchrun   RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
  submitit   SUBMITIT_EXECUTOR (SLURM or local executor): submitit.JobEnvironment
  mpi        OMPI_COMM_WORLD_RANK / PMI_RANK / PMIX_RANK (mpiexec, srun --mpi): mpi4py
  single     none of the above: one process
A source that is only partly set is an error naming the missing variables.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
PORT_BASE, PORT_SPAN = 20000, 20000


class DistributedEnvError(RuntimeError):
    """The environment describes a distributed job only in part."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str
    local_world: int = 1  # processes of this job on this node


def port_for(job_id: str) -> int:
    """A rendezvous port derived from the job id, so that all tasks of a job agree without talking."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def resolve(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The distributed environment of this process (see the module's docstring for the sources)."""
    env = os.environ if environ is None else environ
    present = [name for name in TORCHRUN_VARS if name in env]
    if present:
        missing = [name for name in TORCHRUN_VARS if name not in env]
        if missing:
            raise DistributedEnvError(f"torchrun-style variables {present} are set but {missing} are not; "
                                      "set all of RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT or none")
        return DistEnv(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]), env["MASTER_ADDR"],
                       int(env["MASTER_PORT"]), "torchrun", int(env.get("LOCAL_WORLD_SIZE", 1)))
    if "SUBMITIT_EXECUTOR" in env:
        return _from_submitit()
    if any(name in env for name in MPI_RANK_VARS):
        return _from_mpi()
    return DistEnv(0, 0, 1, "127.0.0.1", 29500, "single")


def _from_submitit() -> DistEnv:
    import submitit

    job = submitit.JobEnvironment()
    hosts = job.hostnames
    if not hosts:
        raise DistributedEnvError("submitit job without host names (SLURM_JOB_NODELIST empty?)")
    base = str(job.job_id).split("_")[0]
    return DistEnv(job.global_rank, job.local_rank, job.num_tasks, hosts[0], port_for(base), f"submitit-{job.cluster}",
                   max(1, job.num_tasks // max(1, job.num_nodes)))


def _from_mpi() -> DistEnv:
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise DistributedEnvError(f"started under MPI but mpi4py cannot be imported ({err}); "
                                  "pip install mpi4py (and the mpich wheel)") from None
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    addr, port = comm.bcast((socket.gethostname(), port_for(str(os.getppid()))) if comm.rank == 0 else None, root=0)
    return DistEnv(comm.rank, local.rank, comm.size, addr, port, "mpi", local.size)
