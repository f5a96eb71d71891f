"""What the benchmarks share: printing their figures and saving them as JSON."""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional


def emit(results: dict[str, Any], out: Optional[Path]) -> None:
    """Print the figures as JSON and, with ``--out``, write them there too."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def _timed_task(prepare: Callable[..., Callable[[], None]], args: tuple[Any, ...], threads: int, barrier: Any,
                queue: Any) -> None:
    import torch

    torch.set_num_threads(threads)
    run = prepare(*args)  # built and warmed up, untimed
    barrier.wait()
    cpu_start, start = time.process_time(), time.perf_counter()
    run()
    queue.put((time.perf_counter() - start, time.process_time() - cpu_start))


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
        results = [queue.get(timeout=1800) for _ in tasks]
    finally:
        for task in tasks:
            task.join(timeout=60)
            if task.is_alive():
                task.kill()
    return max(wall for wall, _ in results), sum(cpu for _, cpu in results)
