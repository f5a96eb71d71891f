"""One reader for whole-slide files (Aperio SVS, Hamamatsu NDPI, pyramidal TIFF, ... through OpenSlide) and
plain images (TIFF, PNG, JPEG): dimensions, levels, microns per pixel, and region reads at any level,
so that a gigapixel slide is never held in memory whole."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from lymphoma.errors import ImageError
from lymphoma.images import DEFAULT_MAX_PIXELS, TIFF_SUFFIXES, WSI_SUFFIXES, read_rgb

BAND_PIXELS = 1 << 22  # the pixels of each read of a thumbnail made band by band (4 Mpx, 12 MiB of RGB)
WHOLE_LEVEL_PIXELS = 1 << 26  # OpenSlide makes a thumbnail of a level up to this size (256 MiB of RGBA) at once


@dataclass(frozen=True)
class SlideInfo:
    """What ``lymphoma inspect`` shows of a slide."""

    path: str
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level, level 0 first
    level_downsamples: tuple[float, ...]
    mpp: Optional[float]  # microns per pixel at level 0; None when the file does not say
    objective_power: Optional[float]

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]


class SlideReader:
    """Region reads in level-0 coordinates, at any level; ``close`` when done (or use ``with``)."""

    info: SlideInfo
    _banded: Optional[np.ndarray] = None  # the last thumbnail made band by band (banded_thumbnail)

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 ``[height, width, 3]`` at ``level``, top-left (x, y) given in level-0 pixels."""
        raise NotImplementedError

    def thumbnail(self, max_side: int) -> np.ndarray:
        """The whole slide, RGB, at most ``max_side`` pixels on its longer side (from the smallest fitting level)."""
        raise NotImplementedError

    def thumbnail_plan(self, max_side: int) -> tuple[int, tuple[int, int]]:
        """The level a thumbnail of at most ``max_side`` pixels is made from, and the thumbnail's (width, height)."""
        w0, h0 = self.info.dimensions
        scale = max_side / max(w0, h0)
        return self.best_level(1 / scale), (max(1, round(w0 * scale)), max(1, round(h0 * scale)))

    def banded_thumbnail(self, level: int, size: tuple[int, int]) -> np.ndarray:
        """``level`` resized to ``size`` as PIL's ``resize(size, LANCZOS, reducing_gap=2.0)`` resizes it whole (box
        averages by integer factors, then Lanczos), band by band: a slide whose smallest level is large (no pyramid)
        is never held whole, each read holding about BAND_PIXELS."""
        tw, th = size
        made = self._banded  # the last one (tissue, overview and picture each ask for one)
        if made is not None and made.shape[0] >= th and made.shape[1] >= tw:
            return made.copy() if made.shape[:2] == (th, tw) else \
                np.asarray(Image.fromarray(made).resize(size, Image.Resampling.LANCZOS))
        w, h = self.info.level_dimensions[level]
        fx, fy = max(1, int(w / tw / 2)), max(1, int(h / th / 2))
        rows = fy * max(1, BAND_PIXELS // (w * fy))  # whole blocks of fy rows: the bands reduce as the whole would
        d = self.info.level_downsamples[level]
        reduced = np.concatenate([np.asarray(Image.fromarray(self.read_region(0, round(y * d), level, w,
                                                                              min(rows, h - y))).reduce((fx, fy)))
                                  for y in range(0, h, rows)])
        out = np.asarray(Image.fromarray(reduced).resize(size, Image.Resampling.LANCZOS, box=(0, 0, w / fx, h / fy)))
        self._banded = out
        return out.copy()

    def best_level(self, downsample: float) -> int:
        """The level with the largest downsample not above ``downsample`` (never upsample more than needed)."""
        candidates = [i for i, d in enumerate(self.info.level_downsamples) if d <= downsample * 1.001]
        return max(candidates, key=lambda i: self.info.level_downsamples[i]) if candidates else 0

    def close(self) -> None:
        pass

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def damaged(path: str | Path, what: str, err: BaseException) -> ImageError:
    """The error of a slide whose header reads but whose pixels do not decode (a copy cut short or corrupted)."""
    return ImageError(path, f"{what} cannot be decoded ({type(err).__name__}: {err}); the file is damaged: copy it "
                            "again from its source, or leave it out")


class OpenSlideReader(SlideReader):
    def __init__(self, path: Path) -> None:
        import openslide

        self._error = openslide.OpenSlideError
        try:
            self._slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as err:
            raise ImageError(path, f"OpenSlide cannot read it ({err}); the file is corrupt or of an "
                                   "unsupported format") from None
        props = self._slide.properties
        mpp = _float(props.get("openslide.mpp-x"))
        self.info = SlideInfo(str(path), props.get("openslide.vendor", "unknown"),
                              tuple(tuple(d) for d in self._slide.level_dimensions),
                              tuple(float(d) for d in self._slide.level_downsamples),
                              mpp if mpp and mpp < 100 else None,  # generic TIFFs may carry a meaningless DPI
                              _float(props.get("openslide.objective-power")))
        check_levels(self.info)

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        try:
            region = self._slide.read_region((int(x), int(y)), level, (int(width), int(height)))
        except self._error as err:
            raise damaged(self.info.path, f"its region at ({x}, {y}) of level {level}", err) from None
        rgba = np.asarray(region)
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255  # outside the scanned area: white, like glass
        return rgb

    def thumbnail(self, max_side: int) -> np.ndarray:
        level, size = self.thumbnail_plan(max_side)
        width, height = self.info.level_dimensions[level]
        if width * height > WHOLE_LEVEL_PIXELS:
            return self.banded_thumbnail(level, size)
        try:
            thumbnail = self._slide.get_thumbnail(size)
        except self._error as err:
            raise damaged(self.info.path, "its thumbnail", err) from None
        return np.asarray(thumbnail.convert("RGB"))

    def close(self) -> None:
        self._slide.close()


class ImageReader(SlideReader):
    """A plain image, decoded once (plain images are small enough); one level."""

    def __init__(self, path: Path, mpp: Optional[float], max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self._image = read_rgb(path, max_pixels, as_slide=True)
        h, w = self._image.shape[:2]
        self.info = SlideInfo(str(path), "image", ((w, h),), (1.0,), mpp, None)

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        h, w = self._image.shape[:2]
        x0, y0, x1, y1 = max(0, x), max(0, y), min(w, x + width), min(h, y + height)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._image[y0:y1, x0:x1]
        return out

    def thumbnail(self, max_side: int) -> np.ndarray:
        h, w = self._image.shape[:2]
        scale = min(1.0, max_side / max(w, h))
        return np.asarray(Image.fromarray(self._image).resize((max(1, round(w * scale)), max(1, round(h * scale)))))


def open_slide(path: str | Path, default_mpp: Optional[float] = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> SlideReader:
    """A reader for ``path``: every level of an OME-TIFF through tifffile, OpenSlide for whole-slide formats
    (DICOM WSI, SVS, ... and tiled TIFFs), a TIFF of strips over ``max_pixels`` strip by strip, else the plain
    image (decoded whole: refused over ``max_pixels``)."""
    from lymphoma.ome_tiff import OmeTiffReader, StripTiffReader, is_large_strip_rgb_tiff, is_ome_tiff

    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "file not found; fix the path or remove it from the input list")
    suffix = path.suffix.lower()
    tiff = suffix in TIFF_SUFFIXES
    if tiff and is_ome_tiff(path):
        reader: SlideReader = OmeTiffReader(path)
    elif suffix in WSI_SUFFIXES or (tiff and _is_tiled_tiff(path)):
        reader = OpenSlideReader(path)
    elif tiff and is_large_strip_rgb_tiff(path, max_pixels):
        reader = StripTiffReader(path)
    else:
        return ImageReader(path, default_mpp, max_pixels)
    if reader.info.mpp is None and default_mpp is not None:
        reader.info = SlideInfo(**{**reader.info.__dict__, "mpp": default_mpp})
    return reader


def _is_tiled_tiff(path: Path) -> bool:
    """A tiled (usually pyramidal) TIFF, which OpenSlide reads region by region; a strip TIFF is a plain image."""
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path)) is not None
    except (openslide.OpenSlideError, OSError):
        return False


def _float(value: Optional[str]) -> Optional[float]:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def check_levels(info: SlideInfo) -> None:
    """Each level's size must match level 0 divided by its downsample (a few pixels of rounding allowed)."""
    w0, h0 = info.dimensions
    for (w, h), d in zip(info.level_dimensions, info.level_downsamples):
        if abs(w * d - w0) > 2 * d + 2 or abs(h * d - h0) > 2 * d + 2:
            raise ImageError(info.path, f"its levels disagree: a level of {w}x{h} with downsample {d:.3f} does not "
                                        f"match level 0 of {w0}x{h0}; the file is damaged")
