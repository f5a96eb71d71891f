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


def remembered(ledger: Path) -> list[str]:
    """The job ids last submitted for this folder (several where one array was split: ``hpc.array_limit``), if any
    (an unreadable ledger counts as none)."""
    try:
        saved = json.loads(ledger.read_text(encoding="utf-8"))
        return [str(job_id) for job_id in saved.get("job_ids") or [saved["job_id"]]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def still_queued(job_ids: list[str]) -> Optional[str]:
    """The states SLURM still holds the jobs (every task of their arrays) in, e.g. 'RUNNING'; None once they have
    left the queue, or where squeue cannot tell."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(j.split("_")[0] for j in job_ids), "-o", "%T"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = sorted({line.strip() for line in out.stdout.splitlines() if line.strip()})
    return ", ".join(states) if out.returncode == 0 and states else None


def refuse_beside_open_job(ledger: Optional[Path], what: str) -> None:
    """SubmissionError when a job remembered in ``ledger`` is still queued or running."""
    job_ids = remembered(ledger) if ledger is not None else []
    states = still_queued(job_ids) if job_ids else None
    if states:
        bases = " ".join(job_id.split("_")[0] for job_id in job_ids)
        raise SubmissionError(
            f"SLURM job {bases} ({what}), submitted earlier for {ledger.parent}, is still {states}: a second job "
            f"would write beside it. Wait for it to end (squeue -j {bases.replace(' ', ',')}), or cancel it "
            f"(scancel {bases}); then rerun the same command, which resumes from what it wrote")


def remember(ledger: Optional[Path], jobs: Any) -> None:
    """Write the ids of the jobs just submitted (one job, or the tasks of one or more arrays) into ``ledger``."""
    every = list(jobs) if isinstance(jobs, (list, tuple)) else [jobs]
    if ledger is None or not every or every[0] is None:
        return
    job_ids = list(dict.fromkeys(str(job.job_id).split("_")[0] for job in every))
    ledger.parent.mkdir(parents=True, exist_ok=True)
    tmp = ledger.with_name(f"{ledger.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"job_id": job_ids[0], "job_ids": job_ids}) + "\n", encoding="utf-8")
    os.replace(tmp, ledger)
