"""Cluster plumbing. Knows nothing of pathology.

One import path per public name: executors and array jobs from ``hpc`` itself; the task side, which imports
torch, from its own modules: ``hpc.task`` (``task_setup``, the device, threads and process group every task
runs in), ``hpc.distributed`` (``resolve``, who this process is in its job) and ``hpc.memory``
(``keep_freed_memory``, which ``task_setup`` applies).
"""

from hpc.array import ArrayJobError, SubmissionError, TaskFailure, run_array, submit, wait_for
from hpc.executors import EXECUTOR_KINDS, ExecutorSettings, make_executor

__all__ = ["EXECUTOR_KINDS", "ArrayJobError", "ExecutorSettings", "SubmissionError", "TaskFailure", "make_executor",
           "run_array", "submit", "wait_for"]
