"""Why a task was killed: SLURM's memory limit, read from what its step wrote to the task's error log or from its
state, and, for a local task, the kernel's out-of-memory killer.

A task that uses more memory than its job asked for is killed by SLURM: by its cgroup (the job's state is then
OUT_OF_MEMORY and slurmstepd logs an oom-kill event) or, on clusters that poll usage (``JobAcctGatherParams=
OverMemoryKill``), by slurmstepd itself (the state is FAILED or CANCELLED). Either way the task's own error is
only srun's "task 0: Killed"; this names the cause and the setting. A local task killed outright (SIGKILL) writes
neither a result nor an error; where the kernel's out-of-memory killer ended processes meanwhile (``/proc/vmstat``
counts them), that is named, with what to lower.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

# slurmstepd's words in a task's error log: polled usage over the limit, or the cgroup's out-of-memory killer
OVER_LIMIT = re.compile(r"exceeded memory limit \((\d+) > (\d+)\)", re.IGNORECASE)
SIGNS = ("exceeded job memory limit", "exceeded memory limit", "oom-kill event", "out-of-memory handler",
         "oom_kill event")
TAIL_BYTES = 64 * 1024  # slurmstepd writes its lines last
VMSTAT = Path("/proc/vmstat")


def killed_for_memory(stderr: Path, state: str | Callable[[], str]) -> str | None:
    """A one-line error for a task that SLURM killed for memory, with the setting to raise; None otherwise. The
    ``state`` (or what gives it: asked only where the log does not say) may be OUT_OF_MEMORY."""
    text = _tail(stderr).lower()
    if not any(sign in text for sign in SIGNS) and \
            not (state if isinstance(state, str) else state()).upper().startswith("OUT_OF_MEMORY"):
        return None
    over = OVER_LIMIT.findall(text)
    if over:
        used, limit = (int(n) / 2**30 for n in over[-1])
        asked = (f"it had reached {used:.2f} GB of the {limit:.2f} GB its job asked for; ask for more, "
                 f"cluster.mem_gb={_more(used)} say")
    else:
        asked = "it needed more than its job asked for; raise cluster.mem_gb"
    return f"MemoryError: SLURM killed the task for memory ({asked}), then rerun: finished work is kept"


def _more(used_gb: float) -> int:
    """A request with room: twice what the task had reached when it was killed, in whole GB."""
    return max(1, math.ceil(2 * used_gb))


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - TAIL_BYTES))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def oom_kill_count() -> int | None:
    """How many processes the kernel's out-of-memory killer has ended on this machine since it started (its cgroup
    limits included); None where the system does not say."""
    try:
        for line in VMSTAT.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def killed_outright(oom_kills_before: int | None) -> str:
    """A one-line error for a local task whose process ended without writing a result or an error, naming the
    kernel's out-of-memory killer where it ended processes since ``oom_kills_before`` (``oom_kill_count``)."""
    now = oom_kill_count()
    if now is not None and oom_kills_before is not None and now > oom_kills_before:
        return (f"MemoryError: the task's process was killed before it wrote a result or an error, while the kernel's "
                f"out-of-memory killer ended {now - oom_kills_before} process(es) on this machine: it ran out of "
                "memory; run fewer tasks at once (cluster.parallelism) or give each less to hold, then rerun: "
                "finished work is kept")
    return ("the task's process was killed before it wrote a result or an error (SIGKILL, from outside: kill -9 or "
            "the system); rerun: finished work is kept")
