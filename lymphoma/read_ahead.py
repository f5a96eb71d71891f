"""Reading slides ahead of the model: decoding, tiling and stain normalisation run in reader threads beside the
forward passes (a GPU takes tiles ten times faster than one reader gives them: predict.readers). Every reader
hands its slides over through its own bounded queue, so memory stays bounded however large a slide is, and the
slides come out in input order whatever the number of readers.

Reader processes were measured and left out: spawned through multiprocessing queues, each pays an interpreter
start and pickles its tiles through a pipe (2 readers gave 600 tiles in 4.3 s against 0.26 s for one thread on
this project's 2-core machine); they need shared-memory hand-over to pay."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from lymphoma.errors import ImageError, InputError
from lymphoma.image_scale import TrainingScale
from lymphoma.settings import TileSettings
from lymphoma.stain import StainNormalizer
from lymphoma.tile_sources import open_normalized_tiles


def _as_error(path: str, err: BaseException) -> Exception:
    """The slide's error as prediction reports it: input errors as they are, anything else (PIL's
    DecompressionBombError, a codec's ValueError) as an ImageError naming the file."""
    if isinstance(err, (InputError, OSError)):
        return err
    return ImageError(path, f"cannot be read ({type(err).__name__}: {err})")


def _read(slides: Sequence[tuple[int, str, str]], settings: TileSettings, batch: int, stain: Optional[dict[str, Any]],
          put: Any, stop: Any, scale: Optional[TrainingScale] = None) -> None:
    """One reader: its slides' normalised tile batches (tile by tile, or by image where the target's scope is
    image; plain images at another scale matched to ``scale``), then each slide's TileSource, or the slide's error;
    stops early when ``stop`` is set."""
    normalizer = StainNormalizer.from_state(stain)
    for index, path, region_file in slides:
        if stop.is_set():
            return
        try:
            source = open_normalized_tiles(path, settings, normalizer, batch, region_file, scale)
            for pixels in source.batches:
                if stop.is_set():
                    return
                put((index, pixels))
            put((index, source))
        except Exception as err:  # noqa: BLE001 - the slide fails, never the reader
            put((index, _as_error(path, err)))


class ReadStalled(ImageError):
    """A slide whose reader handed over nothing for ``predict.read_timeout_min``: its reading hangs."""


@dataclass
class _Reader:
    """A reader thread, the queue it hands its items over through, its stop event and its slides."""

    work: list[tuple[int, str, str]]
    items: queue.Queue
    stop: threading.Event
    thread: threading.Thread

    @classmethod
    def start(cls, work: list[tuple[int, str, str]], depth: int, settings: TileSettings, batch: int,
              stain: Optional[dict[str, Any]], scale: Optional[TrainingScale]) -> "_Reader":
        items: queue.Queue = queue.Queue(maxsize=max(1, depth))
        stop = threading.Event()
        thread = threading.Thread(target=_read, args=(work, settings, batch, stain, items.put, stop, scale), daemon=True)
        thread.start()
        return cls(work, items, stop, thread)


def read_ahead(slides: Sequence[Any], settings: TileSettings, depth: int, batch: int,
               stain: Optional[dict[str, Any]], readers: int = 1,
               scale: Optional[TrainingScale] = None, stall_s: Optional[float] = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, item)`` per slide in input order: tile batches (arrays), then the slide's TileSource once
    all its tiles were yielded, or the error that stopped it. ``readers`` threads (slide i read by reader i mod
    readers), each with a queue of ``depth`` items; ``scale``: a pixel-tile model's training scale (``_read``).
    A slide whose reader hands over nothing for ``stall_s`` seconds (a damaged file whose decoder hangs, a network
    filesystem that stopped answering) fails with ``ReadStalled``; that reader is left behind (a thread cannot be
    stopped inside a read) and a new one reads its next slides."""
    readers = max(1, min(readers, len(slides) or 1))
    work = [[(i, slides[i].path, slides[i].regions) for i in range(r, len(slides), readers)] for r in range(readers)]
    active = [_Reader.start(work[r], depth, settings, batch, stain, scale) for r in range(readers)]
    left: list[_Reader] = []  # hung in a read: never waited for
    try:
        for index in range(len(slides)):
            reader = active[index % readers]
            stalled = yield from _slide_items(reader, index, slides[index].path, stall_s)
            if stalled:
                reader.stop.set()
                left.append(reader)
                active[index % readers] = _Reader.start([w for w in reader.work if w[0] > index], depth, settings,
                                                        batch, stain, scale)
    finally:
        for reader in active + left:
            reader.stop.set()
        _drain(active)


def _slide_items(reader: _Reader, index: int, path: str,
                 stall_s: Optional[float]) -> Generator[tuple[int, Any], None, bool]:
    """One slide's items from its reader's queue; a reader that died without a word fails the slide. True where
    the reader handed over nothing for ``stall_s`` seconds (the slide then fails with ``ReadStalled``)."""
    since = time.monotonic()
    while True:
        try:
            got, item = reader.items.get(timeout=min(1.0, stall_s or 1.0))
        except queue.Empty:
            if not reader.thread.is_alive():
                raise RuntimeError(f"the reader of {path} ended without handing it over") from None
            if stall_s is not None and time.monotonic() - since >= stall_s:
                yield index, ReadStalled(path, f"nothing read for {stall_s / 60:.3g} min (predict.read_timeout_min): "
                                               "its reading hangs (a damaged file whose decoder never returns, or a "
                                               "filesystem that stopped answering); the next slides went on")
                return True
            continue
        yield got, item
        if not isinstance(item, np.ndarray):
            return False
        since = time.monotonic()  # the model's time on the batch is not the reader's


def _drain(readers: list[_Reader]) -> None:
    """Unblock readers waiting on a full queue until they end."""
    while any(reader.thread.is_alive() for reader in readers):
        for reader in readers:
            try:
                reader.items.get_nowait()
            except queue.Empty:
                pass
        time.sleep(0.01)
