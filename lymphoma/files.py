"""Writing files so that a reader never sees half of one: temporary name, flush, fsync, rename."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:  # a write or fsync names no file: name it, so that a full disk's folder can be told
        err.filename = err.filename or str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_csv_atomic(path: str | Path, header: Sequence[object], rows: Iterable[Sequence[object]]) -> None:
    """Replace ``path`` with a CSV of ``header`` and ``rows`` in one step."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
