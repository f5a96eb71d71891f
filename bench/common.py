"""What the benchmarks share: printing their figures and saving them as JSON."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional


def reference_cv_parser(description: str) -> argparse.ArgumentParser:
    """The parser of the scripts that refit the reference baseline over many fold assignments: ``-c`` (the
    config whose cohort and cv settings they use), ``--repeats`` (assignments, from cv.seed on) and ``--out``;
    a script adds its own options to it."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path)
    return parser


def reference_cv_args(description: str) -> argparse.Namespace:
    """The arguments of ``reference_cv_parser``, parsed."""
    return reference_cv_parser(description).parse_args()


def emit(results: dict[str, Any], out: Optional[Path]) -> None:
    """Print the figures as JSON and, with ``--out``, write them there too."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def assignment_scores(per_assignment: list[tuple[float, float]], records: list[dict[str, Any]],
                      classes: list[str]) -> dict[str, Any]:
    """Image and case accuracy of each fold assignment, their mean and sd, and each class's image recall over
    ``records`` (every image's out-of-fold record, ``label`` and ``majority_class``, of every assignment)."""
    import numpy as np

    arr = np.asarray(per_assignment, dtype=float).reshape(-1, 2)

    def mean_sd(column: np.ndarray) -> list[float]:
        return [round(float(column.mean()), 3), round(float(column.std()), 3)]

    recall = {c: round(float(np.mean([r["majority_class"] == c for r in records if r["label"] == c])), 3)
              for c in classes}
    return {"image": arr[:, 0].round(3).tolist(), "case": arr[:, 1].round(3).tolist(),
            "image_mean_sd": mean_sd(arr[:, 0]), "case_mean_sd": mean_sd(arr[:, 1]), "recall": recall}


def timed(run: Callable[[], Any]) -> tuple[float, float]:
    """Wall and CPU seconds (the process's, all threads) of ``run()``."""
    cpu_start, start = time.process_time(), time.perf_counter()
    run()
    return time.perf_counter() - start, time.process_time() - cpu_start


def _timed_task(prepare: Callable[..., Callable[[], None]], args: tuple[Any, ...], threads: int, barrier: Any,
                queue: Any) -> None:
    import torch

    from hpc.memory import keep_freed_memory

    keep_freed_memory()  # as every job's task does (hpc.task.task_setup)
    torch.set_num_threads(threads)
    run = prepare(*args)  # built and warmed up, untimed
    barrier.wait()
    queue.put(timed(run))


def _next_result(queue: Any, tasks: list[Any], limit_s: float = 1800) -> tuple[float, float]:
    """The next task's timing; a task that died without one (its error is on stderr) stops the wait at once."""
    import queue as queues

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=1.0)
        except queues.Empty:
            dead = [t for t in tasks if t.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a timed task exited with code {dead[0].exitcode} (its traceback is above)")
    raise TimeoutError(f"no timing from the tasks within {limit_s:.0f} s")


def timed_in_tasks(prepare: Callable[..., Callable[[], None]], per_task: list[tuple[Any, ...]],
                   threads: int) -> tuple[float, float]:
    """Wall seconds (the slowest task) and CPU seconds (all of them) of ``prepare(*args)()`` run in one process of
    ``threads`` torch threads per ``per_task`` entry, all at once, as an array job's tasks share a node: each
    process prepares (``prepare``, a module-level function, untimed), then every process starts together."""
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(len(per_task)), context.Queue()
    tasks = [context.Process(target=_timed_task, args=(prepare, args, threads, barrier, queue)) for args in per_task]
    for task in tasks:
        task.start()
    try:
        results = [_next_result(queue, tasks) for _ in tasks]
    finally:
        for task in tasks:
            task.join(timeout=60)
            if task.is_alive():
                task.kill()
    return max(wall for wall, _ in results), sum(cpu for _, cpu in results)
