"""Progress of an array job over slides, read from the per-slide records its tasks write.

Prediction and embedding tasks run in other processes (local or SLURM), and each finishes a chunk of many slides;
the command sees the slides they finish as ``<key>.json`` records appearing in the output folder (a shared
filesystem on a cluster). The bar counts those written since the command started, looking at most every few
seconds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Optional, TextIO

from tqdm import tqdm

MIN_INTERVAL_S = 2.0  # a folder of thousands of slides' files is not listed more often than this


class SlideProgress:
    """A progress bar over ``pending`` slide keys whose records go to ``folder`` (``done`` slides already complete);
    shown on a terminal only (or on ``stream``), unless ``enabled`` is False."""

    def __init__(self, folder: Path, pending: Iterable[str], done: int, desc: str, enabled: bool = True,
                 stream: Optional[TextIO] = None) -> None:
        self.folder, self.names, self.done, self.next_at = folder, {f"{key}.json" for key in pending}, done, 0.0
        self.bar = tqdm(total=done + len(self.names), initial=done, unit="slide", desc=desc, file=stream,
                        disable=not enabled or (None if stream is None else False))  # None: on a terminal only
        # stale records (another checkpoint's) count once rewritten, not before; a hidden bar lists nothing
        self.before = {} if self.bar.disable else self._records()

    def _records(self) -> dict[str, int]:
        """The pending slides' records in the folder, with their modification times (ns)."""
        try:
            with os.scandir(self.folder) as entries:
                return {e.name: e.stat().st_mtime_ns for e in entries if e.name in self.names}
        except FileNotFoundError:
            return {}

    def written(self) -> int:
        """Pending slides whose record was written since this command started (compared with what was there then,
        not with this machine's clock, which a cluster's file server need not share)."""
        return sum(1 for name, mtime in self._records().items() if self.before.get(name) != mtime)

    def poll(self) -> None:
        if self.bar.disable or time.monotonic() < self.next_at:
            return
        self.next_at = time.monotonic() + MIN_INTERVAL_S
        self.bar.update(self.done + self.written() - self.bar.n)

    def close(self) -> None:
        self.next_at = 0.0
        self.poll()
        self.bar.close()
