"""`lymphoma download`: fetch the public data set's tarball (resumable), verify it, unpack into class folders."""

from __future__ import annotations

import hashlib
import http.client
import logging
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from lymphoma.errors import InputError
from lymphoma.images import is_image_file

log = logging.getLogger(__name__)

CLASSES = ("CLL", "FL", "MCL")
CHUNK = 1 << 20
COMPLETE_MARKER = ".download-complete"
STARTED_MARKER = ".download-started"  # the folder is this command's: its class folders may be replaced


def download_dataset(dest: str | Path, urls: Sequence[str], sha1: str | None, classes: Sequence[str] = CLASSES,
                     attempts: int = 3, timeout_s: float = 60.0) -> Path:
    """Make ``dest/<class>/<image>`` from the first address that works; rerunning resumes or does nothing."""
    dest = Path(dest)
    if (dest / COMPLETE_MARKER).is_file():
        return dest
    if not urls:
        raise InputError("no download address; give --url or set download.urls")
    archive = dest / Path(PurePosixPath(urls[0]).name or "dataset.tar.gz")
    _claim(dest, archive)
    if not archive.is_file():
        errors = []
        for url in urls:
            try:
                _fetch(url, archive, sha1, attempts, timeout_s)
                break
            except (OSError, http.client.HTTPException) as err:
                errors.append(f"{url}: {err}")
            except InputError as err:  # a mirror with another file: try the next one
                errors.append(str(err))
        else:
            raise InputError("download failed from every address (rerun to resume):\n  " + "\n  ".join(errors))
    _unpack(archive, dest, classes)
    (dest / COMPLETE_MARKER).write_text(f"{archive.name}\n")
    archive.unlink()
    return dest


def _claim(dest: Path, archive: Path) -> None:
    """Make ``dest`` this command's (new, empty, or an earlier download's): unpacking replaces its class folders,
    so a folder of someone's own images is refused, never emptied."""
    ours = {archive.name, f"{archive.name}.part", ".unpack", STARTED_MARKER}  # an interrupted download's files
    others = sorted(p.name for p in dest.iterdir() if p.name not in ours) if dest.is_dir() else []
    if others and not (dest / STARTED_MARKER).is_file():
        shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
        raise InputError(f"--dest {dest} holds other files ({shown}); the class folders unpacked there would replace "
                         "any of the same name: give a new or empty folder")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / STARTED_MARKER).touch()
    except OSError as err:
        raise InputError(f"cannot create {dest} ({err.strerror}); choose a writable --dest") from None


def _fetch(url: str, archive: Path, sha1: str | None, attempts: int, timeout_s: float) -> None:
    """Download ``url`` to ``archive``, resuming ``archive.part`` with HTTP Range; verify, then rename."""
    part = archive.with_name(archive.name + ".part")
    for attempt in range(1, attempts + 1):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                append = have > 0 and response.status == 206
                total = _total_size(response, have if append else 0)
                with part.open("ab" if append else "wb") as out:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        _progress(out.tell(), total)
                    if total is not None and out.tell() < total:
                        raise http.client.IncompleteRead(b"", total - out.tell())
            break
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:  # nothing left to fetch: the part is whole
                break
            _end_progress()
            raise
        except (OSError, http.client.HTTPException) as err:
            _end_progress()
            log.warning(f"{url}: download interrupted ({err}); attempt {attempt} of {attempts}")
            if attempt == attempts:
                raise
    _end_progress()
    if sha1:
        digest = _sha1(part)
        if digest != sha1.lower():
            part.unlink()
            raise InputError(f"{url}: SHA-1 {digest} differs from the expected {sha1}; the download was removed. "
                             "Retry; if the publisher changed the file, check it and pass --sha1 with the new value")
    part.replace(archive)


def _total_size(response: object, offset: int) -> int | None:
    length = response.headers.get("Content-Length")  # type: ignore[attr-defined]
    return offset + int(length) if length and length.isdigit() else None


def _end_progress() -> None:
    """End the terminal's progress line (only a terminal has one: logs and pipes get no stray blank line)."""
    if sys.stderr.isatty():
        print(file=sys.stderr)


def _progress(done: int, total: int | None) -> None:
    if sys.stderr.isatty():
        shown = f"{done / 2**20:.0f} / {total / 2**20:.0f} MiB" if total else f"{done / 2**20:.0f} MiB"
        print(f"\rdownloading {shown}", end="", file=sys.stderr)


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _unpack(archive: Path, dest: Path, classes: Sequence[str]) -> None:
    """Extract images found under a folder named after a class to ``dest/<class>/``; other members are ignored."""
    staging = dest / ".unpack"
    shutil.rmtree(staging, ignore_errors=True)
    found = dict.fromkeys(classes, 0)
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                label = next((p for p in reversed(parts[:-1]) if p in found), None)
                if not member.isfile() or label is None or not is_image_file(Path(parts[-1])):
                    continue
                target = staging / label / parts[-1]
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, target.open("wb") as out:  # type: ignore[union-attr]
                    shutil.copyfileobj(src, out, CHUNK)
                found[label] += 1
    except (tarfile.TarError, EOFError, OSError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        archive.unlink(missing_ok=True)
        raise InputError(f"{archive}: cannot unpack ({err}); it was removed, rerun to download it again") from None
    if not any(found.values()):
        raise InputError(f"{archive}: no images under folders named {list(classes)}; is it the lymphoma data set?")
    for label in classes:
        if found[label]:
            shutil.rmtree(dest / label, ignore_errors=True)
            (staging / label).replace(dest / label)
    shutil.rmtree(staging, ignore_errors=True)
