"""One SLURM job at a time per output folder, across runs of a command.

SLURM jobs outlive the command that submitted them (by design: a rerun resumes from what they wrote). But a rerun
while the earlier job still runs would submit a second job beside it, and two trainings would write one folder's
checkpoints. A command that writes a folder from a SLURM job names a ledger file in it: before submitting, a job
remembered there that SLURM still holds (pending, running, requeued, ...) refuses the submission with what to do;
after submitting, the new job is remembered.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Optional

from hpc.executors import SubmissionError


def remembered(ledger: Path) -> Optional[str]:
    """The job id last submitted for this folder, if any (an unreadable ledger counts as none)."""
    try:
        return str(json.loads(ledger.read_text(encoding="utf-8"))["job_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def still_queued(job_id: str) -> Optional[str]:
    """The states SLURM still holds the job (every task of an array) in, e.g. 'RUNNING'; None once it has left
    the queue, or where squeue cannot tell."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id.split("_")[0], "-o", "%T"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = sorted({line.strip() for line in out.stdout.splitlines() if line.strip()})
    return ", ".join(states) if out.returncode == 0 and states else None


def refuse_beside_open_job(ledger: Optional[Path], what: str) -> None:
    """SubmissionError when the job remembered in ``ledger`` is still queued or running."""
    job_id = remembered(ledger) if ledger is not None else None
    states = still_queued(job_id) if job_id else None
    if states:
        base = job_id.split("_")[0]
        raise SubmissionError(
            f"SLURM job {base} ({what}), submitted earlier for {ledger.parent}, is still {states}: a second job "
            f"would write beside it. Wait for it to end (squeue -j {base}), or cancel it (scancel {base}); then "
            "rerun the same command, which resumes from what it wrote")


def remember(ledger: Optional[Path], jobs: Any) -> None:
    """Write the id of the job just submitted (one job, or the tasks of one array) into ``ledger``."""
    first = jobs[0] if isinstance(jobs, (list, tuple)) else jobs
    if ledger is None or first is None:
        return
    ledger.parent.mkdir(parents=True, exist_ok=True)
    tmp = ledger.with_name(f"{ledger.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"job_id": str(first.job_id).split("_")[0]}) + "\n", encoding="utf-8")
    os.replace(tmp, ledger)
