"""Whether images predicted by a pixel-tile model are at the scale of its training images. A model trained on
images that record no resolution (the data set's 417x312 copies at 0.3x) knows its scale only through their
size: the same field of view given at full size (1388x1040) shows every nucleus 3.3 times larger, and the model
answers without complaint. The checkpoint keeps the median size of its training images; prediction compares
each image with it and says what ``tiles.resize`` would bring the images to the training scale."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

TOLERANCE = 1.5  # a linear size ratio beyond this (either way) is worth a warning


def training_image_size(shapes: np.ndarray) -> Optional[list[int]]:
    """The median ``[height, width]`` of the training images' ``[N, 2]`` sizes (None without any)."""
    if len(shapes) == 0:
        return None
    return [int(round(v)) for v in np.median(np.asarray(shapes, dtype=np.float64), axis=0)]


def scale_ratio(shape: Sequence[int], resize: float, trained: Sequence[int], trained_resize: float) -> float:
    """How much larger an image of ``shape`` resized by ``resize`` is than the training images resized by
    theirs, along a side (square root of the areas' ratio, so crops of another aspect count by their area)."""
    return float(np.sqrt(shape[0] * shape[1] / (trained[0] * trained[1]))) * resize / trained_resize


def scale_warning(records: Sequence[dict[str, Any]], state: dict[str, Any], resize: float) -> Optional[str]:
    """One warning for the images (``image_size`` in their records) whose scale, at ``resize``, differs from the
    training images' by more than ``TOLERANCE``, with the ``tiles.resize`` that would match the first; None when
    all match, for models tiled by resolution, and for checkpoints that do not record their images' size."""
    trained, tiles = state.get("image_size"), state["tiles"]
    if trained is None or tiles.get("target_mpp") is not None or tiles.get("target_power") is not None:
        return None
    trained_resize = float(tiles.get("resize", 1.0))
    off = [(r, scale_ratio(r["image_size"], resize, trained, trained_resize)) for r in records
           if r.get("status") == "ok" and r.get("image_size")]
    off = [(r, ratio) for r, ratio in off if not 1 / TOLERANCE <= ratio <= TOLERANCE]
    if not off:
        return None
    first, ratio = off[0]
    height, width = first["image_size"]
    suggested = resize / ratio
    return (f"{len(off)} of {len(records)} image(s) are at {ratio:.2g}x the scale of the model's training images "
            f"(e.g. {first['path']}: {width}x{height} pixels, resized by {resize:g}, against the training images' "
            f"median {trained[1]}x{trained[0]}, resized by {trained_resize:g}); the model knows no other scale of "
            f"them. If they show the same field of view as its training images, predict again with --force "
            f"tiles.resize={suggested:.3g}; if they are crops at the training magnification, this is expected")
