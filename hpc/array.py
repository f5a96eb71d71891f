"""Map a function over items as an array job, gather the results, and name every failed task with its logs."""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import submitit

from hpc.array_limit import map_in_arrays
from hpc.executors import SubmissionError
from hpc.killed import killed_for_memory, killed_outright, oom_kill_count
from hpc.ledger import refuse_beside_open_job, remember
from hpc.orphans import controller_errors_in, tied_to_this_process
from hpc.pending import PendingWatch
from hpc.refusals import refusal

# SLURM states after which no result file will come; others (CONFIGURING, COMPLETING, ...) are still open.
FINAL_SLURM_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                      "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
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


class Resumable(submitit.helpers.Checkpointable):
    """A task function whose work resumes (complete slides, shards or files are kept): at its SLURM time limit or
    a preemption, submitit requeues the same call, which does only what is left, instead of failing the task (a
    time-out at most ``max_num_timeout`` times, 3: a task that can never finish in its time still fails)."""

    def __init__(self, fn: Callable[[T], R]) -> None:
        self.fn, self.__name__ = fn, getattr(fn, "__name__", "array")

    def __call__(self, item: T) -> R:
        return self.fn(item)


def submit(executor: submitit.AutoExecutor, fn: Callable[..., R], *args: Any,
           ledger: Path | None = None) -> submitit.Job[R]:
    """``executor.submit`` with a refusal by the scheduler turned into one SubmissionError; a local task is tied
    to this process (``hpc.orphans``: it stops when this process is gone, even killed with -9), its controller's
    own stderr goes to its folder's controllers.err (``hpc.orphans.controller_errors_in``); a SLURM job is
    refused while the one remembered in ``ledger`` still runs, and then remembered there (``hpc.ledger``)."""
    if executor.cluster == "local":
        folder = submitit.core.utils.JobPaths.get_first_id_independent_folder(executor.folder)
        with tied_to_this_process(), controller_errors_in(folder):
            return executor.submit(fn, *args)
    return _one_at_a_time(executor, ledger, fn, lambda: executor.submit(fn, *args))


def _one_at_a_time(executor: submitit.AutoExecutor, ledger: Path | None, fn: Callable[..., Any],
                   submit_now: Callable[[], Any]) -> Any:
    """Submit (a refusal by sbatch as a SubmissionError) unless the SLURM job remembered in ``ledger`` still runs."""
    if executor.cluster == "slurm":
        refuse_beside_open_job(ledger, _job_name(executor, fn))
    submitted = _refused_as_error(executor, submit_now)
    if executor.cluster == "slurm":
        remember(ledger, submitted)
    return submitted


def _parameters(executor: submitit.AutoExecutor) -> dict[str, Any]:
    return executor._executor.parameters if hasattr(executor, "_executor") else executor.parameters


def _time_limit(executor: submitit.AutoExecutor) -> Any:
    """The tasks' time limit in minutes, as the executor was given it (None where none)."""
    return _parameters(executor).get("timeout_min") or _parameters(executor).get("time")


def _job_name(executor: submitit.AutoExecutor, fn: Callable[..., Any]) -> str:
    params = _parameters(executor)
    return str(params.get("name") or params.get("job_name") or getattr(fn, "__name__", "array"))


def _failure_message(err: Exception, job: submitit.Job[Any], oom_kills: int | None,
                     limit_min: Any = None) -> str:
    """A failed task's error or, where it wrote none, why (killed for memory, killed outright, a full disk, or its
    state), with the setting to change where it ran out of time (``limit_min``: its limit, where known) or memory
    (SLURM's lines in its log, whether or not the task then wrote an error: a worker process killed for memory
    makes its parent fail; ``oom_kills``: the kernel's count when it started)."""
    unwritten = _wrote_nothing(err) and (_unwritten_error(job.paths.stdout) or _killed_locally(job, oom_kills)
                                         or f"no result, the job ended as {job.state}")
    message = _killed_for_memory(job) or unwritten or f"{type(err).__name__}: {err}"
    if "timed-out" in message or "TIMEOUT" in message:
        local = isinstance(job, submitit.LocalJob)
        message = (f"TimeoutError: the task reached its time limit{f' of {limit_min} min' if limit_min else ''} "
                   f"({_last_error_line(message)}); raise cluster.timeout_min"
                   f"{' (null: none on this machine)' if local else ''}, then rerun: finished work is kept")
    return message


