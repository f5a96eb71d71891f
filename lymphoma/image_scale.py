"""Whether images predicted by a pixel-tile model are at the scale of its training images. A model trained on
images that record no resolution (the data set's 417x312 copies at 0.3x) knows its scale only through their
size: the same field of view given at full size (1388x1040) shows every nucleus 3.3 times larger, and a model
that took it as it is would answer without complaint (0.23 of such images right against 0.47 at the training
scale: bench/full_size_scale.py). The checkpoint keeps the median size of its training images; prediction
compares each image with it. With ``predict.scale=match`` (the default) an image off by more than ``TOLERANCE``
that has the training images' aspect ratio, the signature of the same field at another resolution, is resized to
the training scale before it is cut; any other image off the scale is predicted as it is, and named in a warning
with the ``tiles.resize`` that would match it (a crop at the training magnification also differs in size)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

TOLERANCE = 1.5  # a linear size ratio beyond this (either way) is another scale
ASPECT_TOLERANCE = 0.03  # width:height within 3% of the training images': the same field of view
SCALES = ("match", "keep")  # predict.scale


def training_image_size(shapes: np.ndarray) -> Optional[list[int]]:
    """The median ``[height, width]`` of the training images' ``[N, 2]`` sizes (None without any)."""
    if len(shapes) == 0:
        return None
    return [int(round(v)) for v in np.median(np.asarray(shapes, dtype=np.float64), axis=0)]


def scale_ratio(shape: Sequence[int], resize: float, trained: Sequence[int], trained_resize: float) -> float:
    """How much larger an image of ``shape`` resized by ``resize`` is than the training images resized by
    theirs, along a side (square root of the areas' ratio, so crops of another aspect count by their area)."""
    return float(np.sqrt(shape[0] * shape[1] / (trained[0] * trained[1]))) * resize / trained_resize


def same_aspect(shape: Sequence[int], trained: Sequence[int]) -> bool:
    """Whether two ``[height, width]`` have the same width:height within ``ASPECT_TOLERANCE``."""
    return abs(math.log((shape[1] / shape[0]) / (trained[1] / trained[0]))) <= math.log1p(ASPECT_TOLERANCE)


@dataclass(frozen=True)
class TrainingScale:
    """What a pixel-tile model knows of its scale: its training images' median ``size`` ``(height, width)`` and
    the ``resize`` they were tiled with."""

    size: tuple[int, int]
    resize: float

    def matched_resize(self, shape: Sequence[int], resize: float) -> Optional[float]:
        """The resize that brings an image of ``shape``, to be tiled at ``resize``, to the training scale, where it is
        off by more than ``TOLERANCE`` and has the training images' aspect ratio; None otherwise."""
        ratio = scale_ratio(shape, resize, self.size, self.resize)
        if 1 / TOLERANCE <= ratio <= TOLERANCE or not same_aspect(shape, self.size):
            return None
        return resize / ratio


def pixel_model(state: dict[str, Any]) -> bool:
    """Whether the checkpoint's tiles were cut by pixels (not at a resolution) and it recorded its images' size."""
    tiles = state["tiles"]
    return (state.get("image_size") is not None and tiles.get("target_mpp") is None
            and tiles.get("target_power") is None)


def tiles_cut_with(state: dict[str, Any], tiles: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The tile settings images are cut with: the checkpoint's, with the user's ``tiles`` (``--force``) in place."""
    return {**state["tiles"], **(tiles or {})}


def training_scale(state: dict[str, Any], policy: str, tiles: Optional[dict[str, Any]] = None) -> Optional[TrainingScale]:
    """The scale images are matched to under ``policy`` (predict.scale): None with ``keep``, for models tiled by
    resolution, for checkpoints that do not record their images' size, and where the user's ``tiles`` cut by
    resolution (``--force tiles.target_mpp=...``: every image is read at it, none at a pixel scale)."""
    if policy not in SCALES:
        raise ValueError(f"predict.scale is {policy!r}; allowed: {', '.join(SCALES)}")
    cut = tiles_cut_with(state, tiles)
    if policy == "keep" or not pixel_model(state) or cut.get("target_mpp") is not None or cut.get("target_power") is not None:
        return None
    height, width = state["image_size"]
    return TrainingScale((int(height), int(width)), float(state["tiles"].get("resize", 1.0)))


def scale_notes(records: Sequence[dict[str, Any]], state: dict[str, Any], tiles: Optional[dict[str, Any]] = None,
                verb: str = "predict") -> list[str]:
    """What prediction (or embedding: ``verb``) says of the images' scale: the images resized to the training scale
    (``matched_resize`` in their records), and one warning for the images (``image_size``) left more than
    ``TOLERANCE`` off it at the resize they were cut with (the checkpoint's, or the user's ``tiles``), with the
    ``tiles.resize`` that would match the first; nothing when all match, for models tiled by resolution or images
    cut by it, and for checkpoints that do not record their images' size."""
    scale = training_scale(state, "match", tiles)  # what the model knows of its scale, whichever the policy
    if scale is None:
        return []
    resize = float(tiles_cut_with(state, tiles).get("resize", 1.0))
    trained, trained_resize = scale.size, scale.resize
    ok = [r for r in records if r.get("status") == "ok" and r.get("image_size")]
    matched = [r for r in ok if r.get("matched_resize")]
    off = [(r, scale_ratio(r["image_size"], resize, trained, trained_resize)) for r in ok if not r.get("matched_resize")]
    off = [(r, ratio) for r, ratio in off if not 1 / TOLERANCE <= ratio <= TOLERANCE]
    notes = []
    if matched:
        first = matched[0]
        height, width = first["image_size"]
        notes.append(f"{len(matched)} of {len(records)} image(s) were resized to the scale of the model's training "
                     f"images before tiling (e.g. {first['path']}: {width}x{height} pixels, resized by "
                     f"{first['matched_resize']:.3g}, against the training images' median {trained[1]}x{trained[0]}, "
                     f"resized by {trained_resize:g}): their width:height is the training images', so they were taken "
                     "for the same field of view at another resolution (predict.scale=match). If they are crops at "
                     f"the training magnification, {verb} them again with predict.scale=keep")
    if off:
        first, ratio = off[0]
        height, width = first["image_size"]
        notes.append(f"{len(off)} of {len(records)} image(s) are at {ratio:.2g}x the scale of the model's training "
                     f"images (e.g. {first['path']}: {width}x{height} pixels, resized by {resize:g}, against the "
                     f"training images' median {trained[1]}x{trained[0]}, resized by {trained_resize:g}); the model "
                     f"knows no other scale of them. If they show the same field of view as its training images, "
                     f"{verb} again with --force tiles.resize={resize / ratio:.3g}; if they are crops at the "
                     "training magnification, this is expected")
    return notes
