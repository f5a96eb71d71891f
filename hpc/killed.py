"""Why SLURM killed a task for memory, read from what its step wrote to the task's error log or from its state.

A task that uses more memory than its job asked for is killed by SLURM: by its cgroup (the job's state is then
OUT_OF_MEMORY and slurmstepd logs an oom-kill event) or, on clusters that poll usage (``JobAcctGatherParams=
OverMemoryKill``), by slurmstepd itself (the state is FAILED or CANCELLED). Either way the task's own error is
only srun's "task 0: Killed"; this names the cause and the setting.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

# slurmstepd's words in a task's error log: polled usage over the limit, or the cgroup's out-of-memory killer
OVER_LIMIT = re.compile(r"exceeded memory limit \((\d+) > (\d+)\)", re.IGNORECASE)
SIGNS = ("exceeded job memory limit", "exceeded memory limit", "oom-kill event", "out-of-memory handler",
         "oom_kill event")
TAIL_BYTES = 64 * 1024  # slurmstepd writes its lines last


def killed_for_memory(stderr: Path, state: str) -> str | None:
    """A one-line error for a task that SLURM killed for memory, with the setting to raise; None otherwise."""
    text = _tail(stderr).lower()
    if not state.upper().startswith("OUT_OF_MEMORY") and not any(sign in text for sign in SIGNS):
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
