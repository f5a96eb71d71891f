"""Stain handling for H&E: normalisation of each tile to a reference (Macenko or Reinhard, estimated with
torchstain; or the haematoxylin or grey level alone) and the HED jitter of Tellez et al. 2019 (a random scale
and shift of each stain's optical density, with scikit-image's colour-deconvolution matrices)."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lymphoma.errors import ImageError, InputError
from lymphoma.images import read_rgb
from lymphoma.reinhard import lab_statistics, reinhard
from lymphoma.settings import StainSettings

# torchstain's optical density: -log((I + 1) / IO), pixels whose OD is below BETA in any channel are background
IO, BETA = 240, 0.15
MIN_STAINED = 0.05        # a reference with fewer stained pixels is blank
MIN_TILE_STAINED = 0.02   # a tile with fewer is left as it is (too little tissue to estimate its stains)
MIN_STAIN_ANGLE = 8.0     # degrees between the H and E vectors: real H&E gives 14-27 (measured on the data set)
SKIMAGE_OD_UNIT = -np.log(1e-6)  # skimage.color.rgb2hed divides the natural-log OD by this; Tellez's ranges use it


@dataclass(frozen=True)
class StainTarget:
    """The fitted reference, kept in checkpoints so that prediction needs no reference file."""

    method: str
    he: Optional[list[list[float]]] = None      # Macenko: optical-density vectors of H and E, [3, 2]
    max_c: Optional[list[float]] = None         # Macenko: 99th-percentile stain concentrations
    lab_mean: Optional[list[float]] = None      # Reinhard: LAB channel means and standard deviations
    lab_std: Optional[list[float]] = None
    reference: Optional[str] = None
    scope: str = "tile"                         # tile | image: whose statistics each tile is moved from

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Reinhard statistics of sj-03-2810_001 (a CLL image of the IICBU 2008 set), in torchstain's LAB scale;
# used when no reference image is given.
DEFAULT_LAB = ([45.38, 5.62, -11.24], [13.32, 4.53, 5.11])


# the brightest uint8 value whose optical density, -log((I + 1) / IO), reaches BETA
_STAINED_MAX = int(np.flatnonzero(-np.log((np.arange(256) + 1) / IO) >= BETA).max())


def _stained_share(image: np.ndarray) -> float:
    """The share of pixels whose optical density is at least BETA in every channel (their brightest channel at
    most _STAINED_MAX: 16x faster than a reduction over the channel axis, for it runs on every image and tile)."""
    flat = image.reshape(-1, 3)
    if not len(flat):
        return 0.0
    brightest = np.maximum(np.maximum(flat[:, 0], flat[:, 1]), flat[:, 2])
    return np.count_nonzero(brightest <= _STAINED_MAX) / len(flat)


def check_he(he: np.ndarray, source: str) -> None:
    """Raise unless the two stain vectors look like haematoxylin and eosin: distinct directions, and both
    absorbing green at least as much as blue (DAB, for one, absorbs blue most; a gray image has one vector)."""
    h, e = he[:, 0], he[:, 1]
    angle = float(np.degrees(np.arccos(np.clip(h @ e / (np.linalg.norm(h) * np.linalg.norm(e)), -1, 1))))
    if angle < MIN_STAIN_ANGLE or min(h[1] - h[2], e[1] - e[2]) < -0.05 or min(h.min(), e.min()) < -0.05:
        raise InputError(f"stain reference {source} does not look like an H&E stain (its two stain vectors are "
                         f"{np.round(h, 2).tolist()} and {np.round(e, 2).tolist()}, {angle:.0f} degrees apart; H&E gives "
                         f"14-27 with green absorbed most); give an H&E image, or stain.reference=null")


def fit_target(settings: StainSettings) -> Optional[StainTarget]:
    """The reference's stain parameters for the chosen method (None when normalisation is off)."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

    if settings.normalize == "none":
        return None
    if settings.reference is None:
        default = NumpyMacenkoNormalizer()
        return StainTarget(settings.normalize, default.HERef.tolist(), default.maxCRef.tolist(),
                           DEFAULT_LAB[0], DEFAULT_LAB[1], scope=settings.scope)
    path = Path(settings.reference)
    try:
        image = read_rgb(path)
    except ImageError as err:
        raise InputError(f"stain.reference: {err}") from None
    if _stained_share(image) < MIN_STAINED:
        raise InputError(f"stain reference {path} is blank ({_stained_share(image):.1%} of its pixels are stained, "
                         f"at least {MIN_STAINED:.0%} needed); choose an H&E image with tissue")
    macenko = NumpyMacenkoNormalizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            macenko.fit(image)
        except (np.linalg.LinAlgError, ValueError, IndexError) as err:
            raise InputError(f"stain reference {path}: its stains cannot be estimated ({err}); give an H&E image") from None
    check_he(np.asarray(macenko.HERef), str(path))
    reinhard = NumpyReinhardNormalizer()
    reinhard.fit(image)
    return StainTarget(settings.normalize, np.asarray(macenko.HERef).tolist(), np.asarray(macenko.maxCRef).tolist(),
                       np.asarray(reinhard.target_means).tolist(), np.asarray(reinhard.target_stds).tolist(), str(path),
                       settings.scope)


