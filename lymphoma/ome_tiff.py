"""TIFFs that OpenSlide does not read as slides, read level by level through tifffile, only the tiles or strips a
region touches decoded: OME-TIFF pyramids (Bio-Formats, QuPath and tifffile write them: the levels in SubIFDs, which
OpenSlide does not see) and TIFFs of strips too large to decode whole (exports without tiles or pyramid)."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lymphoma.errors import ImageError
from lymphoma.slides import SlideInfo, SlideReader, check_levels, damaged

CHUNK_CACHE_BYTES = 64 << 20  # decoded tiles or strips kept: a row of 256-pixel tiles of a 40,000-pixel-wide slide
UM_PER_UNIT = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def is_ome_tiff(path: Path) -> bool:
    """A TIFF whose first page carries OME-XML."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome)
    except (tifffile.TiffFileError, OSError, ValueError):
        return False


def ome_mpp(xml: str) -> Optional[float]:
    """Microns per pixel of the first image's ``Pixels`` (PhysicalSizeX, in its unit, default µm)."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.endswith("}Pixels") or e.tag == "Pixels"), None)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None
    unit = UM_PER_UNIT.get(pixels.get("PhysicalSizeXUnit", "µm"))
    try:
        return float(pixels.get("PhysicalSizeX")) * unit if unit else None
    except ValueError:
        return None


class TiffLevelsReader(SlideReader):
    """The levels of a TIFF (``pages``, level 0 first), read chunk by chunk: only the tiles or strips a region
    touches are read and decoded, so a slide of any size is never held whole."""

    def __init__(self, path: Path, tif: Any, pages: list[Any], vendor: str, mpp: Optional[float]) -> None:
        self._tif, self._pages = tif, pages
        self._chunks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        page = pages[0]
        if page.dtype != np.uint8 or page.samplesperpixel not in (3, 4) or page.planarconfig != 1:
            tif.close()
            raise ImageError(path, f"is a{'n OME-' if vendor == 'ome-tiff' else ' '}TIFF of {page.dtype} with "
                                   f"{page.samplesperpixel} sample(s) per pixel (planar configuration "
                                   f"{page.planarconfig}); H&E slides need 8-bit interleaved RGB")
        dims = tuple((int(p.imagewidth), int(p.imagelength)) for p in pages)
        self.info = SlideInfo(str(path), vendor, dims, tuple(dims[0][0] / w for w, _ in dims), mpp, None)
        check_levels(self.info)

    def _level_pixels(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB pixels of one level (its own coordinates); outside the image: white."""
        page: Any = self._pages[level]
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        w, h = self.info.level_dimensions[level]
        x0, y0, x1, y1 = max(0, x), max(0, y), min(w, x + width), min(h, y + height)
        if x1 <= x0 or y1 <= y0:
            return out
        th, tw = page.chunks[0], page.chunks[1]  # a tile, or a strip (rows per strip x the image's width)
        across = -(-w // tw)
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                chunk = self._chunk(level, ty * across + tx)
                gx, gy = tx * tw, ty * th
                sx0, sy0, sx1, sy1 = max(x0, gx), max(y0, gy), min(x1, gx + tw), min(y1, gy + th)
                out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = chunk[sy0 - gy:sy1 - gy, sx0 - gx:sx1 - gx, :3]
        return out

    def _chunk(self, level: int, index: int) -> np.ndarray:
        """Tile or strip ``index`` of ``level``, decoded ``[rows, width, samples]``; the last CHUNK_CACHE_BYTES of
        them are kept (the tiles of a row are cut from the same strips)."""
        key = (level, index)
        if key in self._chunks:
            self._chunks.move_to_end(key)
            return self._chunks[key]
        page: Any = self._pages[level]
        handle, decode = self._tif.filehandle, page.decode  # decode first: making it may read the file elsewhere
        handle.seek(page.dataoffsets[index])
        data = handle.read(page.databytecounts[index])
        try:
            chunk = decode(data, index, jpegtables=page.jpegtables)[0].reshape(-1, page.chunks[1], page.samplesperpixel)
        except Exception as err:  # noqa: BLE001 - any codec's error (zlib.error, imagecodecs' ...)
            raise damaged(self.info.path, f"its {'tile' if page.is_tiled else 'strip'} {index} of level {level}",
                          err) from None
        self._chunks[key] = chunk
        while sum(c.nbytes for c in self._chunks.values()) > CHUNK_CACHE_BYTES and len(self._chunks) > 1:
            self._chunks.popitem(last=False)
        return chunk

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        d = self.info.level_downsamples[level]
        return self._level_pixels(level, int(x // d), int(y // d), int(width), int(height))

    def thumbnail(self, max_side: int) -> np.ndarray:
        return self.banded_thumbnail(*self.thumbnail_plan(max_side))

    def close(self) -> None:
        self._tif.close()


class OmeTiffReader(TiffLevelsReader):
    """Every level of an OME-TIFF pyramid (the first image series)."""

    def __init__(self, path: Path) -> None:
        import tifffile

        try:
            tif = tifffile.TiffFile(path)
            pages = [level.keyframe for level in tif.series[0].levels]
        except (tifffile.TiffFileError, OSError, ValueError, IndexError) as err:
            raise ImageError(path, f"tifffile cannot read it as OME-TIFF ({err}); the file is damaged") from None
        super().__init__(path, tif, pages, "ome-tiff", ome_mpp(tif.ome_metadata or ""))


class StripTiffReader(TiffLevelsReader):
    """A TIFF of strips too large to decode whole (an export without tiles or pyramid), strip by strip; microns
    per pixel from its resolution tags where they give a plausible one."""

    def __init__(self, path: Path) -> None:
        import tifffile

        try:
            tif = tifffile.TiffFile(path)
            page = tif.pages.first
        except (tifffile.TiffFileError, OSError, ValueError, IndexError) as err:
            raise ImageError(path, f"tifffile cannot read it ({err}); the file is damaged") from None
        super().__init__(path, tif, [page], "tiff-strips", tiff_tag_mpp(page))


def tiff_tag_mpp(page: Any) -> Optional[float]:
    """Microns per pixel from a TIFF page's XResolution and ResolutionUnit (centimetre or inch); None without a
    unit, or where it gives 100 µm or more (a screen's 72 dpi, not a microscope's)."""
    um_per_unit = {2: 25_400.0, 3: 10_000.0}.get(int(page.resolutionunit))
    resolution = page.resolution[0] if page.resolution else 0
    mpp = um_per_unit / resolution if um_per_unit and resolution else None
    return mpp if mpp and mpp < 100 else None


def is_large_strip_rgb_tiff(path: Path, pixels: int) -> bool:
    """A TIFF of strips, 8-bit interleaved RGB, of more than ``pixels`` pixels: read strip by strip as a slide."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            rgb = int(page.photometric) == 2 or (int(page.photometric) == 6 and int(page.compression) == 7)  # JPEG
            return (not page.is_tiled and rgb and page.dtype == np.uint8 and page.samplesperpixel == 3
                    and page.planarconfig == 1 and page.imagewidth * page.imagelength > pixels)
    except (tifffile.TiffFileError, OSError, ValueError, IndexError):
        return False
