"""Tissue detection on a slide thumbnail: Otsu on saturation, then morphological clean-up (scikit-image)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TissueMask:
    """A boolean mask over the thumbnail; ``scale`` is thumbnail pixels per level-0 pixel."""

    mask: np.ndarray
    scale: float

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def fraction_in(self, x: float, y: float, size: float) -> float:
        """Tissue share of the level-0 square (x, y, size), measured on the thumbnail."""
        h, w = self.mask.shape
        x0, y0 = int(np.floor(x * self.scale)), int(np.floor(y * self.scale))
        x1, y1 = int(np.ceil((x + size) * self.scale)), int(np.ceil((y + size) * self.scale))
        window = self.mask[max(0, y0):min(h, max(y1, y0 + 1)), max(0, x0):min(w, max(x1, x0 + 1))]
        return float(window.mean()) if window.size else 0.0


def detect_tissue(thumbnail: np.ndarray, scale: float, min_saturation: float = 0.05,
                  min_object_fraction: float = 0.0005) -> TissueMask:
    """Tissue where saturation is above Otsu's threshold (and above ``min_saturation``), closed, opened,
    with holes filled and specks below ``min_object_fraction`` of the thumbnail removed."""
    from skimage import color, filters, morphology

    saturation = color.rgb2hsv(thumbnail)[..., 1]
    if float(saturation.max() - saturation.min()) < 1e-6:
        return TissueMask(np.zeros(saturation.shape, dtype=bool), scale)
    threshold = max(float(filters.threshold_otsu(saturation)), min_saturation)
    mask = saturation > threshold
    footprint = morphology.disk(max(1, round(min(mask.shape) / 200)))
    mask = morphology.closing(mask, footprint)
    mask = morphology.opening(mask, footprint)
    min_size = max(1, int(min_object_fraction * mask.size))
    mask = morphology.remove_small_objects(mask, max_size=min_size)
    mask = morphology.remove_small_holes(mask, max_size=min_size)
    return TissueMask(mask, scale)
