"""Large whole slides built from real tissue: a mosaic of the lymphoma images written as a tiled,
pyramidal, deflate-compressed TIFF with its resolution, one tile at a time (never whole in memory)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

TILE = 256


def _source_tiles(images: list[Path]) -> list[np.ndarray]:
    """256-px crops of the real images, the mosaic's building blocks."""
    crops = []
    for path in images:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        crops.append(np.ascontiguousarray(pixels[28:28 + TILE, 80:80 + TILE]))
    return crops


def write_mosaic_slide(path: Path, images: list[Path], width: int, height: int, mpp: float = 0.5,
                       levels: int = 3) -> Path:
    """A pyramidal TIFF of ``width`` x ``height`` pixels at ``mpp``, each level half the previous one."""
    crops = _source_tiles(images)

    def tiles(level: int) -> Iterator[np.ndarray]:
        w, h = width >> level, height >> level
        for ty in range(0, h, TILE):
            for tx in range(0, w, TILE):
                block = crops[((ty // TILE) * 7 + (tx // TILE) * 3 + level) % len(crops)]
                if level:  # a coarser level: a real crop shrunk, like a scanner's pyramid
                    block = np.asarray(Image.fromarray(block).resize((TILE, TILE)))
                yield block

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        options = dict(tile=(TILE, TILE), photometric="rgb", compression="zlib", compressionargs={"level": 1},
                       dtype=np.uint8)
        tif.write(tiles(0), shape=(height, width, 3), resolution=(1e4 / mpp, 1e4 / mpp),
                  resolutionunit="CENTIMETER", **options)
        for level in range(1, levels):
            tif.write(tiles(level), shape=(height >> level, width >> level, 3), subfiletype=1,
                      resolution=(1e4 / mpp / 2 ** level, 1e4 / mpp / 2 ** level), resolutionunit="CENTIMETER",
                      **options)
    return path
