"""Annotated regions in (QuPath GeoJSON): tiles only inside (or outside) them, their classes as labels, bad
region files as skipped images with their reason. Real images and slides, real shards, shapely to check."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tables
from shapely.geometry import box, shape

from jobs.tile import run_tile
from lymphoma.settings import TileSettings
from lymphoma.sharding import load_manifest, phase_shards
from lymphoma.tile_sources import open_tiles

# a QuPath-style annotation: a classified polygon with a hole, on a 417 x 312 image
RING = [[[40, 30], [380, 30], [380, 280], [40, 280], [40, 30]], [[150, 100], [260, 100], [260, 200], [150, 200],
                                                                 [150, 100]]]
CORNER = {"type": "MultiPolygon", "coordinates": [[[[0, 0], [120, 0], [120, 120], [0, 120], [0, 0]]]]}


def feature(geometry: dict, name: str | None = None) -> dict:
    properties = {"objectType": "annotation"} | ({"classification": {"name": name, "color": [255, 0, 0]}}
                                                 if name else {})
    return {"type": "Feature", "id": "a", "geometry": geometry, "properties": properties}


def tiles_of(manifest: Path, filename: str) -> tuple[np.ndarray, np.ndarray]:
    """Coords and labels of one image's tiles in the train shards."""
    coords, labels = [], []
    for path in phase_shards(manifest, "train"):
        with tables.open_file(path) as h5:
            mine = h5.root.filenames[:] == filename.encode()
            coords.append(h5.root.coords[:][mine])
            labels.append(h5.root.labels[:][mine])
    return np.concatenate(coords), np.concatenate(labels)


@pytest.fixture()
def annotated(make_dataset, tmp_path):
    """Three real images (one per class); region files for two of them, in a folder beside the class folders."""
    source = make_dataset(cases_per_class=1, images_per_case=1)
    images = sorted(source.rglob("*.png"))
    regions = tmp_path / "regions"
    regions.mkdir()
    (regions / f"{images[0].stem}.geojson").write_text(json.dumps(
        {"type": "FeatureCollection", "features": [feature({"type": "Polygon", "coordinates": RING}, "FL")]}))
    # QuPath's list form, saved again by a Windows editor with a byte-order mark
    (regions / f"{images[1].stem}.geojson").write_bytes(b"\xef\xbb\xbf" + json.dumps([feature(CORNER)]).encode())
    return source, images, regions


def test_tiles_lie_inside_their_regions_and_images_without_regions_are_tiled_whole(annotated, make_config):
    source, images, regions = annotated
    size = 64
    run = make_config(source, f"data.regions={regions}", f"tiles.size={size}", "tiles.stride=32",
                      "tiles.min_region=1.0", "split.val_fraction=0")
    manifest = run_tile(run, progress=False).manifest
    from jobs.pipeline import held_out_slides

    held_out = {s.key: s.regions for s in held_out_slides(run.split_csv, "train")}  # what `lymphoma run` predicts
    assert held_out == {images[0].stem: str(regions / f"{images[0].stem}.geojson"),
                        images[1].stem: str(regions / f"{images[1].stem}.geojson"), images[2].stem: ""}
    ring = shape({"type": "Polygon", "coordinates": RING})
    everything = open_tiles(str(images[0]), TileSettings(size=size, stride=32)).coords
    kept, labels = tiles_of(manifest, images[0].name)
    inside = {tuple(c) for c in everything if ring.covers(box(c[0], c[1], c[0] + size, c[1] + size))}
    assert 0 < len(kept) < len(everything) and {tuple(c) for c in kept} == inside  # exactly the tiles inside
    assert all(not ring.covers(box(x, y, x + size, y + size)) for x, y in everything if (x, y) not in inside)
    assert set(labels) == {load_manifest(manifest)["classes"].index(images[0].parent.name)}  # labels: the image's
    corner, _ = tiles_of(manifest, images[1].name)
    assert {tuple(c) for c in corner} == {(0, 0), (32, 0), (0, 32), (32, 32)}  # 64-px tiles within [0, 120]^2
    whole, _ = tiles_of(manifest, images[2].name)
    assert len(whole) == len(open_tiles(str(images[2]), TileSettings(size=size, stride=32)).coords)

    exclude = run.with_values({"tiles.region_mode": "exclude", "tiles.min_region": 0.5}).at(run.dir.parent / "ex")
    outside, _ = tiles_of(run_tile(exclude, progress=False).manifest, images[0].name)
    shares = [ring.intersection(box(x, y, x + size, y + size)).area / size**2 for x, y in outside]
    assert len(outside) > 0 and max(shares) <= 0.5  # at least half of each tile outside the annotation


def test_region_classes_label_the_tiles_and_an_edited_region_file_retiles(annotated, make_config):
    source, images, regions = annotated
    run = make_config(source, f"data.regions={regions}", "tiles.size=64", "tiles.stride=64",
                      "tiles.region_labels=true", "split.val_fraction=0")
    first = run_tile(run, progress=False)
    classes = load_manifest(first.manifest)["classes"]
    _, labels = tiles_of(first.manifest, images[0].name)
    assert set(labels) == {classes.index("FL")}  # the region's class, not its image's (CLL)
    _, unclassified = tiles_of(first.manifest, images[1].name)
    assert set(unclassified) == {classes.index(images[1].parent.name)}  # no classification: the image's label

    path = regions / f"{images[0].stem}.geojson"
    path.write_text(json.dumps(feature({"type": "Polygon", "coordinates": RING}, "Tumor")))
    os.utime(path, ns=(1, 1))  # a different mtime even within the same clock tick
    second = run_tile(run, progress=False)
    assert second.n_written == 1  # only the shard of the edited file's image
    reasons = {Path(s["path"]).name: s["reason"] for s in load_manifest(second.manifest)["skipped"]}
    assert "has a region of class 'Tumor', not one of ['CLL', 'FL', 'MCL']" in reasons[images[0].name]


