"""Cluster plumbing: executors (local, debug, slurm) and array jobs. Knows nothing of pathology."""

from hpc.array import ArrayJobError, TaskFailure, run_array, wait_for
from hpc.executors import EXECUTOR_KINDS, ExecutorSettings, make_executor

__all__ = ["EXECUTOR_KINDS", "ArrayJobError", "ExecutorSettings", "TaskFailure", "make_executor", "run_array", "wait_for"]
