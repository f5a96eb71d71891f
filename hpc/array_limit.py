"""More array tasks than a SLURM cluster takes in one array job (``MaxArraySize``: 1001 by default; sbatch refuses
a larger array with "Invalid job array specification"): the items are submitted as several arrays, at once, that
together keep to the command's parallelism. Each array gets its share of it (``--array=...%N``); where the
parallelism is smaller than the number of arrays, each runs one task at a time and waits (``afterany``) for the
array ``parallelism`` places before it, so that no more than ``parallelism`` tasks ever run.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

import submitit


@functools.lru_cache(maxsize=1)
def max_array_size() -> int | None:
    """The cluster's ``MaxArraySize`` (an array's task indices must stay below it), from ``scontrol show config``;
    None where it does not say (nothing is split then, as before)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        name, _, value = line.partition("=")
        if name.strip() == "MaxArraySize":
            try:
                return int(value.strip()) or None
            except ValueError:
                return None
    return None


def batches(n_items: int, limit: int | None) -> list[range]:
    """The items' indices in arrays of at most ``limit`` tasks, of equal sizes (within one)."""
    if not limit or n_items <= limit:
        return [range(n_items)]
    count = -(-n_items // limit)
    size, longer = divmod(n_items, count)
    bounds = [i * size + min(i, longer) for i in range(count + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def shares(parallelism: int, count: int) -> list[tuple[int, int | None]]:
    """Each array's tasks at once and the index of the array it waits for (None: none): the parallelism dealt
    out; where it is smaller than ``count``, one task at a time, each array after the one ``parallelism`` before."""
    parallelism = max(1, parallelism)
    if parallelism >= count:
        return [(parallelism // count + (i < parallelism % count), None) for i in range(count)]
    return [(1, i - parallelism if i >= parallelism else None) for i in range(count)]


def map_in_arrays(executor: submitit.AutoExecutor, fn: Callable[[Any], Any], items: Sequence[Any],
                  parallelism: int) -> list[submitit.Job[Any]]:
    """``executor.map_array(fn, items)``, as several array jobs where there are more items than the cluster's
    ``MaxArraySize``; the jobs in the items' order. Should a later submission be refused, the arrays already
    submitted are cancelled before the refusal is raised: nothing is left running that no ledger remembers."""
    parts = batches(len(items), max_array_size())
    if len(parts) == 1:
        return executor.map_array(fn, items)
    before = dict(executor._executor.parameters)
    jobs: list[submitit.Job[Any]] = []
    firsts: list[submitit.Job[Any]] = []
    try:
        for part, (at_once, after) in zip(parts, shares(parallelism, len(parts))):
            wait = f"afterany:{str(firsts[after].job_id).split('_')[0]}" if after is not None else None
            dependency = ",".join(d for d in (before.get("dependency"), wait) if d) or None
            executor._executor.parameters.update(array_parallelism=at_once, dependency=dependency)
            submitted = executor.map_array(fn, [items[i] for i in part])
            firsts.append(submitted[0])
            jobs += submitted
    except BaseException:
        _cancel({str(job.job_id).split("_")[0] for job in firsts})
        raise
    finally:
        executor._executor.parameters.clear()
        executor._executor.parameters.update(before)
    return jobs


def _cancel(job_ids: set[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *sorted(job_ids)], capture_output=True, timeout=60, check=False)
