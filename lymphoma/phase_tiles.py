"""All shards of a phase read as one indexable collection of tiles (``PhaseTiles``), with one HDF5 handle per
shard and process. Not a torch Dataset: ``lymphoma.loaders`` wraps it in one."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tables

from lymphoma.errors import InputError, one_line


class PhaseTiles:
    """Index ``i`` over the concatenated shards gives ``(tile [H, W, 3] uint8, label)``.

    Labels, cases and file names are loaded once; tile pixels are read on demand. File handles are
    opened lazily in each process (DataLoader workers included) and reused, never per item.
    """

    def __init__(self, shard_paths: Sequence[str | Path]) -> None:
        if not shard_paths:
            raise InputError("no shards given for this phase; run `lymphoma tile` first or check the manifest")
        self.paths = [Path(p) for p in shard_paths]
        labels, cases, names, sizes, shapes = [], [], [], [], []
        self.classes: list[str] | None = None
        self.tile_size: int | None = None
        for path in self.paths:
            try:
                with tables.open_file(path, mode="r") as h5:
                    attrs = h5.root._v_attrs
                    classes, size = json.loads(attrs.classes), int(attrs.tile_size)
                    labels.append(h5.root.labels[:])
                    cases.append(h5.root.cases[:])
                    names.append(h5.root.filenames[:])
                    images = h5.root.images
                    shapes.append(np.stack([images.col("height"), images.col("width")], axis=1))
            except (OSError, tables.HDF5ExtError, tables.NoSuchNodeError, AttributeError) as err:
                raise InputError(f"{path}: not a readable tile shard ({one_line(err)}); rerun `lymphoma tile` to "
                                 "rebuild it") from None
            if self.classes is not None and (classes != self.classes or size != self.tile_size):
                raise InputError(f"{path}: classes {classes} / tile size {size} differ from {self.paths[0]} "
                                 f"({self.classes} / {self.tile_size}); shards of one dataset must match")
            self.classes, self.tile_size = classes, size
            sizes.append(len(labels[-1]))
        self.labels = np.concatenate(labels).astype(np.int64)
        self.targets = self.labels  # what each tile is trained with: its class, or its class and case in one
        #                             integer for the case adversary (lymphoma.adversary.encode)
        self.cases = np.char.decode(np.concatenate(cases), "utf-8")  # stored as UTF-8 bytes
        self.filenames = np.char.decode(np.concatenate(names), "utf-8")
        self.image_shapes = np.concatenate(shapes)  # [images, 2]: each source image's height and width
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self._pid = -1
        self._handles: dict[int, tables.File] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def class_counts(self) -> np.ndarray:
        """Tiles per class, in class order."""
        return np.bincount(self.labels, minlength=len(self.classes or []))

    def _imgs(self, shard: int) -> tables.EArray:
        if self._pid != os.getpid():  # a forked worker must not share its parent's handles
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = tables.open_file(self.paths[shard], mode="r")
        return self._handles[shard].root.imgs

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, row) of a global index."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"tile index {index} out of range for {len(self)} tiles")
        index %= len(self)
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return shard, index - int(self.offsets[shard])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        shard, row = self.locate(int(index))
        return self._imgs(shard)[row], int(self.targets[index])

    def read_batch(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Tiles ``[B, H, W, 3]`` and labels ``[B]`` for a batch of global indices."""
        tiles = np.stack([self[i][0] for i in indices]) if len(indices) else np.empty((0,), np.uint8)
        return tiles, self.labels[np.asarray(indices, dtype=np.int64)]

    @property
    def nbytes(self) -> int:
        """Bytes of all tile pixels, uint8."""
        return len(self) * (self.tile_size or 0) ** 2 * 3

    def read_all(self) -> np.ndarray:
        """Every tile, ``[N, H, W, 3]`` uint8, in index order (read shard by shard into one array)."""
        size = self.tile_size or 0
        pixels = np.empty((len(self), size, size, 3), dtype=np.uint8)
        for shard in range(len(self.paths)):
            start, stop = int(self.offsets[shard]), int(self.offsets[shard + 1])
            if stop > start:
                pixels[start:stop] = self._imgs(shard).read()
        return pixels

    def close(self) -> None:
        if self._pid == os.getpid():
            for handle in self._handles.values():
                handle.close()
        self._handles = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, -1
        return state
