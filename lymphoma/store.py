"""One HDF5 tile shard (PyTables): written under a temporary name, renamed when complete, validated on reruns.

Layout of a shard:
  /imgs      UInt8 [N, size, size, 3], chunk = one tile, compressed
  /labels    Int16 [N]           class index into the ``classes`` attribute
  /coords    Int32 [N, 2]        top-left (x, y) of each tile in the resized image (negative in the padding)
  /filenames String [N]          source file name of each tile
  /cases     String [N]          case (patient) of each tile
  /images    table, one row per source image: filename, case, label, height, width, n_tiles, n_background
Attributes: the tile settings, classes, per-class tile and image counts, skipped images, a fingerprint of
what the shard was made from, and ``complete``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tables

from lymphoma.errors import ImageError, InputError
from lymphoma.inputs import ImageRecord
from lymphoma.settings import TileSettings
from lymphoma.tile_sources import open_tiles

STORE_FORMAT = 1


@dataclass
class ShardSummary:
    """What one shard holds; also what the manifest lists for it."""

    path: str
    phase: str
    n_images: int
    n_tiles: int
    tiles_per_class: dict[str, int]
    images_per_class: dict[str, int]
    n_background: int
    bytes: int
    seconds: float
    skipped: list[dict[str, str]] = field(default_factory=list)


def parse_compression(spec: str) -> tables.Filters:
    """``none``, ``zlib:6``, ``blosc:zstd:5``, ``blosc2:lz4`` ... to PyTables filters."""
    if spec in ("none", ""):
        return tables.Filters(complevel=0)
    lib, _, level = spec.rpartition(":")
    if not level.isdigit():
        lib, level = spec, "5"
    if lib not in tables.filters.all_complibs:
        raise InputError(f"tiles.compression {spec!r}: unknown library {lib!r}; allowed: none, "
                         + ", ".join(f"{name}[:level]" for name in tables.filters.all_complibs))
    if not 0 <= int(level) <= 9:
        raise InputError(f"tiles.compression {spec!r}: level must be 0..9")
    return tables.Filters(complib=lib, complevel=int(level), shuffle=lib.startswith("blosc"))


class _ImageRow(tables.IsDescription):
    filename = tables.StringCol(255)
    case = tables.StringCol(255)
    label = tables.Int16Col()
    height = tables.Int32Col()
    width = tables.Int32Col()
    n_tiles = tables.Int32Col()
    n_background = tables.Int32Col()


class _ShardArrays:
    """The growing arrays and image table of a shard being written, with its per-class counts."""

    def __init__(self, h5: tables.File, records: Sequence[ImageRecord], classes: Sequence[str], size: int,
                 filters: tables.Filters) -> None:
        self.name_len = max([len(Path(r.path).name.encode()) for r in records] + [1])
        self.case_len = max([len(r.case.encode()) for r in records] + [1])
        self.imgs = h5.create_earray("/", "imgs", tables.UInt8Atom(), shape=(0, size, size, 3),
                                     chunkshape=(1, size, size, 3), filters=filters,
                                     expectedrows=max(1, 64 * len(records)))
        self.labels = h5.create_earray("/", "labels", tables.Int16Atom(), shape=(0,))
        self.coords = h5.create_earray("/", "coords", tables.Int32Atom(), shape=(0, 2))
        self.filenames = h5.create_earray("/", "filenames", tables.StringAtom(self.name_len), shape=(0,),
                                          filters=filters)
        self.cases = h5.create_earray("/", "cases", tables.StringAtom(self.case_len), shape=(0,), filters=filters)
        self.images = h5.create_table("/", "images", _ImageRow)
        self.label_of = {name: i for i, name in enumerate(classes)}
        self.tiles_per_class = dict.fromkeys(classes, 0)
        self.images_per_class = dict.fromkeys(classes, 0)
        self.n_background = 0

    def add(self, record: ImageRecord, settings: TileSettings, qc: Path | None) -> None:
        """Append one image's tiles and its row; on an error, drop what it had appended and re-raise."""
        rows_before = int(self.imgs.nrows)
        name, label = Path(record.path).name.encode(), self.label_of[record.label]
        try:
            source = open_tiles(record.path, settings, qc_path=qc)
            for pixels in source.batches:  # whole slides arrive a batch at a time: memory stays bounded
                self.imgs.append(pixels)
                self.labels.append(np.full(len(pixels), label, dtype=np.int16))
                self.filenames.append(np.full(len(pixels), name, dtype=f"S{self.name_len}"))
                self.cases.append(np.full(len(pixels), record.case.encode(), dtype=f"S{self.case_len}"))
            self.coords.append(source.coords)
        except BaseException:
            for array in (self.imgs, self.labels, self.coords, self.filenames, self.cases):
                array.truncate(rows_before)
            raise
        n = int(self.imgs.nrows - rows_before)
        (height, width), row = source.shape, self.images.row
        row["filename"], row["case"], row["label"] = Path(record.path).name.encode(), record.case.encode(), label
        row["height"], row["width"], row["n_tiles"], row["n_background"] = height, width, n, source.n_background
        row.append()
        self.tiles_per_class[record.label] += n
        self.images_per_class[record.label] += 1
        self.n_background += source.n_background


