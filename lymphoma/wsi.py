"""Magnification-aware tiling of whole slides: a grid at a target resolution over the tissue, read region by
region from the best level, so memory does not grow with the slide."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
from PIL import Image

from lymphoma.errors import ImageError
from lymphoma.slides import SlideReader
from lymphoma.tissue import TissueMask, detect_tissue

if TYPE_CHECKING:
    from lymphoma.settings import TileSettings

THUMBNAIL_SIDE = 1024


@dataclass
class WsiGrid:
    """Kept tiles of one slide: level-0 top-left ``coords``, read ``read_size`` pixels at ``level`` and
    resized to the tile size; ``size0`` and ``step0`` are the tile and stride in level-0 pixels."""

    level: int
    read_size: int
    size0: float
    step0: float
    coords: np.ndarray
    n_background: int
    mpp: float
    tissue: TissueMask


def target_mpp(reader: SlideReader, settings: "TileSettings") -> float:
    """The resolution to tile a slide at: ``target_mpp``, or ``target_power`` converted with the slide's own
    objective power and mpp (20x on a 40x slide of 0.25 mpp is 0.5 mpp)."""
    if settings.target_mpp is not None:
        return settings.target_mpp
    info = reader.info
    if info.objective_power is None or info.mpp is None:
        raise ImageError(info.path, f"tiles.target_power={settings.target_power} needs the slide's objective power "
                                    "and mpp, and its file does not record them; use tiles.target_mpp (with "
                                    "tiles.default_mpp for files without a resolution)")
    return info.mpp * info.objective_power / float(settings.target_power)


def slide_tissue(reader: SlideReader) -> tuple[np.ndarray, TissueMask]:
    """The slide's thumbnail (THUMBNAIL_SIDE on its longer side) and its tissue mask."""
    thumbnail = reader.thumbnail(THUMBNAIL_SIDE)
    return thumbnail, detect_tissue(thumbnail, thumbnail.shape[1] / reader.info.dimensions[0])


def plan_grid(reader: SlideReader, tile_size: int, stride: int, target_mpp: float, min_tissue: float,
              tissue: Optional[TissueMask] = None) -> WsiGrid:
    """The tile grid of a slide at ``target_mpp`` microns per pixel, keeping tiles whose tissue share is at
    least ``min_tissue``. Errors name the slide: no mpp, a resolution finer than level 0, smaller than a tile."""
    info = reader.info
    if info.mpp is None:
        raise ImageError(info.path, "has no microns-per-pixel in its metadata; set tiles.default_mpp to the "
                                    "scanner's resolution (e.g. 0.25 at 40x, 0.5 at 20x)")
    factor = target_mpp / info.mpp  # level-0 pixels per tile pixel
    if factor < 1 - 1e-6:
        raise ImageError(info.path, f"tiles.target_mpp={target_mpp} is finer than the slide's level 0 "
                                    f"({info.mpp:.3f} mpp); ask for {info.mpp:.3f} or coarser")
    level = reader.best_level(factor)
    read_size = max(1, round(tile_size * factor / info.level_downsamples[level]))
    size0, step0 = tile_size * factor, stride * factor
    width, height = info.dimensions
    if width < size0 or height < size0:
        raise ImageError(info.path, f"is {width}x{height} pixels at level 0, smaller than one {tile_size}-px tile "
                                    f"at {target_mpp} mpp ({size0:.0f} level-0 pixels); lower tiles.size or "
                                    "tiles.target_mpp")
    if tissue is None:
        tissue = slide_tissue(reader)[1]
    xs = np.arange(0, width - size0 + 1e-6, step0)
    ys = np.arange(0, height - size0 + 1e-6, step0)
    grid = [(x, y) for y in ys for x in xs]
    kept = [(x, y) for x, y in grid if tissue.fraction_in(x, y, size0) >= min_tissue]
    coords = np.round(np.asarray(kept, dtype=np.float64).reshape(-1, 2)).astype(np.int64)
    return WsiGrid(level, read_size, size0, step0, coords, len(grid) - len(kept), target_mpp, tissue)


def iter_tiles(reader: SlideReader, grid: WsiGrid, tile_size: int, batch: int = 64) -> Iterator[np.ndarray]:
    """The kept tiles as uint8 ``[<=batch, tile, tile, 3]`` arrays, in ``grid.coords`` order, one region read each."""
    out = []
    for x, y in grid.coords:
        region = reader.read_region(int(x), int(y), grid.level, grid.read_size, grid.read_size)
        if grid.read_size != tile_size:
            region = np.asarray(Image.fromarray(region).resize((tile_size, tile_size), Image.Resampling.BILINEAR))
        out.append(region)
        if len(out) == batch:
            yield np.stack(out)
            out = []
    if out:
        yield np.stack(out)


def save_grid_overview(reader: SlideReader, grid: Optional[WsiGrid], path: str, max_side: int = 1024) -> None:
    """A thumbnail with the tissue mask (non-tissue dimmed) and the kept tiles outlined: a slide's QC picture."""
    from PIL import ImageDraw

    thumbnail = reader.thumbnail(max_side)
    scale = thumbnail.shape[1] / reader.info.dimensions[0]
    picture = thumbnail.copy()
    if grid is not None:
        mask = np.asarray(Image.fromarray(grid.tissue.mask).resize(thumbnail.shape[1::-1], Image.Resampling.NEAREST))
        picture[~mask] = (picture[~mask] * 0.35).astype(np.uint8)
    image = Image.fromarray(picture)
    if grid is not None:
        draw = ImageDraw.Draw(image)
        for x, y in grid.coords:
            draw.rectangle([x * scale, y * scale, (x + grid.size0) * scale, (y + grid.size0) * scale],
                           outline=(0, 200, 0))
    image.save(path)
