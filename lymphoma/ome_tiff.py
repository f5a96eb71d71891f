"""OME-TIFF pyramids (Bio-Formats, QuPath and tifffile write them: the levels in SubIFDs, which OpenSlide does not
see) read level by level through tifffile: only the tiles a region touches are read and decoded."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from lymphoma.errors import ImageError
from lymphoma.slides import SlideInfo, SlideReader, check_levels, damaged

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


class OmeTiffReader(SlideReader):
    """Every level of an OME-TIFF pyramid (the first image series), as ``SlideReader`` region reads."""

    def __init__(self, path: Path) -> None:
        import tifffile

        try:
            self._tif = tifffile.TiffFile(path)
            series = self._tif.series[0]
            self._pages = [level.keyframe for level in series.levels]
        except (tifffile.TiffFileError, OSError, ValueError, IndexError) as err:
            raise ImageError(path, f"tifffile cannot read it as OME-TIFF ({err}); the file is damaged") from None
        page = self._pages[0]
        if page.dtype != np.uint8 or page.samplesperpixel not in (3, 4) or page.planarconfig != 1:
            self._tif.close()
            raise ImageError(path, f"is an OME-TIFF of {page.dtype} with {page.samplesperpixel} sample(s) per pixel "
                                   f"(planar configuration {page.planarconfig}); H&E slides need 8-bit interleaved RGB")
        dims = tuple((int(p.imagewidth), int(p.imagelength)) for p in self._pages)
        self.info = SlideInfo(str(path), "ome-tiff", dims, tuple(dims[0][0] / w for w, _ in dims),
                              ome_mpp(self._tif.ome_metadata or ""), None)
        check_levels(self.info)

    def _level_pixels(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB pixels of one level (its own coordinates); outside the image: white."""
        page: Any = self._pages[level]
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        w, h = self.info.level_dimensions[level]
        x0, y0, x1, y1 = max(0, x), max(0, y), min(w, x + width), min(h, y + height)
        if x1 <= x0 or y1 <= y0:
            return out
        if not page.is_tiled:
            try:
                whole = page.asarray()[..., :3]
            except Exception as err:  # noqa: BLE001 - any codec's error
                raise damaged(self.info.path, f"its level {level}", err) from None
            out[y0 - y:y1 - y, x0 - x:x1 - x] = whole[y0:y1, x0:x1]
            return out
        tw, th = page.tilewidth, page.tilelength
        across = -(-w // tw)
        handle = self._tif.filehandle
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                index = ty * across + tx
                handle.seek(page.dataoffsets[index])
                try:
                    tile = page.decode(handle.read(page.databytecounts[index]), index,
                                       jpegtables=page.jpegtables)[0].reshape(th, tw, -1)[..., :3]
                except Exception as err:  # noqa: BLE001 - any codec's error (zlib.error, imagecodecs' ...)
                    raise damaged(self.info.path, f"its tile {index} of level {level}", err) from None
                gx, gy = tx * tw, ty * th
                sx0, sy0, sx1, sy1 = max(x0, gx), max(y0, gy), min(x1, gx + tw), min(y1, gy + th)
                out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = tile[sy0 - gy:sy1 - gy, sx0 - gx:sx1 - gx]
        return out

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        d = self.info.level_downsamples[level]
        return self._level_pixels(level, int(x // d), int(y // d), int(width), int(height))

    def thumbnail(self, max_side: int) -> np.ndarray:
        w0, h0 = self.info.dimensions
        scale = max_side / max(w0, h0)
        level = self.best_level(1 / scale)
        w, h = self.info.level_dimensions[level]
        pixels = self._level_pixels(level, 0, 0, w, h)
        return np.asarray(Image.fromarray(pixels).resize((max(1, round(w0 * scale)), max(1, round(h0 * scale)))))

    def close(self) -> None:
        self._tif.close()