def tiling_stain(settings: StainSettings) -> Optional[dict[str, Any]]:
    """The target that tiling normalises to (as a dict, recorded in shards and their manifest): the fitted one
    with stain.scope image, else None (tiles are stored as read, and normalised one by one where they are used)."""
    return stored_stain(fit_target(settings)) if settings.scope == "image" else None


def stored_stain(target: Optional[StainTarget]) -> Optional[dict[str, Any]]:
    """What tiling records for a fitted target: the target itself with scope image, None with scope tile."""
    return target.as_dict() if target is not None and target.scope == "image" else None


class StainNormalizer:
    """Normalise uint8 ``[H, W, 3]`` tiles to a target; tiles with too little tissue to estimate their stains
    are returned unchanged. With the target's scope ``image``, tiles are normalised where they are cut, with
    their image's statistics (``image_statistics``, ``apply``), and not again tile by tile. Picklable, for
    loader workers."""

    def __init__(self, target: StainTarget) -> None:
        self.target = target
        self._normalizer: Any = None

    @classmethod
    def from_state(cls, state: Optional[dict[str, Any]]) -> Optional["StainNormalizer"]:
        return cls(StainTarget(**state)) if state else None

    def _macenko(self) -> Any:
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

        if self._normalizer is None:
            self._normalizer = NumpyMacenkoNormalizer()
            self._normalizer.HERef, self._normalizer.maxCRef = np.asarray(self.target.he), np.asarray(self.target.max_c)
        return self._normalizer

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        if self.target.method == "haematoxylin":
            return haematoxylin_only(tile, np.asarray(self.target.he)[:, 0], float((self.target.max_c or [1.0])[0]))
        if self.target.method == "grey":
            return grey_level(self._normalized(tile))
        return self._normalized(tile)

    def _normalized(self, tile: np.ndarray) -> np.ndarray:
        """The tile normalised by Macenko's or Reinhard's method (Reinhard for grey)."""
        if _stained_share(tile) < MIN_TILE_STAINED:
            return tile
        if self.target.method != "macenko":
            out = reinhard(tile, self.target.lab_mean or DEFAULT_LAB[0], self.target.lab_std or DEFAULT_LAB[1])
            return tile if out is None else out
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                out = self._macenko().normalize(tile, stains=False)[0]
            except (np.linalg.LinAlgError, ValueError, IndexError):
                return tile  # degenerate tissue (one stain only): keep the tile rather than invent colours
        return out if np.isfinite(out).all() else tile

    @property
    def per_tile(self) -> bool:
        """Whether each tile is normalised on its own (scope tile), rather than where its image is tiled."""
        return self.target.scope == "tile"

    def image_statistics(self, pixels: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """The LAB statistics to move an image's tiles from, of its pixels ``[..., 3]`` (a slide: its thumbnail's
        tissue); None where too few of them are stained to estimate them."""
        return lab_statistics(pixels) if _stained_share(pixels) >= MIN_TILE_STAINED else None

    def apply(self, tiles: np.ndarray, statistics: Optional[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Tiles ``[N, H, W, 3]`` of one image moved from its ``statistics`` (unchanged where None)."""
        if statistics is None or not len(tiles):
            return tiles
        mean, std = self.target.lab_mean or DEFAULT_LAB[0], self.target.lab_std or DEFAULT_LAB[1]
        out = reinhard(tiles, mean, std, statistics)  # the whole batch at once: every pixel moved alike
        out = tiles if out is None else out
        return np.stack([grey_level(t) for t in out]) if self.target.method == "grey" else out

    def batch(self, tiles: np.ndarray) -> np.ndarray:
        """Normalise ``[N, H, W, 3]``."""
        return np.stack([self(t) for t in tiles]) if len(tiles) else tiles

    def __getstate__(self) -> dict[str, Any]:
        return {"target": self.target, "_normalizer": None}


def grey_level(tile: np.ndarray) -> np.ndarray:
    """The tile's luminance (ITU-R BT.601 weights) in all three channels: the shapes and densities of the tissue
    without the hue and saturation that differ between staining runs."""
    luma = tile.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    return np.repeat(np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def haematoxylin_only(tile: np.ndarray, h_vector: np.ndarray, max_h: float) -> np.ndarray:
    """The tile's haematoxylin alone: each pixel's H concentration by colour deconvolution (scikit-image's
    matrices, natural-log optical density), scaled so that its 99th percentile over stained pixels is ``max_h``
    (the reference's, Macenko's convention), and drawn as optical density along ``h_vector`` (the reference's
    H direction). Eosin, DAB and the tile's stain intensity are gone; a tile with too little stained tissue to
    measure keeps its own scale."""
    to_hed, _ = hed_matrices()
    od = -np.log((tile.reshape(-1, 3).astype(np.float32) + 1) / 256)
    h = np.clip(od @ to_hed[:, 0].astype(np.float32), 0, None)
    stained = np.all(od >= BETA, axis=1)
    if stained.mean() >= MIN_TILE_STAINED:
        top = float(np.percentile(h[stained], 99))
        if top > 1e-3:
            h *= max_h / top
    vector = np.asarray(h_vector, dtype=np.float32) / max(float(np.linalg.norm(h_vector)), 1e-6)
    out = 256 * np.exp(-h[:, None] * vector[None, :]) - 1
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(tile.shape)


def hed_matrices() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's colour deconvolution: rows of ``rgb_from_hed`` are the H, E and DAB optical-density
    vectors; ``hed_from_rgb`` is its inverse."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    return np.asarray(hed_from_rgb, dtype=np.float64), np.asarray(rgb_from_hed, dtype=np.float64)


def hed_jitter_affine(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The map of optical density (row vectors, natural log) that scales each stain by ``alpha`` and shifts it
    by ``beta`` (in scikit-image's HED units, as Tellez et al.): ``od' = od @ M + T``. Batched: ``[N, 3]``."""
    to_hed, to_rgb = hed_matrices()
    alpha, beta = np.atleast_2d(alpha), np.atleast_2d(beta)
    m = np.einsum("ij,nj,jk->nik", to_hed, alpha, to_rgb)
    t = (beta * SKIMAGE_OD_UNIT) @ to_rgb
    return m.astype(np.float32), t.astype(np.float32)


def draw_hed(rng: np.random.Generator, n: int, scale: float, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Per tile and stain: a factor uniform in [1 - scale, 1 + scale] and a shift uniform in [-shift, shift]."""
    return rng.uniform(1 - scale, 1 + scale, (n, 3)), rng.uniform(-shift, shift, (n, 3))


def apply_od_affine(tile: np.ndarray, m: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``od' = od @ m + t`` on a uint8 ``[H, W, 3]`` tile, with od = -log((I + 1) / 256): the reference the
    torch and DALI backends are tested against."""
    od = -np.log((tile.astype(np.float32) + 1) / 256)
    out = 256 * np.exp(-(od @ m + t)) - 1
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