def _wrote_nothing(err: Exception) -> bool:
    """Whether a task's error is submitit's for a task that wrote neither a result nor an error (its FailedJobError,
    a task's own error, is a kind of UncompletedJobError)."""
    return isinstance(err, submitit.core.utils.UncompletedJobError) and \
        not isinstance(err, submitit.core.utils.FailedJobError)


def _unwritten_error(stdout: Path) -> str | None:
    """The error of a task whose result file could not be written (a full disk, a quota: submitit then only logs
    it), as one line, with the reason it could not be written."""
    try:
        text = stdout.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    _, found, rest = text.rpartition("Could not dump error:")
    if not found:
        return None
    error, _, reason = rest.partition("\n\nbecause of ")
    reason = reason.strip().splitlines()[0] if reason.strip() else "no reason logged"
    return f"{' '.join(error.split())} (nor could its result file be written: {reason})"


def _killed_for_memory(job: submitit.Job[Any]) -> str | None:
    """For a SLURM task killed for memory (``hpc.killed``): that, with the setting to raise."""
    return killed_for_memory(job.paths.stderr, lambda: job.state) if isinstance(job, submitit.SlurmJob) else None


def _killed_locally(job: submitit.Job[Any], oom_kills: int | None) -> str | None:
    """For a local task whose process ended without a result or an error: killed outright, for memory or not."""
    return killed_outright(oom_kills) if isinstance(job, submitit.LocalJob) else None


def _refused_as_error(executor: submitit.AutoExecutor, submit_now: Callable[[], Any]) -> Any:
    """Run a submission; sbatch's refusal becomes a SubmissionError that quotes its reason and the fix."""
    try:
        return submit_now()
    except submitit.core.utils.FailedJobError as err:
        if executor.cluster != "slurm":
            raise
        reason = "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or "no reason given"
        raise refusal(reason) from None


def stop_local_tasks(jobs: Iterable[submitit.Job[Any]], grace_s: float = 10.0) -> None:
    """Stop the local tasks still running (their controllers pass the signal on and kill them). On SLURM the
    jobs stay, so that a rerun of the same command can pick them up."""
    local = [job for job in jobs if isinstance(job, submitit.LocalJob) and not job.done()]
    for job in local:
        job.cancel(check=False)
    deadline = time.monotonic() + grace_s
    while any(not job.done() for job in local) and time.monotonic() < deadline:
        time.sleep(0.1)


def wait_for(job: submitit.Job[Any], name: str, on_poll: Callable[[], None] | None = None,
             poll_s: float = 1.0) -> list[Any]:
    """The results of every task of one job (e.g. a multi-process training), calling ``on_poll`` every ``poll_s``
    while it runs (progress read from what it writes); ArrayJobError names the logs. Stopping this process
    (Ctrl-C, SIGTERM) stops the job's local tasks too."""
    oom_kills = oom_kill_count()
    try:
        if isinstance(job, submitit.DebugJob):
            return [_run_in_process(job)]
        watch = PendingWatch()
        while not _ended(job, "slurm" if isinstance(job, submitit.SlurmJob) else "local"):  # not submitit's done():
            if on_poll is not None:  # it takes a job still CONFIGURING on SLURM for one that ended (_ended)
                on_poll()
            if isinstance(job, submitit.SlurmJob):
                watch.check([job])
            time.sleep(poll_s)
        return job.results()
    except (KeyboardInterrupt, SystemExit):  # this command is being stopped
        stop_local_tasks([job])
        raise
    except SubmissionError:  # SLURM would never start it (hpc.pending): cancelled, nothing ran
        raise
    except Exception as err:  # noqa: BLE001 - reported with the job's logs, task by task
        raise ArrayJobError(name, *_task_failures(job, err, oom_kills)) from None


