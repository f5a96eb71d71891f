"""The run folder: created and checked writable once, locked against a second concurrent job."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lymphoma.errors import InputError


def make_run_dir(root: str | Path, name: str) -> Path:
    """``root/name``, created if needed; an error that says what to do when it cannot be written."""
    run_dir = (Path(root) / name).absolute()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise InputError(f"cannot write to the run folder {run_dir} ({err.strerror or err}); "
                         "set run.root to a writable folder, e.g. run.root=$HOME/lymphoma-runs") from None
    return run_dir


@contextmanager
def exclusive(run_dir: Path, job: str) -> Iterator[None]:
    """Hold ``run_dir/.<job>.lock`` so that two ``lymphoma <job>`` on one run folder cannot interleave.

    The lock dies with its process, so a killed job never leaves the folder locked.
    """
    path = run_dir / f".{job}.lock"
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise InputError(f"another `lymphoma {job}` (pid {handle.read().strip() or '?'}) is using {run_dir}; "
                             "wait for it to end or choose another run.name") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
