"""Per-slide tile outputs in the formats pathologists' tools read: a GeoJSON FeatureCollection of tile squares
(QuPath imports them as detections, classified, with each class's probability as a measurement) and a
CLAM-style HDF5 of the tiles' level-0 ``coords`` (with their probabilities), both at the file's full resolution."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lymphoma.plots import CLASS_COLOURS


def level0_squares(coords: np.ndarray, extent: float, to_level0: float) -> np.ndarray:
    """``[N, 4]`` (x0, y0, x1, y1) of each tile in full-resolution pixels."""
    top_left = np.asarray(coords, dtype=np.float64) * to_level0
    return np.concatenate([top_left, top_left + extent * to_level0], axis=1)


def write_geojson(path: Path, squares: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> None:
    """The tiles as a FeatureCollection of detection polygons (QuPath 0.4+), written atomically."""
    features = []
    for (x0, y0, x1, y1), p in zip(squares.tolist(), np.asarray(probs, dtype=np.float64)):
        k = int(p.argmax())
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {"objectType": "detection",
                           "classification": {"name": classes[k], "color": list(CLASS_COLOURS[k % len(CLASS_COLOURS)])},
                           "measurements": {f"probability {c}": round(float(v), 6) for c, v in zip(classes, p)}}})
    _write_atomic(path, json.dumps({"type": "FeatureCollection", "features": features}).encode())


def write_coords_h5(path: Path, squares: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> None:
    """CLAM's patch file layout: ``coords`` ``[N, 2]`` level-0 top-left corners (attributes ``patch_size`` and
    ``patch_level``), plus ``probs`` ``[N, classes]``; written atomically."""
    import h5py

    tmp = path.with_name(f".{path.name}.tmp")  # one name: a rerun of a slide killed half way overwrites it
    try:
        with h5py.File(tmp, "w") as h5:
            coords = h5.create_dataset("coords", data=np.rint(squares[:, :2]).astype(np.int64))
            coords.attrs["patch_size"] = int(round(squares[0, 2] - squares[0, 0])) if len(squares) else 0
            coords.attrs["patch_level"] = 0
            h5.create_dataset("probs", data=np.asarray(probs, dtype=np.float32))
            h5.attrs["classes"] = json.dumps(list(classes))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
