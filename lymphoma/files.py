"""Writing files so that a reader never sees half of one: temporary name, flush, fsync, rename."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Optional


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) in one step."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step: a reader (or a server loading a model) never sees part of it."""
    write_all_or_none({Path(path): data})


def write_all_or_none(contents: Mapping[Path, bytes]) -> None:
    """Replace each path with its bytes, all of them or (where one cannot be written, e.g. on a full disk) none:
    files that belong together (a model and the record that describes it) never mix two versions."""
    tmps: dict[Path, Path] = {}
    path = None
    try:
        for path, data in contents.items():
            tmps[path] = tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            with tmp.open("wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    except OSError as err:  # a write or fsync names no file: name it, so that a full disk's folder can be told
        err.filename = err.filename or (str(path) if path else None)
        raise
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def write_csv_atomic(path: str | Path, header: Sequence[object], rows: Iterable[Sequence[object]]) -> None:
    """Replace ``path`` with a CSV of ``header`` and ``rows`` in one step."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def file_stamp(path: str | Path) -> Optional[list[int]]:
    """A file's size and modification time (ns), which records keep to tell a file replaced since (a rescan, a
    corrected export) from the one they were made of; None where it cannot be read."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]
