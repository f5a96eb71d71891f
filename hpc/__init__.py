"""Cluster plumbing. Knows nothing of pathology.

One import path per public name: executors, array jobs, ``end_with_command`` (a local task stops when the
command that started it is gone: ``hpc.orphans``) and ``refuse_beside_open_job`` (one SLURM job at a time per
output folder: ``hpc.ledger``) from ``hpc`` itself; the task side, which imports
torch, from its own modules: ``hpc.task`` (``task_setup``, the device, threads and process group every task
runs in), ``hpc.distributed`` (``resolve``, who this process is in its job) and ``hpc.memory``
(``keep_freed_memory``, which ``task_setup`` applies).
"""

from hpc.array import ArrayJobError, SubmissionError, TaskFailure, run_array, submit, wait_for
from hpc.executors import EXECUTOR_KINDS, ExecutorSettings, make_executor
from hpc.ledger import refuse_beside_open_job
from hpc.orphans import end_with_command

__all__ = ["EXECUTOR_KINDS", "ArrayJobError", "ExecutorSettings", "SubmissionError", "TaskFailure", "end_with_command",
           "make_executor", "refuse_beside_open_job", "run_array", "submit", "wait_for"]