def _write_attrs(h5: tables.File, arrays: _ShardArrays, phase: str, classes: Sequence[str], settings: TileSettings,
                 compression: str, skipped: list[dict[str, str]], fingerprint: str, seconds: float) -> None:
    """The shard's attributes; ``complete`` last of all."""
    attrs = h5.root._v_attrs
    attrs.format = STORE_FORMAT
    attrs.phase = phase
    attrs.classes = json.dumps(list(classes))
    attrs.tiles = json.dumps(settings.as_dict())
    attrs.tile_size, attrs.stride, attrs.resize, attrs.pad = settings.size, settings.stride, settings.resize, settings.pad
    attrs.compression = compression
    attrs.coords_convention = ("top-left (x, y) in level-0 pixels of the slide" if settings.by_resolution else
                               "top-left (x, y) in the resized image; negative inside the mirror padding")
    attrs.tiles_per_class = json.dumps(arrays.tiles_per_class)
    attrs.images_per_class = json.dumps(arrays.images_per_class)
    attrs.n_tiles = int(arrays.imgs.nrows)
    attrs.n_background = arrays.n_background
    attrs.skipped = json.dumps(skipped)
    attrs.fingerprint = fingerprint
    attrs.seconds = seconds
    attrs.complete = True


def write_shard(path: Path, phase: str, records: Sequence[ImageRecord], classes: Sequence[str],
                settings: TileSettings, compression: str, fingerprint: str, strict: bool = False) -> ShardSummary:
    """Tile ``records`` into the shard at ``path``; the file appears only once it is complete.

    Unusable images are skipped and listed (raised in strict mode).
    """
    start = time.perf_counter()
    path = Path(path)
    for stale in path.parent.glob(path.name + ".tmp-*"):
        stale.unlink()
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    skipped: list[dict[str, str]] = []
    try:
        with tables.open_file(tmp, mode="w", title=f"lymphoma tiles, {phase}") as h5:
            arrays = _ShardArrays(h5, records, classes, settings.size, parse_compression(compression))
            for record in records:
                qc = path.parent.parent / "qc" / f"{Path(record.path).stem}.png" if settings.by_resolution else None
                try:
                    arrays.add(record, settings, qc)
                except (InputError, OSError) as err:
                    reason = err.problem if isinstance(err, ImageError) else f"cannot be read ({err})"
                    if strict:
                        raise ImageError(record.path, reason) from None
                    skipped.append({"path": record.path, "reason": reason})
            seconds = time.perf_counter() - start
            _write_attrs(h5, arrays, phase, classes, settings, compression, skipped, fingerprint, seconds)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return ShardSummary(path=str(path), phase=phase, n_images=sum(arrays.images_per_class.values()),
                        n_tiles=sum(arrays.tiles_per_class.values()), tiles_per_class=arrays.tiles_per_class,
                        images_per_class=arrays.images_per_class, n_background=arrays.n_background,
                        bytes=path.stat().st_size, seconds=seconds, skipped=skipped)


def read_complete_shard(path: Path, fingerprint: str) -> ShardSummary | None:
    """The summary of a complete shard made from the same inputs and settings, else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with tables.open_file(path, mode="r") as h5:
            attrs = h5.root._v_attrs
            if not (getattr(attrs, "complete", False) and getattr(attrs, "fingerprint", None) == fingerprint):
                return None
            if h5.root.imgs.nrows != attrs.n_tiles or h5.root.labels.nrows != attrs.n_tiles:
                return None
            tiles_per_class = json.loads(attrs.tiles_per_class)
            images_per_class = json.loads(attrs.images_per_class)
            return ShardSummary(path=str(path), phase=str(attrs.phase), n_images=sum(images_per_class.values()),
                                n_tiles=int(attrs.n_tiles), tiles_per_class=tiles_per_class,
                                images_per_class=images_per_class, n_background=int(attrs.n_background),
                                bytes=path.stat().st_size, seconds=float(attrs.seconds),
                                skipped=json.loads(attrs.skipped))
    except (OSError, tables.HDF5ExtError, AttributeError, KeyError, ValueError, tables.NoSuchNodeError):
        return None