@pytest.mark.parametrize("content, reason", [
    ("{not json", "is not readable GeoJSON (JSONDecodeError"),
    (json.dumps({"type": "FeatureCollection", "features": [feature({"type": "Point", "coordinates": [5, 5]})]}),
     "holds no region with an area (found 1 Point)"),
    (json.dumps({"type": "FeatureCollection", "features": []}), "holds no region with an area (found no features)"),
    (json.dumps(feature({"type": "Polygon", "coordinates": [[[5000, 5000], [6000, 5000], [6000, 6000],
                                                             [5000, 5000]]]})),
     "(5000,5000)-(6000,6000), lie outside it (417 x 312 pixels at level 0)"),
    (json.dumps(feature({"type": "Polygon", "coordinates": [[[0, 0], [30, 0], [30, 30], [0, 0]]]})),
     "has no tile with 50% of its area inside its regions"),
])
def test_a_bad_region_file_skips_its_image_with_the_reason(annotated, make_config, content, reason):
    source, images, regions = annotated
    (regions / f"{images[2].stem}.geojson").write_text(content)
    (regions / "no-such-image.geojson").write_text(json.dumps(feature(CORNER)))
    result = run_tile(make_config(source, f"data.regions={regions}", "tiles.size=64", "split.val_fraction=0"),
                      progress=False)
    skipped = {Path(s["path"]).name: s["reason"] for s in load_manifest(result.manifest)["skipped"]}
    assert reason in skipped[images[2].name] and f"{images[2].stem}.geojson" in skipped[images[2].name]
    assert "a region file for no image of data.source" in skipped["no-such-image.geojson"]
    assert len(tiles_of(result.manifest, images[0].name)[0]) > 0  # the others are tiled


def test_slide_regions_are_in_level0_pixels(wsi_dir, tmp_path):
    """A whole slide tiled at 1 mpp (level 0 is 0.499 mpp): kept tiles' level-0 squares inside the region."""
    slide = wsi_dir / "CMU-1-Small-Region.svs"
    region = {"type": "Polygon", "coordinates": [[[200, 300], [1800, 300], [1800, 2400], [200, 2400], [200, 300]]]}
    path = tmp_path / "r.geojson"
    path.write_text(json.dumps(feature(region)))
    settings = TileSettings(size=128, stride=128, target_mpp=1.0, min_tissue=0.1, min_region=1.0)
    everything = open_tiles(str(slide), settings)
    source = open_tiles(str(slide), settings, region_file=str(path))
    polygon, side = shape(region), source.extent
    assert 0 < len(source.coords) < len(everything.coords) and side > 250  # 128 px at 1 mpp: ~256 level-0 pixels
    assert all(polygon.covers(box(x, y, x + side, y + side)) for x, y in source.coords)
    assert sum(len(b) for b in source.batches) == len(source.coords)


def test_prediction_covers_only_the_regions_and_an_edited_region_file_is_predicted_again(annotated, tmp_path,
                                                                                       capsys):
    from dataclasses import asdict

    import torch

    from jobs.cli import main
    from lymphoma.checkpoint import save_checkpoint
    from lymphoma.model import build_model
    from lymphoma.settings import AugmentSettings, ModelSettings

    source, images, regions = annotated
    architecture = ModelSettings().architecture(3)
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    save_checkpoint({"model": build_model(architecture).state_dict(), "architecture": architecture, "epoch": 0,
                     "classes": ["CLL", "FL", "MCL"], "tiles": asdict(TileSettings(size=64, stride=32)),
                     "augment": asdict(AugmentSettings(crop=56))}, checkpoint)
    out = tmp_path / "predicted"
    words = ["predict", "--checkpoint", str(checkpoint), "--out", str(out), str(images[0]), str(images[2]),
             f"predict.regions={regions}", "cluster.poll_s=0.1"]
    assert main(words) == 0
    ring = shape({"type": "Polygon", "coordinates": RING})
    everything = open_tiles(str(images[0]), TileSettings(size=64, stride=32)).coords
    inside = [c for c in everything if ring.intersection(box(c[0], c[1], c[0] + 64, c[1] + 64)).area >= 0.5 * 64**2]
    record = json.loads((out / "slides" / f"{images[0].stem}.json").read_text())
    assert record["n_tiles"] == len(inside) < len(everything)  # tiles.min_region 0.5 of the model's settings
    squares = [shape(f["geometry"]) for f in
               json.loads((out / "slides" / f"{images[0].stem}.geojson").read_text())["features"]]
    assert len(squares) == len(inside) and all(ring.intersection(s).area >= 0.5 * s.area for s in squares)
    whole = json.loads((out / "slides" / f"{images[2].stem}.json").read_text())
    assert whole["n_tiles"] == len(open_tiles(str(images[2]), TileSettings(size=64, stride=32)).coords)

    path = regions / f"{images[0].stem}.geojson"
    path.write_text(json.dumps(feature(CORNER)))
    os.utime(path, ns=(1, 1))
    capsys.readouterr()
    assert main(words) == 0
    assert "2 of 2 slide(s) predicted (1 now, 1 already complete)" in capsys.readouterr().out
    assert json.loads((out / "slides" / f"{images[0].stem}.json").read_text())["n_tiles"] == 9  # 3 x 3 half in
