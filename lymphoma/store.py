"""One HDF5 tile shard (PyTables): written under a temporary name, renamed when complete, validated on reruns.

Layout of a shard:
  /imgs      UInt8 [N, size, size, 3], chunk = one tile, compressed
  /labels    Int16 [N]           class index into the ``classes`` attribute
  /coords    Int32 [N, 2]        top-left (x, y) of each tile in the resized image (negative in the padding)
  /filenames String [N]          source file name of each tile
  /cases     String [N]          case (patient) of each tile
  /images    table, one row per source image: filename, case, label, height, width, n_tiles, n_background
Attributes: the tile settings, the stain target the tiles were normalised to (JSON null: stored as read),
classes, per-class tile and image counts, skipped images, a fingerprint of what the shard was made from, a
BLAKE2b digest of every array and the image table as written (``digests``: a shard is renamed into place only
after it was closed, re-opened and found equal to them; reruns and training check them again), and ``complete``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import tables

from lymphoma.errors import DiskFullError, ImageError, InputError, is_disk_full, one_line
from lymphoma.inputs import ImageRecord
from lymphoma.settings import TileSettings
from lymphoma.stain import StainNormalizer
from lymphoma.tile_sources import open_tiles

log = logging.getLogger(__name__)

STORE_FORMAT = 2  # 2: digests of every array
ARRAYS = ("imgs", "labels", "coords", "filenames", "cases")  # the per-tile arrays, in the order they are appended


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
    fingerprint: str = ""  # of what the shard was made from (images, labels, settings)


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
        self.name_len = max([len(r.name.encode()) for r in records] + [1])
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
        self.classes = list(classes)
        self.label_of = {name: i for i, name in enumerate(classes)}
        self.tiles_per_class = dict.fromkeys(classes, 0)
        self.images_per_class = dict.fromkeys(classes, 0)
        self.n_background = 0
        self.digests = {name: hashlib.blake2b() for name in ARRAYS}  # of the bytes appended, as meant to be stored

    def add(self, record: ImageRecord, settings: TileSettings, qc: Path | None,
            stain: StainNormalizer | None = None) -> None:
        """Append one image's tiles and its row; on an error, drop what it had appended and re-raise."""
        rows_before, digests_before = int(self.imgs.nrows), {k: d.copy() for k, d in self.digests.items()}
        name, label = record.name.encode(), self.label_of[record.label]
        try:
            source = open_tiles(record.path, settings, qc_path=qc, region_file=record.regions, stain=stain)
            tile_labels = self._tile_labels(record, source.labels, len(source.coords))
            done = 0
            for pixels in source.batches:  # whole slides arrive a batch at a time: memory stays bounded
                self._append("imgs", pixels)
                self._append("labels", tile_labels[done:done + len(pixels)])
                done += len(pixels)
                self._append("filenames", np.full(len(pixels), name, dtype=f"S{self.name_len}"))
                self._append("cases", np.full(len(pixels), record.case.encode(), dtype=f"S{self.case_len}"))
            self._append("coords", np.asarray(source.coords, dtype=np.int32))
        except BaseException:
            for array in ARRAYS:
                getattr(self, array).truncate(rows_before)
            self.digests = digests_before
            raise
        n = int(self.imgs.nrows - rows_before)
        (height, width), row = source.shape, self.images.row
        row["filename"], row["case"], row["label"] = record.name.encode(), record.case.encode(), label
        row["height"], row["width"], row["n_tiles"], row["n_background"] = height, width, n, source.n_background
        row.append()
        for index, count in zip(*np.unique(tile_labels, return_counts=True)):
            self.tiles_per_class[self.classes[index]] += int(count)
        self.images_per_class[record.label] += 1
        self.n_background += source.n_background

    def _tile_labels(self, record: ImageRecord, region_classes: list[str | None] | None, n: int) -> np.ndarray:
        """Each tile's class index: its region's class (tiles.region_labels), else its image's."""
        labels = np.full(n, self.label_of[record.label], dtype=np.int16)
        for i, name in enumerate(region_classes or []):
            if name is None:
                continue
            if name not in self.label_of:
                raise ImageError(record.path, f"its region file {record.regions} has a region of class {name!r}, "
                                              f"not one of {list(self.label_of)}; rename it in QuPath, or set "
                                              "tiles.region_labels=false to label tiles by their image")
            labels[i] = self.label_of[name]
        return labels

    def _append(self, array: str, values: np.ndarray) -> None:
        getattr(self, array).append(values)
        self.digests[array].update(np.ascontiguousarray(values).tobytes())

    def digest_table(self) -> str:
        """The digest of the image table as written (read back from PyTables' buffers before closing)."""
        self.images.flush()
        return hashlib.blake2b(self.images.read().tobytes()).hexdigest()


def _digest(node: tables.Leaf, block: int = 256) -> str:
    """BLAKE2b of a stored array or table's bytes, read back in blocks of rows."""
    digest = hashlib.blake2b()
    for start in range(0, node.nrows, block):
        digest.update(np.ascontiguousarray(node.read(start, min(start + block, node.nrows))).tobytes())
    return digest.hexdigest()


