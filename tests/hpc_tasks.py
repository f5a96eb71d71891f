"""Task functions for the hpc tests; a module of its own so the local executor's subprocesses can import it."""

from __future__ import annotations

import os
import time
from pathlib import Path


def record_span(args: tuple[str, int]) -> int:
    """Write this task's start and end times to a file; fail for item 3."""
    folder, item = args
    start = time.time()
    time.sleep(0.4)
    Path(folder, f"{item}.span").write_text(f"{start} {time.time()} {os.getpid()}")
    if item == 3:
        raise ValueError(f"item {item} is bad on purpose")
    return item * item


def sleep_for(args: tuple[str, float]) -> None:
    """Touch a file, then sleep (a task to cancel)."""
    marker, seconds = args
    Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)


def resolve_in_task(_: int) -> tuple[int, int, int, str, int, str]:
    """This task's distributed environment."""
    from hpc.distributed import resolve

    env = resolve()
    return env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port, env.source


def fill_the_disk_then_fail(folder: str) -> None:
    """Fill the filesystem of ``folder`` (where the task's result file goes too), then fail."""
    with open(Path(folder, "filler"), "wb") as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        except OSError:
            pass
    raise RuntimeError("the task's own error, on purpose")


def hold_memory(args: tuple[int, float]) -> int:
    """Take ``mib`` MiB, 50 at a time and every page touched, and hold it for ``seconds``: a task that SLURM kills
    where its job asked for less."""
    mib, seconds = args
    blocks = []
    for _ in range(mib // 50):
        blocks.append(bytearray(b"\1" * (50 << 20)))
        time.sleep(0.05)
    time.sleep(seconds)
    return len(blocks) * 50


def hold_memory_in(args: tuple[str, int]) -> int:
    """Move this task's process into the memory cgroup whose ``cgroup.procs`` is given, then take ``mib`` MiB: the
    kernel's out-of-memory killer ends it where the cgroup's limit is lower."""
    procs, mib = args
    Path(procs).write_text(str(os.getpid()))
    return hold_memory((mib, 0))


def lose_a_rank(_: int) -> None:
    """Rank 1 of a two-task job dies of SIGKILL; rank 0 then fails, as a DDP rank does that loses its peer."""
    import signal

    import submitit

    time.sleep(0.5)
    if submitit.JobEnvironment().global_rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(1)
    raise ConnectionResetError("rank 0 lost its peer")
