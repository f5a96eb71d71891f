"""One factory for submitit executors: ``local`` (real subprocesses), ``debug`` (in process) and ``slurm``."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import submitit

EXECUTOR_KINDS = ("local", "debug", "slurm")
SLURM_DEFAULT_LIMIT_MIN = 60  # cluster.timeout_min null on SLURM
LOCAL_NO_LIMIT_MIN = 365 * 24 * 60  # cluster.timeout_min null on this machine: no limit to speak of


class SubmissionError(RuntimeError):
    """The cluster refused a job at submission, or cannot be reached (sbatch's reason quoted); nothing of it
    runs."""


@dataclass
class ExecutorSettings:
    """Where and how tasks run; the slurm-only fields are ignored by the other kinds.

    parallelism: most array tasks running at once (local: processes; slurm: ``--array=...%N``).
    extra_sbatch: further ``#SBATCH`` options, e.g. ``{"mail-type": "END"}``; ``true`` gives a flag alone
    (``{exclusive: true}``: ``#SBATCH --exclusive``), ``false`` leaves the option out.
    setup: shell lines run before each task (``module load ...``, ``source venv/bin/activate``).
    """

    kind: str = "local"            # local (this machine, real subprocesses) | debug (in process) | slurm
    parallelism: int = 2           # array tasks at once
    timeout_min: Optional[int] = None  # minutes a task may run: SLURM's --time (null: 60); local tasks: none (null) or this
    cpus_per_task: int = 1
    mem_gb: Optional[float] = None
    gpus_per_node: int = 0
    nodes: int = 1
    tasks_per_node: int = 1
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    setup: List[str] = field(default_factory=list)  # shell lines before each task, e.g. "module load cuda"
    extra_sbatch: Dict[str, Any] = field(default_factory=dict)  # further #SBATCH options, e.g. {mail-type: END, exclusive: true}
    poll_s: float = 0.5            # seconds between looks at the tasks' state

    def __post_init__(self) -> None:
        if self.kind not in EXECUTOR_KINDS:
            raise ValueError(f"cluster.kind is {self.kind!r}; allowed: {', '.join(EXECUTOR_KINDS)}")
        for key in ("parallelism", "timeout_min", "cpus_per_task", "nodes", "tasks_per_node"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"cluster.{key} must be >= 1, got {getattr(self, key)}")
        if self.gpus_per_node < 0 or (self.mem_gb is not None and self.mem_gb <= 0):
            raise ValueError(f"cluster.gpus_per_node must be >= 0 and cluster.mem_gb > 0 or null, got "
                             f"{self.gpus_per_node} and {self.mem_gb}")

    def time_limit_min(self) -> int:
        """The time limit the executor applies: the setting, else 60 minutes on SLURM (a scheduler needs one) and
        none to speak of for local tasks (a year: submitit's local controller stops a task at its limit, which
        failed a long prediction on a workstation after an hour)."""
        if self.timeout_min is not None:
            return self.timeout_min
        return SLURM_DEFAULT_LIMIT_MIN if self.kind == "slurm" else LOCAL_NO_LIMIT_MIN


def visible_gpu_count() -> int:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else what ``nvidia-smi -L`` lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in listing.splitlines())


def make_executor(settings: ExecutorSettings, folder: str | Path, name: str,
                  max_timeouts: int = 3) -> submitit.AutoExecutor:
    """An executor whose logs and pickles go to ``folder`` (``%j`` is replaced by the job id); a SLURM job of a
    checkpointable function is requeued at its time limit at most ``max_timeouts`` times."""
    missing = [tool for tool in ("sbatch", "srun") if settings.kind == "slurm" and shutil.which(tool) is None]
    if missing:
        raise SubmissionError(f"cluster.kind slurm, but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                              "not on this machine's PATH: submit from a login node of the cluster (or load its "
                              "module, e.g. `module load slurm`), or run here with --cluster local")
    gpus = settings.gpus_per_node
    if settings.kind == "local" and gpus > visible_gpu_count():
        raise SubmissionError(f"cluster.gpus_per_node={gpus}, but this machine has {visible_gpu_count()} GPU(s) "
                              "(nvidia-smi -L, within CUDA_VISIBLE_DEVICES): set cluster.gpus_per_node=0 (the tasks "
                              "then use what there is), or run on a GPU node (--cluster slurm)")
    executor = submitit.AutoExecutor(folder=str(folder), cluster=settings.kind, slurm_max_num_timeout=max_timeouts)
    if settings.kind == "local" and gpus == 0:
        gpus = visible_gpu_count()  # submitit's local executor hides every GPU it is not given
    params: dict[str, object] = {
        "name": name,
        "timeout_min": settings.time_limit_min(),
        "cpus_per_task": settings.cpus_per_task,
        "gpus_per_node": gpus,
        "nodes": settings.nodes,
        "tasks_per_node": settings.tasks_per_node,
    }
    if settings.mem_gb is not None:
        params["mem_gb"] = settings.mem_gb
    if settings.kind == "slurm":
        slurm = {
            "slurm_partition": settings.partition,
            "slurm_account": settings.account,
            "slurm_qos": settings.qos,
            "slurm_constraint": settings.constraint,
            "slurm_array_parallelism": settings.parallelism,
            "slurm_setup": list(settings.setup),
            "slurm_additional_parameters": {key: value for key, value in settings.extra_sbatch.items()
                                            if value is not False},  # True: the flag alone (submitit)
        }
        params.update({key: value for key, value in slurm.items() if value not in (None, [], {})})
    elif settings.kind == "local" and settings.setup:
        params["local_setup"] = list(settings.setup)
    executor.update_parameters(**params)
    return executor