def verify_shard(path: Path) -> str | None:
    """What is wrong with the stored bytes of a shard (None: every array and the image table read back equal
    to the digests recorded when it was written)."""
    try:
        with tables.open_file(path, mode="r") as h5:
            recorded = json.loads(h5.root._v_attrs.digests)
            for name in (*ARRAYS, "images"):
                if _digest(h5.get_node("/", name)) != recorded[name]:
                    return f"the bytes of /{name} differ from the digest recorded when it was written"
    except (OSError, tables.HDF5ExtError, tables.NoSuchNodeError, AttributeError, KeyError, ValueError) as err:
        return f"it cannot be read back ({type(err).__name__}: {one_line(err)})"
    return None


def _write_attrs(h5: tables.File, arrays: _ShardArrays, phase: str, classes: Sequence[str], settings: TileSettings,
                 compression: str, skipped: list[dict[str, str]], fingerprint: str, seconds: float,
                 stain: Optional[dict[str, Any]]) -> None:
    """The shard's attributes; ``complete`` last of all."""
    attrs = h5.root._v_attrs
    attrs.format = STORE_FORMAT
    attrs.phase = phase
    attrs.classes = json.dumps(list(classes))
    attrs.tiles = json.dumps(settings.as_dict())
    attrs.stain = json.dumps(stain)
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
    attrs.digests = json.dumps({**{k: d.hexdigest() for k, d in arrays.digests.items()}, "images": arrays.digest_table()})
    attrs.seconds = seconds
    attrs.complete = True


def write_shard(path: Path, phase: str, records: Sequence[ImageRecord], classes: Sequence[str],
                settings: TileSettings, compression: str, fingerprint: str, strict: bool = False,
                stain: Optional[dict[str, Any]] = None) -> ShardSummary:
    """Tile ``records`` into the shard at ``path``; the file appears only once it is complete. ``stain``: the
    target of image-scope stain normalisation (tiles stored normalised), None to store them as read.

    Unusable images are skipped and listed (raised in strict mode).
    """
    normalizer = StainNormalizer.from_state(stain)
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
                qc = path.parent.parent / "qc" / f"{record.key}.png" if settings.by_resolution else None
                try:
                    arrays.add(record, settings, qc, normalizer)
                except (InputError, OSError) as err:
                    if is_disk_full(err):
                        raise
                    reason = err.problem if isinstance(err, ImageError) else f"cannot be read ({err})"
                    if strict:
                        raise ImageError(record.path, reason) from None
                    skipped.append({"path": record.path, "reason": reason})
            seconds = time.perf_counter() - start
            _write_attrs(h5, arrays, phase, classes, settings, compression, skipped, fingerprint, seconds, stain)
        _check_written(tmp, path)
        os.replace(tmp, path)
    except (OSError, tables.HDF5ExtError) as err:
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            raise DiskFullError(path.parent, _size(tmp), shutil.disk_usage(path.parent).free, f"{path.name}") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return ShardSummary(path=str(path), phase=phase, n_images=sum(arrays.images_per_class.values()),
                        n_tiles=sum(arrays.tiles_per_class.values()), tiles_per_class=arrays.tiles_per_class,
                        images_per_class=arrays.images_per_class, n_background=arrays.n_background,
                        bytes=path.stat().st_size, seconds=seconds, skipped=skipped, fingerprint=fingerprint)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _check_written(tmp: Path, path: Path) -> None:
    """A closed shard goes to disk and is read back equal to its digests before it may take its final name;
    HDF5 can close a file whose writes failed (a full disk) without an error."""
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    problem = verify_shard(tmp)
    if problem is None:
        return
    free = shutil.disk_usage(tmp.parent).free
    if free < max(_size(tmp), 1 << 20):  # the writes that went missing did not fit
        raise DiskFullError(path.parent, _size(tmp), free, path.name)
    raise OSError(f"{path}: the shard written just now does not read back ({problem}); check the disk under "
                  f"{path.parent}, then rerun")


def read_complete_shard(path: Path, fingerprint: str) -> ShardSummary | None:
    """The summary of a complete shard made from the same inputs and settings whose bytes read back equal to
    their digests, else None (a rerun writes it again). A damaged one is named in a warning: a disk that loses
    data is worth knowing about."""
    summary = _complete_summary(path, fingerprint)
    problem = verify_shard(Path(path)) if summary is not None else None
    if problem:
        log.warning(f"{path} is damaged: {problem}; it is written again")
    return None if problem else summary


def _complete_summary(path: Path, fingerprint: str) -> ShardSummary | None:
    """The summary a complete shard of this fingerprint records, else None."""
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
                                skipped=json.loads(attrs.skipped), fingerprint=fingerprint)
    except (OSError, tables.HDF5ExtError, AttributeError, KeyError, ValueError, tables.NoSuchNodeError) as err:
        log.warning(f"{path} is damaged: it cannot be read ({one_line(err)}); it is written again")
        return None
