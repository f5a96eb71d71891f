"""The task side of every job, written once: the device, the CPU threads of the allocation, the process group.

Training, prediction and cross-validation tasks all run inside ``task_setup()`` (dinov2's one
``distributed.enable()``): it reads who this process is (``hpc.distributed.resolve``), picks its GPU or the
CPU, sets the thread count from the allocation, keeps freed memory for reuse (``hpc.memory``), logs with times
to the task's log, and starts and ends the process group of a multi-process job.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hpc.distributed import DistEnv, DistributedEnvError, resolve
from hpc.executors import visible_gpu_count
from hpc.logs import task_logging
from hpc.memory import keep_freed_memory
from hpc.orphans import end_with_command


@dataclass(frozen=True)
class Task:
    """Who this process is in its job and the device it computes on."""

    env: DistEnv
    device: torch.device


def thread_share(tasks_at_once: int) -> int:
    """This machine's cores shared evenly among the tasks that run on it at once (at least 1 each)."""
    return max(1, (os.cpu_count() or 1) // max(1, tasks_at_once))


def task_device(env: DistEnv) -> torch.device:
    """The process's GPU (one per process on a node, by local rank), else the CPU; an error where the scheduler
    gave the task GPUs that torch cannot use (hours on the CPU of a GPU node, without a word, otherwise)."""
    if not torch.cuda.is_available():
        given = gpus_given()
        if given:
            why = (f"this torch ({torch.__version__}) is built without CUDA: install a CUDA build in the tasks' "
                   "environment" if torch.version.cuda is None else
                   f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use them: check the node's driver "
                   "(`nvidia-smi`) against that CUDA version")
            raise DistributedEnvError(f"this task was given {given} GPU(s), but {why}; or ask for none "
                                      "(cluster.gpus_per_node=0) to run on the CPU")
        return torch.device("cpu")
    if env.local_rank >= torch.cuda.device_count():
        raise DistributedEnvError(f"{env.local_world} processes on this node but {torch.cuda.device_count()} GPU(s) "
                                  "visible: one process per GPU (set --gpus-per-node or cluster.tasks_per_node)")
    return torch.device(f"cuda:{env.local_rank}")


def gpus_given() -> int:
    """The GPUs the scheduler gave this task: SLURM's count on its node, or the devices submitit's local executor
    made visible to it (0 elsewhere: a CUDA_VISIBLE_DEVICES of the user's own is no request)."""
    on_node = os.environ.get("SLURM_GPUS_ON_NODE", "").strip()
    if on_node.isdigit():
        return int(on_node)
    if os.environ.get("SUBMITIT_EXECUTOR") == "local":  # it always sets CUDA_VISIBLE_DEVICES ("" for none)
        return visible_gpu_count()
    return 0


def slurm_duration_s(text: str) -> float | None:
    """Seconds of a SLURM duration as squeue prints it (``MM:SS``, ``H:MM:SS``, ``D-HH:MM:SS``); None for
    UNLIMITED, NOT_SET and anything else."""
    days, _, clock = text.strip().rpartition("-")
    parts = clock.split(":")
    if not (1 <= len(parts) <= 3 and all(p.isdigit() for p in parts) and (days == "" or days.isdigit())):
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    if len(parts) == 1:
        seconds *= 60  # minutes alone
    return float(seconds + int(days or 0) * 86400)


def job_deadline(limit_min: float | None = None) -> float | None:
    """When this SLURM job's time limit falls (a ``time.time()``): from squeue's time left, else its limit
    ``limit_min`` counted from now; None outside SLURM or without a limit."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        left = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        left = ""
    seconds = slurm_duration_s(left.splitlines()[0]) if left.strip() else None
    if seconds is None and limit_min is not None and left.strip() != "UNLIMITED":
        seconds = limit_min * 60.0
    return None if seconds is None else time.time() + seconds


@contextmanager
def task_setup(threads: int | None = None) -> Iterator[Task]:
    """Set this process up as one task of its job; on the CPU it computes with ``SLURM_CPUS_PER_TASK`` threads,
    else ``threads``, else its share of the node's cores. The process group (NCCL on GPUs, gloo on CPUs) is
    started when the job has several processes and destroyed on the way out, also after an error."""
    task_logging()
    end_with_command()  # a local task whose command was killed outright stops too (hpc.orphans)
    keep_freed_memory()  # no page faults per batch (hpc.memory)
    env = resolve()
    device = task_device(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK") or threads or thread_share(env.local_world)))
    if env.world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=env.rank, world_size=env.world_size,
                                init_method=f"tcp://{env.master_addr}:{env.master_port}")
    try:
        yield Task(env, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
