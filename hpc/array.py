"""Map a function over items as an array job, gather the results, and name every failed task with its logs."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import submitit

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class TaskFailure:
    """One task that did not return a result."""

    index: int
    job_id: str
    error: str
    stdout: Path
    stderr: Path


class ArrayJobError(RuntimeError):
    """Some tasks of an array failed; ``results`` holds the others' results (None where failed)."""

    def __init__(self, name: str, failures: Sequence[TaskFailure], results: list[Any]) -> None:
        self.failures = list(failures)
        self.results = results
        lines = [f"{len(failures)} of {len(results)} task(s) of {name!r} failed:"]
        for f in failures:
            lines.append(f"  task {f.index} (job {f.job_id}): {_last_error_line(f.error)}\n    logs: {f.stderr} and {f.stdout}")
        super().__init__("\n".join(lines))


def _last_error_line(message: str) -> str:
    """The exception line of a task's error, without submitit's framing of the traceback."""
    body = message.split("-" * 22)
    text = body[1] if len(body) >= 3 else message  # submitit: header, traceback, log paths
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message"


def run_array(executor: submitit.AutoExecutor, fn: Callable[[T], R], items: Sequence[T], *,
              parallelism: int = 1, poll_s: float = 0.5,
              on_done: Callable[[int, R | None], None] | None = None) -> list[R]:
    """Run ``fn(item)`` for every item and return the results in order.

    SLURM and debug executors get one array job (SLURM caps it at ``parallelism`` tasks at once);
    the local executor starts at most ``parallelism`` processes at a time. ``on_done(index,
    result)`` is called as each task ends (result None if it failed). Raises ArrayJobError after all
    tasks have ended if any failed.
    """
    items = list(items)
    results: list[Any] = [None] * len(items)
    failures: list[TaskFailure] = []
    name = str(executor.parameters.get("name", getattr(fn, "__name__", "array")))

    def finish(index: int, job: submitit.Job[Any]) -> None:
        try:
            results[index] = job.result()
        except Exception as err:  # noqa: BLE001 - any task error is reported with its logs
            failures.append(TaskFailure(index, str(job.job_id), f"{type(err).__name__}: {err}",
                                        job.paths.stdout, job.paths.stderr))
        if on_done is not None:
            on_done(index, results[index])

    if executor.cluster == "local":
        waiting = list(range(len(items)))
        running: dict[int, submitit.Job[Any]] = {}
        while waiting or running:
            while waiting and len(running) < parallelism:
                index = waiting.pop(0)
                running[index] = executor.submit(fn, items[index])
            for index, job in list(running.items()):
                if job.done():
                    finish(index, running.pop(index))
            if running:
                time.sleep(poll_s)
    else:
        jobs = executor.map_array(fn, items) if items else []
        if executor.cluster == "debug":  # runs each task in this process, in order, when its result is asked
            for index, job in enumerate(jobs):
                finish(index, job)
        open_jobs = {} if executor.cluster == "debug" else dict(enumerate(jobs))
        while open_jobs:
            for index, job in list(open_jobs.items()):
                if job.done():
                    finish(index, open_jobs.pop(index))
            if open_jobs:
                time.sleep(poll_s)
    if failures:
        raise ArrayJobError(name, sorted(failures, key=lambda f: f.index), results)
    return results