def _task_failures(job: submitit.Job[Any], err: Exception,
                   oom_kills: int | None) -> tuple[list[TaskFailure], list[Any]]:
    """Each failed task of a job that failed, with its own error and logs (a rank killed outright, and the ranks
    that then lost it), and the results of the tasks that finished."""
    if job.num_tasks == 1:
        return [_task_failure(job, 0, err, oom_kills)], [None]
    failures, results = [], []
    for rank in range(job.num_tasks):
        task = job.task(rank)
        task._results_timeout_s = 1  # the job has ended: each result file is there or never comes
        try:
            results.append(task.result())
        except Exception as task_err:  # noqa: BLE001 - this task's own error
            failures.append(_task_failure(task, rank, task_err, oom_kills))
            results.append(None)
    return failures or [_task_failure(job, 0, err, oom_kills)], results


def _task_failure(task: submitit.Job[Any], rank: int, err: Exception, oom_kills: int | None) -> TaskFailure:
    """One task's failure, as ``_failure_message`` names it."""
    return TaskFailure(rank, str(task.job_id), _failure_message(err, task, oom_kills), task.paths.stdout,
                       task.paths.stderr)


def _run_in_process(job: submitit.DebugJob) -> Any:
    """A debug task, run here as submitit's DebugJob runs it, except that its exception is written with the
    traceback to stderr and the task's log and raised: never a post-mortem prompt waiting at a terminal."""
    saved = dict(os.environ)
    os.environ.update(job.environ)  # SUBMITIT_DEBUG_JOB_ID: the task sees its job environment
    try:
        return job.submission().result()
    except Exception:
        text = traceback.format_exc()
        job.paths.stderr.parent.mkdir(parents=True, exist_ok=True)
        with open(job.paths.stderr, "a", encoding="utf-8") as log:
            log.write(text)
        sys.stderr.write(text)
        raise
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _result(job: submitit.Job[Any]) -> Any:
    """A task's result (debug tasks run now, in this process)."""
    return _run_in_process(job) if isinstance(job, submitit.DebugJob) else job.result()


def _ended(job: submitit.Job[Any], cluster: str) -> bool:
    """Whether a task is over: its result file exists or, on SLURM, its state is final.

    submitit's own ``done()`` takes any state it does not know (such as CONFIGURING) as done, and
    then waits only a few seconds for a result that is still to come.
    """
    if cluster != "slurm":
        return job.done()
    if job.paths.result_pickle.exists():
        return True
    return job.done() and job.state.split(" ")[0].upper() in FINAL_SLURM_STATES


def _expired(deadline: float | None, open_jobs: dict[int, submitit.Job[Any]], waiting: list[int],
             failures: list[TaskFailure]) -> bool:
    """Past the deadline: cancel what is still open or waiting and record it as failed."""
    if deadline is None or time.monotonic() < deadline:
        return False
    for index, job in open_jobs.items():
        job.cancel(check=False)
        failures.append(TaskFailure(index, str(job.job_id), "TimeoutError: cancelled at the array's time limit",
                                    job.paths.stdout, job.paths.stderr))
    for index in waiting:
        failures.append(TaskFailure(index, "-", "TimeoutError: never started before the array's time limit",
                                    Path("-"), Path("-")))
    return True


def _last_error_line(message: str) -> str:
    """The exception line of a task's error, without submitit's framing of the traceback."""
    body = message.split("-" * 22)
    text = body[1] if len(body) >= 3 else message  # submitit: header, traceback, log paths
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message"


