"""Local tasks end with the command that started them.

submitit starts each local task under a controller process that is meant to outlive the Python session that
submitted it. For a command that waits for its tasks that is wrong when the command is killed outright (kill -9,
the OOM killer, a closed terminal's SIGHUP): its tasks ran on, and a rerun of the same command then trained or
wrote beside them into the same run folder. Ctrl-C and SIGTERM already stop them (``hpc.array.stop_local_tasks``);
this covers the rest. The command names itself in the environment of the local tasks it submits
(``tied_to_this_process``); each task watches that process (``end_with_command``) and, once it is gone, stops
itself as a cancelled local task is stopped: SIGINT, then SIGKILL after a grace period. SLURM jobs are not tied:
they are meant to run on and be picked up by a rerun.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "HPC_COMMAND_PROCESS"  # "<pid>:<start time>" of the command that submitted this local task


def _stat_fields(pid: int | str) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name in parentheses (which may hold spaces): the
    state first, the start time (field 22) at index 19."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_identity(pid: int) -> str:
    """``<pid>:<start time in clock ticks>`` (Linux ``/proc``), so that a reused pid is not taken for the process;
    ``<pid>:`` where ``/proc`` does not tell."""
    try:
        return f"{pid}:{_stat_fields(pid)[19]}"
    except OSError:
        return f"{pid}:"


def alive(identity: str) -> bool:
    """Whether the process named by ``identity`` still runs (a zombie, or another process on its pid, does not)."""
    pid, _, started = identity.partition(":")
    try:
        fields = _stat_fields(pid)
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: only whether the pid exists
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return fields[0] != "Z" and (not started or fields[19] == started)


@contextmanager
def tied_to_this_process() -> Iterator[None]:
    """Local tasks submitted inside this block stop when this process is gone (they inherit its environment)."""
    before = os.environ.get(ENV)
    os.environ[ENV] = process_identity(os.getpid())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


CONTROLLER_ERRORS = "controllers.err"  # where local task controllers write their own stderr


@contextmanager
def controller_errors_in(folder: Path) -> Iterator[None]:
    """Local task controllers started inside this block write their own stderr to ``folder/controllers.err``
    instead of this command's terminal. A Ctrl-C there reaches them with the command (one process group), and each
    printed its KeyboardInterrupt traceback over the command's own message, though they stop their tasks as meant.
    The tasks' output goes to their logs either way."""
    folder.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with (folder / CONTROLLER_ERRORS).open("ab") as target:
            os.dup2(target.fileno(), 2)  # a process started now inherits it as its stderr
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def end_with_command(poll_s: float = 1.0, grace_s: float = 30.0) -> None:
    """In a task: watch the command that submitted it (if it named itself) from a daemon thread, and stop this
    process once the command is gone."""
    identity = os.environ.pop(ENV, None)
    if not identity:
        return
    threading.Thread(target=_watch, args=(identity, poll_s, grace_s), daemon=True, name="end-with-command").start()


def _watch(identity: str, poll_s: float, grace_s: float) -> None:
    while alive(identity):
        time.sleep(poll_s)
    log.warning(f"the command that started this task (pid {identity.partition(':')[0]}) is gone: this task stops "
                "too (rerun the command to resume)")
    os.kill(os.getpid(), signal.SIGINT)  # as a cancelled local task: KeyboardInterrupt, so that cleanups run
    time.sleep(grace_s)
    os.kill(os.getpid(), signal.SIGKILL)
