"""Annotated regions of a slide, as QuPath exports them (GeoJSON): which tiles to cut, and optionally their class.

A region file is a FeatureCollection, a Feature, a list of Features (QuPath's "Export objects as GeoJSON") or a
bare geometry. Polygons and MultiPolygons (with holes) are regions, in level-0 pixels of the image they were
drawn on; a feature's ``classification`` (``{"name": ...}`` or a plain name) is its class. Geometry is
shapely's: invalid rings are repaired with ``make_valid``, tile shares are exact intersection areas.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lymphoma.errors import ImageError

REGION_MODES = ("include", "exclude")
REGION_SUFFIXES = (".geojson", ".json")
AREA_TYPES = ("Polygon", "MultiPolygon")


@dataclass(frozen=True)
class Regions:
    """The regions of one slide: the slide, their file, shapes (level-0 pixels) and classes (None: unclassified)."""

    slide: str
    path: str
    shapes: tuple[Any, ...]
    classes: tuple[Optional[str], ...]

    @property
    def union(self) -> Any:
        import shapely

        return shapely.union_all(self.shapes)


def _features(data: Any, path: Path) -> list[dict[str, Any]]:
    """The features of any GeoJSON shape QuPath or another tool writes."""
    if isinstance(data, list):
        return [f for item in data for f in _features(item, path)]
    if not isinstance(data, dict) or "type" not in data:
        raise ValueError("expected a GeoJSON object with a 'type' (FeatureCollection, Feature or a geometry)")
    kind = data["type"]
    if kind == "FeatureCollection":
        return _features(data.get("features") or [], path)
    if kind == "Feature":
        return [data]
    return [{"type": "Feature", "geometry": data, "properties": {}}]


def _class_name(properties: Optional[dict[str, Any]]) -> Optional[str]:
    value = (properties or {}).get("classification")
    if isinstance(value, dict):
        value = value.get("name")
    return str(value) if value not in (None, "") else None


def read_regions(path: str | Path, slide: str) -> Regions:
    """The polygon regions of ``path`` for ``slide``; ImageError (naming both, and the fix) when the file is not
    GeoJSON or holds no region with an area."""
    import shapely
    from shapely.geometry import shape

    path = Path(path)
    try:
        features = _features(json.loads(path.read_text(encoding="utf-8-sig")), path)  # a BOM too (Windows tools)
        shapes, classes, other = [], [], Counter()
        for feature in features:
            geometry = feature.get("geometry") or {}
            if geometry.get("type") not in AREA_TYPES:
                other[str(geometry.get("type"))] += 1
                continue
            geom = shapely.make_valid(shape(geometry))
            if geom.is_empty or geom.area <= 0:
                continue
            shapes.append(geom)
            classes.append(_class_name(feature.get("properties")))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
        raise ImageError(slide, f"its region file {path} is not readable GeoJSON ({type(err).__name__}: {err}); "
                                "export it again from QuPath (File > Export objects as GeoJSON) or remove it") from None
    if not shapes:
        found = ", ".join(f"{n} {kind}" for kind, n in other.items()) or "no features"
        raise ImageError(slide, f"its region file {path} holds no region with an area (found {found}); draw "
                                "Polygon or MultiPolygon annotations, or remove the file")
    return Regions(slide, str(path), tuple(shapes), tuple(classes))


def select_tiles(regions: Regions, corners: np.ndarray, side: float, shape: tuple[int, int], mode: str,
                 min_share: float) -> tuple[np.ndarray, list[Optional[str]]]:
    """Which tiles (level-0 top-left ``corners`` [N, 2], squares of ``side``) to keep on a slide of ``shape``
    (height, width): those with at least ``min_share`` of their area inside the regions (``include``) or
    outside them (``exclude``); and each kept tile's class, that of the region covering most of it."""
    import shapely

    height, width = shape
    union = regions.union
    if not union.intersects(shapely.box(0, 0, width, height)):
        x0, y0, x1, y1 = (round(v) for v in union.bounds)
        raise ImageError(regions.slide, f"its regions in {regions.path}, ({x0},{y0})-({x1},{y1}), lie outside it "
                                        f"({width} x {height} pixels at level 0): drawn on another image, or at "
                                        "another resolution? Export them from this slide in QuPath")
    corners = np.asarray(corners, dtype=np.float64).reshape(-1, 2)
    boxes = shapely.box(corners[:, 0], corners[:, 1], corners[:, 0] + side, corners[:, 1] + side)
    inside = shapely.area(shapely.intersection(boxes, union)) / (side * side)
    keep = inside >= min_share - 1e-9 if mode == "include" else (1 - inside) >= min_share - 1e-9
    labels: list[Optional[str]] = [None] * int(keep.sum())
    if mode == "include" and any(c is not None for c in regions.classes):
        shares = np.stack([shapely.area(shapely.intersection(boxes[keep], s)) for s in regions.shapes], axis=1)
        labels = [regions.classes[i] for i in shares.argmax(axis=1)]
    return keep, labels


def regions_stamp(path: str) -> str:
    """A region file as records and fingerprints remember it (path, size, time): an edited file is noticed."""
    if not path or not Path(path).is_file():
        return path
    stat = Path(path).stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def find_region_file(folder: Optional[str | Path], stem: str) -> Optional[Path]:
    """``<folder>/<stem>.geojson`` (or ``.json``) when it exists."""
    if not folder:
        return None
    for suffix in REGION_SUFFIXES:
        candidate = Path(folder) / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None