def _wait_all(executor: submitit.AutoExecutor, fn: Callable[[T], R], items: list[T],
              running: dict[int, submitit.Job[Any]], waiting: list[int], parallelism: int, poll_s: float,
              deadline: float | None, failures: list[TaskFailure], finish: Callable[[int, submitit.Job[Any]], None],
              on_poll: Callable[[], None] | None = None) -> None:
    """Submit the waiting items (local: at most ``parallelism`` processes at once), finish each ended task, and
    call ``on_poll`` at each look at the tasks; SLURM tasks pending for a reason that never clears end it."""
    watch = PendingWatch()
    while waiting or running:
        while waiting and len(running) < parallelism:
            index = waiting.pop(0)
            running[index] = submit(executor, fn, items[index])
            # a local task's process has ended when it is asked: its result file is there or never comes
            # (submitit waits 15 s for one a shared filesystem may be slow to show, per dead task)
            running[index]._results_timeout_s = 1
        for index, job in list(running.items()):
            if _ended(job, executor.cluster):
                finish(index, running.pop(index))
        if on_poll is not None:
            on_poll()
        if executor.cluster == "slurm":
            watch.check(running.values())
        if running and _expired(deadline, running, waiting, failures):
            break
        if running:
            time.sleep(poll_s)


def run_array(executor: submitit.AutoExecutor, fn: Callable[[T], R], items: Sequence[T], *,
              parallelism: int = 1, poll_s: float = 0.5, timeout_s: float | None = None,
              on_done: Callable[[int, R | None], None] | None = None,
              on_poll: Callable[[], None] | None = None, ledger: Path | None = None,
              resumable: bool = False) -> list[R]:
    """Run ``fn(item)`` for every item and return the results in order; ``resumable``: a task resumes its own work,
    so SLURM requeues it at its time limit or a preemption (``Resumable``).

    SLURM and debug executors get one array job (SLURM caps it at ``parallelism`` tasks at once; beyond the
    cluster's MaxArraySize, several that share the parallelism: ``hpc.array_limit``);
    the local executor starts at most ``parallelism`` processes at a time. ``on_done(index,
    result)`` is called as each task ends (result None if it failed), ``on_poll()`` at each look at the
    tasks (every ``poll_s``: progress read from what they write). On SLURM, ``ledger`` (a file in the folder the
    tasks write) keeps one array at a time there across runs of the command (``hpc.ledger``). Tasks still open after
    ``timeout_s`` are cancelled and count as failed. Raises ArrayJobError after all tasks have ended
    if any failed.
    """
    items = list(items)
    fn = Resumable(fn) if resumable and not isinstance(fn, submitit.helpers.Checkpointable) else fn
    results: list[Any] = [None] * len(items)
    failures: list[TaskFailure] = []
    name = _job_name(executor, fn)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    oom_kills = oom_kill_count()

    def finish(index: int, job: submitit.Job[Any]) -> None:
        try:
            results[index] = _result(job)
        except Exception as err:  # noqa: BLE001 - any task error is reported with its logs
            failures.append(TaskFailure(index, str(job.job_id), _failure_message(err, job, oom_kills, _time_limit(executor)),
                                        job.paths.stdout, job.paths.stderr))
        if on_done is not None:
            on_done(index, results[index])

    waiting = list(range(len(items)))
    running: dict[int, submitit.Job[Any]] = {}
    if executor.cluster != "local" and items:  # one array job; SLURM applies the parallelism itself
        def submit_all() -> list[submitit.Job[Any]]:  # beyond the cluster's MaxArraySize, as several arrays
            slurm = executor.cluster == "slurm"
            return map_in_arrays(executor, fn, items, parallelism) if slurm else executor.map_array(fn, items)

        running, waiting = dict(enumerate(_one_at_a_time(executor, ledger, fn, submit_all))), []
    if executor.cluster == "debug":  # each task runs in this process, in order, when its result is asked
        for index in sorted(running):
            finish(index, running.pop(index))
    try:
        _wait_all(executor, fn, items, running, waiting, parallelism, poll_s, deadline, failures, finish, on_poll)
    except BaseException:  # stopped (Ctrl-C, SIGTERM) or failing to submit: no local task outlives this command
        stop_local_tasks(running.values())
        raise
    if failures:
        raise ArrayJobError(name, sorted(failures, key=lambda f: f.index), results)
    return results
