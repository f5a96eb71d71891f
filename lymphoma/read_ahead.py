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
from collections.abc import Iterator, Sequence
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


def read_ahead(slides: Sequence[Any], settings: TileSettings, depth: int, batch: int,
               stain: Optional[dict[str, Any]], readers: int = 1,
               scale: Optional[TrainingScale] = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, item)`` per slide in input order: tile batches (arrays), then the slide's TileSource once
    all its tiles were yielded, or the error that stopped it. ``readers`` threads (slide i read by reader i mod
    readers), each with a queue of ``depth`` items; ``scale``: a pixel-tile model's training scale (``_read``)."""
    readers = max(1, min(readers, len(slides) or 1))
    work = [[(i, slides[i].path, slides[i].regions) for i in range(r, len(slides), readers)] for r in range(readers)]
    queues: list[queue.Queue] = [queue.Queue(maxsize=max(1, depth)) for _ in range(readers)]
    stop = threading.Event()
    workers = [threading.Thread(target=_read, args=(work[r], settings, batch, stain, queues[r].put, stop, scale),
                                daemon=True)
               for r in range(readers)]
    for worker in workers:
        worker.start()
    try:
        for index in range(len(slides)):
            yield from _slide_items(queues[index % readers], workers[index % readers], slides[index].path)
    finally:
        stop.set()
        _drain(queues, workers)


def _slide_items(items: Any, worker: Any, path: str) -> Iterator[tuple[int, Any]]:
    """One slide's items from its reader's queue; a reader that died without a word fails the slide."""
    while True:
        try:
            index, item = items.get(timeout=1.0)
        except queue.Empty:
            if not worker.is_alive():
                raise RuntimeError(f"the reader of {path} ended without handing it over") from None
            continue
        yield index, item
        if not isinstance(item, np.ndarray):
            return


def _drain(queues: list[queue.Queue], workers: list[threading.Thread]) -> None:
    """Unblock readers waiting on a full queue until they end."""
    while any(worker.is_alive() for worker in workers):
        for items in queues:
            try:
                items.get_nowait()
            except queue.Empty:
                pass
        time.sleep(0.01)
