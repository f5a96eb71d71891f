"""Logging for commands and their tasks: stdlib ``logging``, set up once per process.

A command logs to the terminal (information on stdout, warnings and errors on stderr; ``-v`` adds debug
messages, ``-q`` keeps only warnings and errors) and, in full with times, to a log file of its own. A task
that a job runs in another process (local subprocess, SLURM) logs its information with times to its stdout,
which is the task's log file.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path

OURS = ("lymphoma", "jobs", "hpc", "__main__")
FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_MARK = "_lymphoma_handler"  # set on the handlers this module adds, so that a second set-up replaces them


class _Ours(logging.Filter):
    """Our packages' records at the handler's level; other libraries' (submitit, PIL, ...) from warnings up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OURS or record.levelno >= logging.WARNING


class _Console(logging.StreamHandler):
    """stdout for information, stderr for warnings and errors; the streams are looked up at each record, so
    that a test's captured streams (or a redirected sys.stdout) receive them."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        super().emit(record)


class _ConsoleFormat(logging.Formatter):
    """The message as it is; a warning starts with ``warning:``; tracebacks are left to the log file."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return f"warning: {text}" if record.levelno == logging.WARNING else text


class _FolderLog(logging.FileHandler):
    """A log file inside a folder the command makes (``anchor``): records wait in memory until that folder
    exists, so that a command refused before it wrote anything leaves nothing behind (not even its log)."""

    def __init__(self, path: Path, anchor: Path) -> None:
        super().__init__(path, encoding="utf-8", delay=True)
        self.anchor, self.pending, self.broken = anchor, [], False

    def emit(self, record: logging.LogRecord) -> None:
        if self.broken:
            return
        if self.stream is None:
            if not self.anchor.is_dir():
                self.pending.append(record)
                return
            try:
                Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
            except OSError:
                self.handleError(record)
                return
            waiting, self.pending = self.pending, []
            for earlier in waiting:
                if not self.broken:
                    super().emit(earlier)
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """A log file that cannot be written (a full disk, a folder gone) is given up with one warning on the
        terminal: the command goes on and its terminal output stays readable (no traceback per record)."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        if self.broken:
            return
        self._give_up()
        print(f"warning: the log file {self.baseFilename} cannot be written ({error.strerror or error}); this "
              "command's records go to the terminal only", file=sys.stderr)

    def _give_up(self) -> None:
        stream, self.stream, self.pending, self.broken = self.stream, None, [], True
        if stream is not None:
            try:
                stream.close()
            except OSError:  # its buffer cannot be written either
                pass

    def close(self) -> None:
        if self.pending and self.anchor.is_dir():  # the folder appeared after the last record
            self.emit(self.pending.pop())
        try:
            super().close()
        except OSError:  # the last records' flush on a full disk: handled as any failed write
            self.acquire()
            try:
                self._give_up()
            finally:
                self.release()


def _mark(handler: logging.Handler) -> logging.Handler:
    setattr(handler, _MARK, True)
    handler.addFilter(_Ours())
    return handler


def _ours(handlers: Iterable[logging.Handler]) -> list[logging.Handler]:
    return [h for h in handlers if getattr(h, _MARK, False)]


def command_logging(verbosity: int = 0, log_file: Path | None = None, anchor: Path | None = None) -> Path | None:
    """Log this command to the terminal at ``verbosity`` (-1 quiet: warnings up; 0: information; 1: debug)
    and, with times and tracebacks, to ``log_file`` (debug up) once the folder ``anchor`` exists (default: the
    log file's folder; records wait until then). Replaces an earlier set-up of this process; returns the
    log file."""
    end_logging()
    root = logging.getLogger()
    for name in OURS:  # our records from debug up; other libraries' at the root's level (warnings)
        logging.getLogger(name).setLevel(logging.DEBUG)
    console = _mark(_Console())
    console.setLevel({-1: logging.WARNING, 0: logging.INFO}.get(max(-1, min(verbosity, 1)), logging.DEBUG))
    console.setFormatter(_ConsoleFormat())
    root.addHandler(console)
    if log_file is not None:
        file = _mark(_FolderLog(log_file, anchor or log_file.parent))
        file.setLevel(logging.DEBUG)
        file.setFormatter(logging.Formatter(FILE_FORMAT))
        root.addHandler(file)
    logging.captureWarnings(True)
    return log_file


def task_logging() -> None:
    """A task's information, with times, to its stdout (the task's log); nothing is changed in a process that
    already logs (a command running its tasks in process, or a program embedding this one)."""
    root = logging.getLogger()
    if root.handlers:
        return
    root.setLevel(logging.INFO)
    handler = _mark(logging.StreamHandler(sys.stdout))
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    root.addHandler(handler)
    logging.captureWarnings(True)


def end_logging() -> None:
    """Remove (and close) the handlers this module added."""
    root = logging.getLogger()
    for handler in _ours(root.handlers):
        root.removeHandler(handler)
        handler.close()
