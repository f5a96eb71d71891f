"""The tiles of one input, whatever it is: a decoded plain image cut by pixels, or a whole slide read region
by region at a target resolution. Tiling and prediction both take their tiles from here."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from lymphoma.errors import ImageError, InputError
from lymphoma.files import file_stamp
from lymphoma.image_scale import TrainingScale
from lymphoma.images import WSI_SUFFIXES, decode_rgb
from lymphoma.regions import read_regions, select_tiles
from lymphoma.settings import TileSettings
from lymphoma.slides import open_slide
from lymphoma.stain import StainNormalizer
from lymphoma.tiling import cut_tiles, resize_to, resized_shape
from lymphoma.wsi import iter_tiles, plan_grid, save_grid_overview, slide_tissue, target_mpp

FLAT_LEVELS = 8  # an image whose every pixel is within this many levels of one colour holds no tissue


@dataclass
class TileSource:
    """``batches`` yields uint8 ``[<=batch, size, size, 3]`` tiles in ``coords`` order (a slide's are read as
    they are asked for); ``overview`` is a small picture of the whole input (a plain image reduced by the
    smallest integer factor that brings its longer side to ``overview_side`` or less), ``coords * coord_scale`` its
    pixels, ``extent`` and ``step`` a tile's size and stride in coordinate units."""

    batches: Iterator[np.ndarray]
    coords: np.ndarray
    n_background: int
    shape: tuple[int, int]
    overview: np.ndarray
    coord_scale: float
    extent: float
    step: float
    to_level0: float = 1.0  # coords * to_level0 are pixels of the file's full resolution (plain images: 1 / resize)
    labels: Optional[list[Optional[str]]] = None  # each tile's region class (tiles.region_labels), None: unclassified
    matched_resize: Optional[float] = None  # the resize that brought a plain image to the training scale (image_scale)
    file_stamp: Optional[list[int]] = None  # the file's size and time when it was opened (lymphoma.files.file_stamp)


def _in_regions(path: str, region_file: str, corners: np.ndarray, side: float, shape: tuple[int, int],
                settings: TileSettings) -> tuple[np.ndarray, Optional[list[Optional[str]]]]:
    """Which tiles the image's regions keep (all without a region file), and their region classes when asked for."""
    if not region_file:
        return np.ones(len(corners), dtype=bool), None
    regions = read_regions(region_file, path)
    keep, labels = select_tiles(regions, corners, side, shape, settings.region_mode, settings.min_region)
    if not keep.any():
        where = "inside" if settings.region_mode == "include" else "outside"
        raise ImageError(path, f"has no tile with {settings.min_region:.0%} of its area {where} its regions "
                               f"({regions.path}); lower tiles.min_region, or check the regions")
    return keep, labels if settings.region_labels else None


def open_tiles(path: str, settings: TileSettings, batch: int = 64, overview_side: int = 256,
               qc_path: Optional[Path] = None, region_file: str = "",
               stain: Optional[StainNormalizer] = None, scale: Optional[TrainingScale] = None) -> TileSource:
    """Tiles of ``path``: pixel tiling of a decoded image or, with ``settings.target_mpp``, region reads of a
    slide over its tissue (with ``qc_path``, a picture of the tissue mask and kept tiles is saved there); with
    a GeoJSON ``region_file`` (lymphoma.regions), only the tiles that tiles.region_mode keeps; with an
    image-scope ``stain`` normaliser, stain-normalised with the statistics of the whole image at the resize it
    is cut at or of the slide's tissue in its thumbnail; with a ``scale`` (a pixel-tile model's training scale), a plain
    image at another scale but of the training images' aspect is resized to it. Raises ImageError naming the file
    when it cannot give any tile."""
    stamp = file_stamp(path)  # before reading: a file replaced while it is read is not taken for the one read
    if not settings.by_resolution:
        source = _image_tiles(path, settings, overview_side, region_file, stain, scale)
    else:
        source = _slide_tiles(path, settings, batch, overview_side, qc_path, region_file, stain)
    source.file_stamp = stamp
    return source


