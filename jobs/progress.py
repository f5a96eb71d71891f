"""Progress of jobs that run in other processes, read from the files their tasks write.

Prediction and embedding tasks run in other processes (local or SLURM), and each finishes a chunk of many slides;
the command sees the slides they finish as ``<key>.json`` records appearing in the output folder (a shared
filesystem on a cluster). The bar counts those written since the command started, looking at most every few
seconds. Training (`lymphoma train`, every fold of `lymphoma cv`) rewrites its ``history.json`` after each epoch;
the epoch bar counts the entries of those files.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TextIO

from tqdm import tqdm

from lymphoma.selection import stop_early
from lymphoma.settings import TrainSettings

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


@dataclass(frozen=True)
class WatchedTraining:
    """One training another process runs: the ``history.json`` it rewrites after each epoch, and its settings
    (how many epochs, and whether it may stop early)."""

    history: Path
    train: TrainSettings

    def entries(self) -> list[dict[str, Any]]:
        """The epochs trained so far; none while no (readable) history exists."""
        try:
            entries = json.loads(self.history.read_text())
        except (OSError, ValueError):
            return []
        return entries if isinstance(entries, list) else []

    def epochs_done(self, entries: list[dict[str, Any]]) -> int:
        """How far along ``entries`` are: all of the epochs once the training stopped early."""
        train = self.train
        if stop_early(entries, train.patience, train.select, train.first_candidate):
            return train.epochs
        return min(len(entries), train.epochs)


class EpochProgress:
    """A progress bar over the epochs of ``trainings`` (shown on a terminal only, or on ``stream``, unless
    ``enabled`` is False); a training that stopped early counts as complete. Beside a single training's bar: its
    last epoch's validation loss and balanced accuracy."""

    def __init__(self, trainings: Sequence[WatchedTraining], desc: str, enabled: bool = True,
                 stream: Optional[TextIO] = None) -> None:
        self.trainings, self.next_at = list(trainings), 0.0
        done, figures = self._read()  # a resumed training starts where it stopped: not progress made now
        self.bar = tqdm(total=sum(t.train.epochs for t in self.trainings), initial=done, unit="epoch", desc=desc,
                        postfix=figures, file=stream, disable=not enabled or (None if stream is None else False))

    def _read(self) -> tuple[int, Optional[str]]:
        """The epochs done over all trainings, and a single training's last validation figures."""
        read = [(t, t.entries()) for t in self.trainings]
        figures = None
        if len(read) == 1 and read[0][1]:
            last = read[0][1][-1]
            figures = (f"val loss {last.get('val_loss', float('nan')):.3f}, balanced accuracy "
                       f"{last.get('val_balanced_accuracy', float('nan')):.3f}")
        return sum(t.epochs_done(entries) for t, entries in read), figures

    def poll(self) -> None:
        if self.bar.disable or time.monotonic() < self.next_at:
            return
        self.next_at = time.monotonic() + MIN_INTERVAL_S
        done, figures = self._read()
        if figures:
            self.bar.set_postfix_str(figures, refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.next_at = 0.0
        self.poll()
        self.bar.close()
