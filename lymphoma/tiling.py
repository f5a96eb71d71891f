"""Cutting an image into overlapping square tiles: resize, mirror padding, a strided view, background filter."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from lymphoma.errors import InputError

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


@dataclass(frozen=True)
class TileSettings:
    """How images become tiles.

    size: tile edge in pixels after resizing; stride: step between tiles (size - overlap);
    resize: scale factor applied to the image first; pad: mirror padding added on each side;
    resample: resize filter; background_level / max_background: a pixel whose three channels are
    all >= background_level is background, and a tile with a larger background fraction than
    max_background is dropped (1.0 keeps every tile). target_mpp: tile at this resolution (microns per
    pixel) through the slide reader, over detected tissue only (tiles with at least min_tissue of it);
    target_power: the same as an objective power (20 = 20x), converted with each slide's own objective
    and mpp; default_mpp: the resolution of images whose files do not say.
    """

    @property
    def by_resolution(self) -> bool:
        """Tiles are cut at a physical resolution through the slide reader (else by pixels)."""
        return self.target_mpp is not None or self.target_power is not None

    size: int = 128
    stride: int = 64
    resize: float = 1.0
    pad: int = 0
    resample: str = "bilinear"
    background_level: int = 220
    max_background: float = 1.0
    target_mpp: Optional[float] = None
    target_power: Optional[float] = None
    default_mpp: Optional[float] = None
    min_tissue: float = 0.5

    def __post_init__(self) -> None:
        checks = [
            (self.size > 0, f"tiles.size must be positive, got {self.size}"),
            (self.stride > 0, f"tiles.stride must be positive, got {self.stride}"),
            (self.resize > 0, f"tiles.resize must be positive, got {self.resize}"),
            (self.pad >= 0, f"tiles.pad must be >= 0, got {self.pad}"),
            (self.resample in RESAMPLE, f"tiles.resample is {self.resample!r}; allowed: {', '.join(RESAMPLE)}"),
            (0 <= self.background_level <= 255, f"tiles.background_level must be in 0..255, got {self.background_level}"),
            (0.0 <= self.max_background <= 1.0, f"tiles.max_background must be in [0, 1], got {self.max_background}"),
            (self.target_mpp is None or self.target_mpp > 0, f"tiles.target_mpp must be > 0, got {self.target_mpp}"),
            (self.target_power is None or self.target_power > 0,
             f"tiles.target_power must be > 0, got {self.target_power}"),
            (self.target_mpp is None or self.target_power is None,
             "set tiles.target_mpp or tiles.target_power, not both"),
            (self.default_mpp is None or self.default_mpp > 0, f"tiles.default_mpp must be > 0, got {self.default_mpp}"),
            (0.0 <= self.min_tissue <= 1.0, f"tiles.min_tissue must be in [0, 1], got {self.min_tissue}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Tiles:
    """Tiles of one image: pixels ``[N, size, size, 3]``, top-left ``(x, y)`` in the resized image
    (negative inside the mirror padding), and how many tiles the background filter dropped."""

    pixels: np.ndarray
    coords: np.ndarray
    n_background: int


def resized_shape(height: int, width: int, resize: float) -> tuple[int, int]:
    """Image shape after the resize factor, as the tiler computes it."""
    return max(1, round(height * resize)), max(1, round(width * resize))


def grid_shape(height: int, width: int, settings: TileSettings) -> tuple[int, int]:
    """Number of tile rows and columns for an image of this (original) size; (0, 0) if too small."""
    h, w = resized_shape(height, width, settings.resize)
    span_h, span_w = h + 2 * settings.pad, w + 2 * settings.pad
    if span_h < settings.size or span_w < settings.size:
        return 0, 0
    return (span_h - settings.size) // settings.stride + 1, (span_w - settings.size) // settings.stride + 1


def prepare(image: np.ndarray, settings: TileSettings) -> np.ndarray:
    """Resize then mirror-pad an RGB image as the tiler sees it."""
    h, w = resized_shape(image.shape[0], image.shape[1], settings.resize)
    if (h, w) != image.shape[:2]:
        image = np.asarray(Image.fromarray(image).resize((w, h), RESAMPLE[settings.resample]))
    if settings.pad:
        if settings.pad >= min(h, w):
            raise InputError(f"tiles.pad={settings.pad} must be smaller than the resized image ({w}x{h})")
        image = np.pad(image, ((settings.pad, settings.pad), (settings.pad, settings.pad), (0, 0)), mode="reflect")
    return image


def cut_tiles(image: np.ndarray, settings: TileSettings) -> Tiles:
    """Cut ``image`` ([H, W, 3] uint8) into tiles; raises InputError if it is smaller than a tile."""
    rows, cols = grid_shape(image.shape[0], image.shape[1], settings)
    if rows == 0:
        h, w = resized_shape(image.shape[0], image.shape[1], settings.resize)
        raise InputError(f"image of {image.shape[1]}x{image.shape[0]} (resized {w}x{h}, padded by {settings.pad}) "
                         f"is smaller than a {settings.size}-pixel tile; lower tiles.size, raise tiles.resize or "
                         "tiles.pad, or remove the image")
    padded = prepare(image, settings)
    s, t = settings.stride, settings.size
    grid = sliding_window_view(padded, (t, t, 3))[::s, ::s, 0][:rows, :cols]  # [rows, cols, t, t, 3], a view
    ys, xs = np.meshgrid(np.arange(rows) * s - settings.pad, np.arange(cols) * s - settings.pad, indexing="ij")
    keep = np.ones((rows, cols), dtype=bool)
    if settings.max_background < 1.0:
        white = (grid >= settings.background_level).all(axis=-1).mean(axis=(-2, -1))
        keep = white <= settings.max_background
    pixels = grid[keep]  # one gather of the kept tiles, [N, t, t, 3]
    coords = np.stack([xs[keep], ys[keep]], axis=1).astype(np.int32)
    return Tiles(pixels=pixels, coords=coords, n_background=int(keep.size - keep.sum()))