def _image_tiles(path: str, settings: TileSettings, overview_side: int, region_file: str,
                 stain: Optional[StainNormalizer], scale: Optional[TrainingScale] = None) -> TileSource:
    """A plain image decoded (``_decode``), resized (to the training ``scale`` where ``TrainingScale.matched_resize``
    says so), stain-normalised whole with the statistics of the resized image, then cut by pixels."""
    if Path(path).suffix.lower() in WSI_SUFFIXES:
        raise ImageError(path, "is a whole-slide file, and these tiles are cut by pixels (tiles.target_mpp "
                               "unset). Tiling: set tiles.target_mpp (e.g. 0.5) or tiles.target_power (e.g. 20). "
                               "Predicting: use a model trained with tiles.target_mpp, or pass --force "
                               "tiles.target_mpp=<microns per pixel of this model's training images>")
    image, (h, w), settings, cut_settings, matched = _decode(path, settings, scale)
    if (image >= settings.background_level).all():
        raise ImageError(path, f"has no tissue: every pixel is background (all channels >= "
                               f"tiles.background_level={settings.background_level}); check the file, or lower "
                               "tiles.background_level if its tissue is that pale")
    flat_colour(path, image)
    cut = cut_tiles(image, cut_settings, stain)
    keep, labels = _in_regions(path, region_file, cut.coords / settings.resize, settings.size / settings.resize,
                               (h, w), settings)
    pixels, coords = (cut.pixels, cut.coords) if keep.all() else (cut.pixels[keep], cut.coords[keep])
    factor = -(-max(image.shape[:2]) // overview_side)  # an integer factor: 4x faster than a box resize
    overview = np.asarray(Image.fromarray(image).reduce(factor)) if factor > 1 else image
    return TileSource(iter([pixels]), coords, cut.n_background, (h, w), overview, 1 / factor / cut_settings.resize,
                      settings.size, settings.stride, 1 / settings.resize, labels, matched)


def flat_colour(path: str, image: np.ndarray) -> None:
    """An ImageError where every pixel lies within ``FLAT_LEVELS`` of one colour (black, grey, any fill: a failed
    scan or a placeholder), which would otherwise be tiled, trained on or given a class like tissue."""
    pixels = image.reshape(-1, image.shape[-1])
    low, high = pixels.min(axis=0), pixels.max(axis=0)
    if int((high.astype(np.int16) - low).max()) <= FLAT_LEVELS:
        colour = ", ".join(str(int(v)) for v in (low.astype(np.int16) + high) // 2)
        raise ImageError(path, f"has no tissue: it is one flat colour (RGB {colour}; every pixel within "
                               f"{FLAT_LEVELS} levels of it), a blank or failed scan or a placeholder; check the file")


def _decode(path: str, settings: TileSettings, scale: Optional[TrainingScale],
            ) -> tuple[np.ndarray, tuple[int, int], TileSettings, TileSettings, Optional[float]]:
    """The image as it is cut, its full ``(height, width)``, the settings of its coordinates (``resize`` matched to
    the training ``scale`` where it says so), the settings it is cut with, and the matched resize. A JPEG to be
    shrunk by half or more is decoded smaller (``decode_rgb``) and resized the rest of the way here; it is then
    cut as it is (resize 1), its tiles and coordinates those of the image decoded whole, within the decoders'
    rounding."""
    def scaled(shape: tuple[int, int]) -> tuple[TileSettings, Optional[float]]:
        matched = scale.matched_resize(shape, settings.resize) if scale is not None else None
        return (settings if matched is None else replace(settings, resize=matched)), matched

    def shrink_to(height: int, width: int) -> Optional[tuple[int, int]]:
        resize = scaled((height, width))[0].resize
        return resized_shape(height, width, resize) if resize < 1 else None

    image, full = decode_rgb(path, settings.max_pixels, shrink_to)
    matched_settings, matched = scaled(full)
    if image.shape[:2] == full:
        return image, full, matched_settings, matched_settings, matched
    image = resize_to(image, resized_shape(*full, matched_settings.resize), settings.resample)
    return image, full, matched_settings, replace(matched_settings, resize=1.0), matched


def _slide_tiles(path: str, settings: TileSettings, batch: int, overview_side: int, qc_path: Optional[Path],
                 region_file: str, stain: Optional[StainNormalizer]) -> TileSource:
    """A whole slide read region by region at the target resolution, over its tissue; stain-normalised with the
    statistics of its tissue in the thumbnail."""
    reader = open_slide(path, settings.default_mpp, settings.max_pixels)
    try:
        # with stain statistics to take, one thumbnail gives them and the tissue mask (the grid's own otherwise)
        thumbnail, tissue = slide_tissue(reader) if stain is not None else (None, None)
        grid = plan_grid(reader, settings.size, settings.stride, target_mpp(reader, settings), settings.min_tissue,
                         tissue)
        width, height = reader.info.dimensions
        labels = None
        if len(grid.coords):  # a slide without tissue is reported as such, below
            keep, labels = _in_regions(path, region_file, grid.coords, grid.size0, (height, width), settings)
            grid.coords = grid.coords[keep]
        if qc_path is not None:
            qc_path.parent.mkdir(parents=True, exist_ok=True)
            save_grid_overview(reader, grid, str(qc_path))
        if len(grid.coords) == 0:
            raise ImageError(path, f"has no tile with at least {settings.min_tissue:.0%} tissue; check the slide or "
                                   "lower tiles.min_tissue")
        overview = reader.thumbnail(overview_side)
        statistics = None
        if stain is not None:  # of the thumbnail's tissue (the whole thumbnail where none was found)
            statistics = stain.image_statistics(thumbnail[tissue.mask] if tissue.mask.any() else thumbnail)
    except (InputError, OSError):
        reader.close()
        raise

    def batches() -> Iterator[np.ndarray]:
        with reader:
            for pixels in iter_tiles(reader, grid, settings.size, batch):
                yield pixels if stain is None else stain.apply(pixels, statistics)

    return TileSource(batches(), grid.coords.astype(np.int32), grid.n_background, (height, width), overview,
                      overview.shape[1] / width, grid.size0, grid.step0, labels=labels)


def open_normalized_tiles(path: str, settings: TileSettings, normalizer: Optional[StainNormalizer],
                          batch: int = 64, region_file: str = "", scale: Optional[TrainingScale] = None) -> TileSource:
    """``open_tiles`` with the stain work of a model trained with ``normalizer``: by image where the image is cut
    (its target's scope image), else each batch tile by tile (scope tile); as read without a normalizer."""
    if normalizer is None or not normalizer.per_tile:
        return open_tiles(path, settings, batch, region_file=region_file, stain=normalizer, scale=scale)
    source = open_tiles(path, settings, batch, region_file=region_file, scale=scale)
    source.batches = (normalizer.batch(pixels) for pixels in source.batches)
    return source
