"""SLURM jobs that will never start: while a command waits, the reason of its pending jobs is read (squeue), and a
reason that waiting cannot clear (a time limit above the partition's, an account or QOS that does not exist,
constraints no node meets, a per-job limit) cancels them with one error naming the setting to change; a reason
that clears only by someone's action (nodes down, a partition down, a job held) is said once, as a warning, and so
is a controller that stops answering (and once more when it answers again)."""

from __future__ import annotations

import logging
import re
import subprocess
import time
from collections.abc import Iterable
from typing import Any

from hpc.executors import SubmissionError

log = logging.getLogger(__name__)

# SLURM's job reason codes that waiting never clears, and the settings that decide them
NEVER = {
    "PartitionTimeLimit": "its time limit is above the partition's: lower cluster.timeout_min, or choose a partition "
                          "that allows it (cluster.partition; `sinfo -o '%P %l'` lists their limits)",
    "PartitionNodeLimit": "it asks for more nodes than the partition allows: lower cluster.nodes, or choose another "
                          "cluster.partition",
    "BadConstraints": "no node meets its constraints: fix cluster.constraint (`sinfo -o '%N %f'` lists the features)",
    "InvalidAccount": "its account does not exist or is not yours: fix cluster.account (`sacctmgr show assoc "
                      "user=$USER` lists yours)",
    "InvalidQOS": "its QOS does not exist or is not allowed to you: fix cluster.qos (`sacctmgr show assoc user=$USER`)",
    "DependencyNeverSatisfied": "a job it depends on failed or was cancelled",
}
PER_JOB_LIMIT = re.compile(r"^(QOS|Assoc)Max\w*PerJob\w*$")  # e.g. QOSMaxWallDurationPerJobLimit
PER_JOB_WHY = ("it asks for more than a per-job limit of its QOS or account allows: ask for less (cluster.timeout_min, "
               "cluster.cpus_per_task, cluster.mem_gb, cluster.nodes) or use another cluster.qos")
# reasons that clear when someone acts (an administrator, or the user): worth a word, not an end
STUCK = {
    "ReqNodeNotAvail": "the nodes it needs are down, drained or reserved",
    "PartitionConfig": "its partition cannot give what it asks for now (cluster.cpus_per_task, cluster.mem_gb, "
                       "cluster.gpus_per_node, cluster.nodes; `sinfo -N -l` lists what its nodes have)",
    "PartitionDown": "its partition is down",
    "PartitionInactive": "its partition is inactive",
    "JobHeldAdmin": "an administrator holds it",
    "JobHeldUser": "it is held (`scontrol release <id>` lets it start)",
}


SILENT_EVERY_S = 30.0  # how often to look while the controller does not answer (each look then blocks for 18 s)


class PendingWatch:
    """Reads the reasons of a command's pending SLURM jobs every ``every_s`` while it waits for them."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s, self.next_look, self.said = every_s, 0.0, set[str]()
        self.last: dict[str, str] = {}  # job -> its reason at the last look
        self.silent = False  # the controller did not answer at the last look

    def check(self, jobs: Iterable[Any]) -> None:
        """Raise SubmissionError (the jobs cancelled) where SLURM will never start one; warn once per stuck reason.
        Either only for a reason seen at two looks in a row: a job just submitted may show one for a moment."""
        if time.monotonic() < self.next_look:
            return
        self.next_look = time.monotonic() + self.every_s
        ids = sorted({str(job.job_id).split("_")[0] for job in jobs})
        if not ids:
            return
        reasons, error = pending_reasons(ids)
        if self._controller_silent(error):  # squeue took its 18 s to give up: look less often until it answers,
            self.next_look = time.monotonic() + SILENT_EVERY_S  # so that the wait loop goes on between looks
            return
        for job_id, reason in reasons.items():
            code = reason.split(",")[0].strip()
            settled, self.last[job_id] = self.last.get(job_id) == code, code
            why = NEVER.get(code) or (PER_JOB_WHY if PER_JOB_LIMIT.match(code) else None)
            if not settled:
                continue
            if why is not None:
                subprocess.run(["scancel", *ids], capture_output=True, timeout=60, check=False)
                raise SubmissionError(f"SLURM will never start job {job_id}: it is pending for {reason!r}, which waiting "
                                      f"does not clear; {why}. Its job(s) {', '.join(ids)} were cancelled; nothing "
                                      "of it ran: fix the setting and rerun the same command")
            if code in STUCK and code not in self.said:
                self.said.add(code)
                log.warning(f"SLURM job {job_id} is pending for {reason!r}: {STUCK[code]}; it starts only when that "
                            "changes (this command waits; Ctrl-C leaves the job queued for a rerun to pick up)")

    def _controller_silent(self, error: str | None) -> bool:
        """Whether squeue got no answer: said once when the controller stops answering, and once when it answers
        again (a restart, a maintenance: the jobs go on on their nodes meanwhile, and the command waits)."""
        if error is not None and not self.silent:
            log.warning(f"the SLURM controller does not answer ({error}); the jobs go on on their nodes and this "
                        "command waits for it to answer again (Ctrl-C leaves them to a rerun of the same command)")
        elif error is None and self.silent:
            log.warning("the SLURM controller answers again; waiting for the jobs goes on")
        self.silent = error is not None
        return self.silent


def pending_reasons(ids: list[str]) -> tuple[dict[str, str], str | None]:
    """The reason of each pending job or array task of ``ids`` (squeue's %r), and squeue's error where it got no
    answer (the controller down or unreachable)."""
    try:
        listed = subprocess.run(["squeue", "-h", "-r", "-t", "PENDING", "-o", "%i|%r", "-j", ",".join(ids)],
                                capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return {}, f"squeue: {err}"
    if listed.returncode != 0 and "Invalid job id" not in listed.stderr:  # jobs gone from its memory: no error
        lines = [line.strip() for line in listed.stderr.splitlines() if line.strip()]
        return {}, lines[-1] if lines else f"squeue exited with status {listed.returncode}"
    reasons = {}
    for line in listed.stdout.splitlines():
        job_id, _, reason = line.partition("|")
        if reason.strip():
            reasons[job_id.strip()] = reason.strip()
    return reasons, None
