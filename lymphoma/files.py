"""Writing files so that a reader never sees half of one: temporary name, flush, fsync, rename."""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lymphoma.errors import InputError, is_disk_full


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


@dataclass(frozen=True)
class PinnedFile:
    """A model file (a checkpoint, pretrained weights) that the tasks of one job read through a name of their own
    (``copy``), named and stamped as the user's file (``path``, its ``file_stamp`` when the job read it). Tasks wait
    in a queue for minutes or hours; a file replaced meanwhile (a training writing best.pt anew, `lymphoma cv`
    shipping its ensemble again, `cp` of another model over it) gave each task the model of the moment it started,
    and one cohort's outputs came from several models under one name. ``copy`` is a hard link where the folder is
    on the file's filesystem (no space taken; a file replaced by a new one, as trainings, `mv` and `rsync` replace
    them, leaves it as it was, and one written over in place, as `cp` does, is told by ``check``), else a copy."""

    path: str
    copy: str
    stamp: tuple[int, int]
    linked: bool = False

    @classmethod
    def pin(cls, path: str | Path, folder: Path, stamp: Sequence[int]) -> "PinnedFile":
        """Link or copy ``path`` into ``folder`` (kept where one of it with ``stamp`` is there, as on a rerun)
        and check that it still has ``stamp``; InputError where it changed since it was read."""
        source = Path(path)
        copy = folder / f"pinned-{source.stem}-{stamp[0]}-{stamp[1]}{source.suffix}"
        if not (copy.is_file() and copy.stat().st_size == stamp[0]):
            folder.mkdir(parents=True, exist_ok=True)
            tmp = copy.with_name(f"{copy.name}.tmp-{os.getpid()}")
            try:
                _link_or_copy(source, tmp)
                _same_stamp(source, stamp)
                os.replace(tmp, copy)
            except OSError as err:
                if is_disk_full(err):  # copyfile names the file it read: a full disk is the copy's folder's
                    err.filename = str(copy)
                raise
            finally:
                tmp.unlink(missing_ok=True)
        _same_stamp(source, stamp)
        linked = os.stat(copy).st_ino == os.stat(source).st_ino
        return cls(str(source.resolve()), str(copy), (int(stamp[0]), int(stamp[1])), linked)

    def check(self) -> None:
        """After a task read ``copy``: InputError where the file was written over in place since the job read it
        (a hard link follows such a write), so that no task runs another model than the job's."""
        if self.linked and file_stamp(self.copy) != list(self.stamp):
            raise InputError(f"{self.path} was written over in place while this job ran (size and modification time "
                             f"{list(self.stamp)}, now {file_stamp(self.copy)}; `cp` onto it, or a save straight into "
                             "it): this task would run another model than the job's tasks before it; replace a model "
                             "file with a new one (write another file, then `mv` it over), and rerun the command")


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or one without hard links, or a file this user may not link
        shutil.copyfile(source, target)


def _same_stamp(source: Path, stamp: Sequence[int]) -> None:
    now = file_stamp(source)
    if now != list(stamp):
        raise InputError(f"{source} changed while this command read it (size and modification time {stamp}, now "
                         f"{now}): something is writing it (a training, a copy); run the command again once it is "
                         "written")


def remove_pinned(folder: Path) -> None:
    """Remove the pinned copies in ``folder`` once no task of its job can read them any more."""
    for copy in folder.glob("pinned-*"):
        copy.unlink(missing_ok=True)
