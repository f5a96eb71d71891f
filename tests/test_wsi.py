"""Whole-slide files through OpenSlide (real Aperio SVS and pyramidal TIFF): region reads, tissue, the
magnification-aware grid, the tile job on slides, and their errors."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from lymphoma.errors import ImageError
from lymphoma.sharding import load_manifest, phase_shards
from lymphoma.slides import SlideInfo, check_levels, open_slide
from lymphoma.tissue import detect_tissue
from lymphoma.wsi import iter_tiles, plan_grid
from synthetic_slides import damage_level0_tiles


@pytest.mark.parametrize("level", [0, 1, 2])
def test_region_reads_equal_a_reference_decode_of_each_level(wsi_dir, level):
    reference = Image.open(wsi_dir / "boxes.tiff")
    reference.seek(level)
    pixels = np.asarray(reference.convert("RGB"))
    with open_slide(wsi_dir / "boxes.tiff") as slide:
        assert slide.info.level_dimensions[level] == reference.size
        d = slide.info.level_downsamples[level]
        region = slide.read_region(int(np.ceil(20 * d)), int(np.ceil(10 * d)), level, 30, 25)
    if d == int(d):
        np.testing.assert_array_equal(region, pixels[10:35, 20:50])
    else:  # downsample 4.016: OpenSlide interpolates between the level's pixels
        assert np.abs(region.astype(int) - pixels[10:35, 20:50]).mean() < 10


def test_svs_metadata_and_a_region_at_level_0(wsi_dir):
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as slide:
        info = slide.info
        assert (info.vendor, info.dimensions, info.mpp, info.objective_power) == ("aperio", (2220, 2967), 0.499, 20.0)
        region = slide.read_region(1000, 1500, 0, 64, 48)
        assert region.shape == (48, 64, 3) and region.dtype == np.uint8 and region.std() > 10  # tissue, not blank


def test_tissue_detection_keeps_tissue_and_drops_background(wsi_dir):
    with open_slide(wsi_dir / "TCGA-CR-7395-01A-01-TS1.svs") as slide:
        thumbnail = slide.thumbnail(1024)
    mask = detect_tissue(thumbnail, thumbnail.shape[1] / 4443)
    assert 0.45 < mask.fraction < 0.8
    h, w = mask.mask.shape
    for corner in (mask.mask[:40, :40], mask.mask[:40, -40:], mask.mask[-40:, :40]):
        assert corner.mean() < 0.05  # the white glass around the section
    assert mask.mask[h // 2 - 50:h // 2 + 50, w // 2 - 150:w // 2 - 50].mean() > 0.9  # the section's middle
    white = np.full((200, 300, 3), 245, dtype=np.uint8)
    assert detect_tissue(white, 1.0).fraction == 0.0


def test_tiles_at_a_target_mpp_have_the_right_physical_size(wsi_dir):
    with open_slide(wsi_dir / "TCGA-CR-7395-01A-01-TS1.svs", default_mpp=0.5) as slide:
        grid = plan_grid(slide, 64, 64, 1.0, 0.5)
        assert grid.level == 1 and grid.read_size == 64  # 1.0 mpp = level 1 (downsample 2) of a 0.5-mpp slide
        assert grid.size0 * 0.5 == 64 * 1.0  # 64 px at 1 um/px cover 64 um = 128 level-0 pixels of 0.5 um
        tiles = next(iter_tiles(slide, grid, 64, batch=4))
        x, y = grid.coords[0]
        level0 = slide.read_region(int(x), int(y), 0, 128, 128)
        halved = np.asarray(Image.fromarray(level0).resize((64, 64), Image.Resampling.BOX)).astype(int)
        assert np.abs(tiles[0].astype(int) - halved).mean() < 12  # the same tissue at half the resolution
        finer = plan_grid(slide, 64, 64, 2.0, 0.5)
        assert finer.level == 1 and finer.read_size == 128  # 2 mpp: read 128 px at level 1, resized to 64
    with open_slide(wsi_dir / "TCGA-CR-7395-01A-01-TS1.svs") as slide:
        with pytest.raises(ImageError, match="no microns-per-pixel.*tiles.default_mpp"):
            plan_grid(slide, 64, 64, 1.0, 0.5)
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as slide:
        with pytest.raises(ImageError, match="finer than the slide's level 0"):
            plan_grid(slide, 64, 64, 0.25, 0.5)
    with open_slide(wsi_dir / "small.svs") as slide:
        with pytest.raises(ImageError, match="smaller than one 64-px tile"):
            plan_grid(slide, 64, 64, 0.5, 0.5)


def test_levels_that_disagree_are_an_error():
    info = SlideInfo("bad.svs", "aperio", ((4000, 3000), (1000, 3000)), (1.0, 4.0), 0.5, 20.0)
    with pytest.raises(ImageError, match="bad.svs: its levels disagree"):
        check_levels(info)


def test_tile_job_on_whole_slides_with_bad_ones_skipped(wsi_dir, data_root, tmp_path, capsys):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs", "small.svs"):
        shutil.copyfile(wsi_dir / name, folder / name)
    (folder / "corrupt.svs").write_bytes(b"II*\x00" + b"\x00" * 200)
    blank = folder / "blank.png"
    Image.fromarray(np.full((600, 600, 3), 250, dtype=np.uint8)).save(blank)
    manifest = tmp_path / "slides.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "case"])
        for i, name in enumerate(["CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs", "small.svs",
                                  "corrupt.svs", "blank.png"]):
            writer.writerow([folder / name, "CLL", f"case{i}"])
    code = main(["tile", "--no-progress", f"data.source={manifest}", f"run.root={tmp_path}", "run.name=wsi",
                 "split.val_fraction=0", "tiles.size=64", "tiles.stride=64", "tiles.target_mpp=2.0",
                 "tiles.default_mpp=0.5", "tiles.min_tissue=0.5"])
    assert code == 0, capsys.readouterr().err
    result = load_manifest(tmp_path / "wsi" / "tiles")
    skipped = {item["path"].rsplit("/", 1)[1]: item["reason"] for item in result["skipped"]}
    assert set(skipped) == {"small.svs", "corrupt.svs", "blank.png"}
    assert "smaller than one 64-px tile" in skipped["small.svs"]
    assert "OpenSlide cannot read it" in skipped["corrupt.svs"]
    assert "has no tile with at least 50% tissue" in skipped["blank.png"]
    assert result["phases"]["train"]["n_images"] == 2
    for name in ("CMU-1-Small-Region", "TCGA-CR-7395-01A-01-TS1", "blank"):  # a QC picture per readable slide
        assert Image.open(tmp_path / "wsi" / "tiles" / "qc" / f"{name}.png").size[0] > 100
    import tables

    with tables.open_file(phase_shards(tmp_path / "wsi" / "tiles", "train")[0]) as h5:
        images = {row["filename"].decode(): row for row in h5.root.images.read()}
        assert images["CMU-1-Small-Region.svs"]["width"] == 2220
        assert "level-0" in h5.root._v_attrs.coords_convention
        coords, names = h5.root.coords[:], h5.root.filenames[:].astype(str)
        first = int(np.flatnonzero(names == "CMU-1-Small-Region.svs")[0])
        with open_slide(folder / "CMU-1-Small-Region.svs") as slide:
            grid = plan_grid(slide, 64, 64, 2.0, 0.5)
            x, y = coords[first]
            expected = next(iter_tiles(slide, grid, 64, batch=1))[0]
        np.testing.assert_array_equal(h5.root.imgs[first], expected)
        assert (x, y) == tuple(grid.coords[0])
    capsys.readouterr()
    code = main(["tile", "--no-progress", f"data.source={manifest}", f"run.root={tmp_path}", "run.name=wsi-px",
                 "split.val_fraction=0", "tiles.size=64", "tiles.strict=true"])  # no target_mpp
    assert code == 1
    assert "set tiles.target_mpp" in capsys.readouterr().err


def test_inspect_reports_levels_tissue_and_grid(wsi_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    slide = str(wsi_dir / "CMU-1-Small-Region.svs")
    # the README's order: the slide, then its overrides (and the overrides first, too)
    for argv in ([slide, "tiles.size=128", "tiles.stride=128", "tiles.target_mpp=1.0", "--out", str(out)],
                 ["tiles.size=128", "--out", str(out), "tiles.stride=128", "tiles.target_mpp=1.0", slide]):
        assert main(["inspect", *argv]) == 0
        report = capsys.readouterr().out
        assert "vendor:     aperio" in report and "mpp:        0.499" in report and "0: 2220 x 2967" in report
        assert "tissue:" in report and "tiles of 128 px at 1.0 mpp kept" in report
        assert Image.open(out).size[1] == 1024
    # several slides: each reported, a picture each in the --out folder; one that cannot be read named, the rest shown
    other = str(wsi_dir / "TCGA-CR-7395-01A-01-TS1.svs")
    assert main(["inspect", slide, str(tmp_path / "missing.svs"), other, "tiles.target_mpp=1.0", "--out",
                 str(tmp_path / "many")]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("file:") == 2 and "mpp:        unknown (set tiles.default_mpp)" in captured.out
    assert f"{tmp_path / 'missing.svs'}: file not found" in captured.err and "1 of 3 slide(s) could not" in captured.err
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["CMU-1-Small-Region-grid.png",
                                                                     "TCGA-CR-7395-01A-01-TS1-grid.png"]
    assert main(["inspect", slide, other, "--out", str(out)]) == 2
    assert "2 slides have a picture each; give a folder for them" in capsys.readouterr().err
    assert main(["inspect", "tiles.target_mpp=1.0"]) == 2
    assert "takes one or more slides" in capsys.readouterr().err
    # --out: a folder gets the default name; a missing folder is made; a name that is no picture is refused first
    assert main(["inspect", slide, "--out", str(tmp_path)]) == 0
    assert Image.open(tmp_path / "CMU-1-Small-Region-grid.png").size[1] == 1024
    assert main(["inspect", slide, "--out", str(tmp_path / "qc" / "slide.jpg")]) == 0
    assert Image.open(tmp_path / "qc" / "slide.jpg").format == "JPEG"
    capsys.readouterr()
    assert main(["inspect", slide, "--out", str(tmp_path / "grid.txt")]) == 2
    assert "its name ends in one of .png, .jpg, .jpeg, .tif, .tiff (or give a folder)" in capsys.readouterr().err
    # a new name without a suffix (`--out qc/`, as for several slides) is a folder for one slide too
    assert main(["inspect", slide, "--out", str(tmp_path / "qc-one") + "/"]) == 0
    assert Image.open(tmp_path / "qc-one" / "CMU-1-Small-Region-grid.png").size[1] == 1024
    # --cluster slurm: still read here (it is light), and said so rather than taken for a job
    assert main(["inspect", slide, "--cluster", "slurm", "--out", str(tmp_path)]) == 0
    assert "lymphoma inspect runs in this process, not as a slurm job" in capsys.readouterr().out


def test_a_slide_damaged_inside_is_skipped_and_named_and_the_others_are_tiled(wsi_dir, tmp_path, capsys):
    folder = tmp_path / "slides"
    folder.mkdir()
    good = shutil.copyfile(wsi_dir / "CMU-1-Small-Region.svs", folder / "good.svs")
    damage_level0_tiles(wsi_dir / "TCGA-CR-7395-01A-01-TS1.svs", folder / "half-read.svs", 126, 40)
    damage_level0_tiles(wsi_dir / "CMU-1-Small-Region.svs", folder / "unreadable.svs", 0, 60)
    manifest = tmp_path / "slides.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "case"])
        for i, path in enumerate([folder / "half-read.svs", good, folder / "unreadable.svs"]):
            writer.writerow([path, "CLL", f"case{i}"])
    code = main(["tile", "--no-progress", f"data.source={manifest}", f"run.root={tmp_path}", "run.name=damaged",
                 "split.val_fraction=0", "tiles.size=64", "tiles.stride=64", "tiles.target_mpp=0.5",
                 "tiles.default_mpp=0.5"])
    assert code == 0, capsys.readouterr().err  # one task: the damaged slides did not sink it
    result = load_manifest(tmp_path / "damaged" / "tiles")
    skipped = {item["path"].rsplit("/", 1)[1]: item["reason"] for item in result["skipped"]}
    assert set(skipped) == {"half-read.svs", "unreadable.svs"}
    assert "region at" in skipped["half-read.svs"] and "of level 0 cannot be decoded" in skipped["half-read.svs"]
    assert "thumbnail cannot be decoded" in skipped["unreadable.svs"]
    assert all("the file is damaged" in reason for reason in skipped.values())
    import tables

    with tables.open_file(phase_shards(tmp_path / "damaged" / "tiles", "train")[0]) as h5:
        names = set(h5.root.filenames[:].astype(str))
        assert names == {"good.svs"}  # the tiles the half-read slide gave before its damage were dropped
        assert len(h5.root.imgs) == len(h5.root.coords) == h5.root.images.read()["n_tiles"].sum()
    with open_slide(good) as reader:
        expected = len(plan_grid(reader, 64, 64, 0.5, 0.5).coords)
    assert result["phases"]["train"]["n_tiles"] == expected


PEAK = """
import json, sys
from pathlib import Path
from lymphoma.inputs import ImageRecord
from lymphoma.store import write_shard
from lymphoma.settings import TileSettings
from hpc.memory import keep_freed_memory
keep_freed_memory()  # as the jobs' tasks run (hpc.task.task_setup): freed memory kept for reuse
mode, slide, out, checkpoint = sys.argv[1:5]
settings = TileSettings(size=128, stride=128, target_mpp=1.0, min_tissue=0.5)
Path(out).parent.mkdir(parents=True, exist_ok=True)
if mode == "tile":
    s = write_shard(Path(out), "train", [ImageRecord(slide, "CLL", "c")], ["CLL", "FL", "MCL"], settings,
                    "blosc:zstd:1", "x", strict=True)
    n = s.n_tiles
else:
    import torch
    from lymphoma.prediction import Predictor, SlideInput, predict_slides
    predictor = Predictor.from_checkpoint(Path(checkpoint), torch.device("cpu"), 32)
    n = predict_slides(predictor, [SlideInput(slide, Path(slide).stem)], Path(out))[0]["n_tiles"]
# VmHWM: this program's own peak (ru_maxrss would include the parent's memory before exec)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"tiles": n, "peak_mib": int(hwm.split()[1]) / 1024}))
"""


def _peak(mode: str, slide, out, checkpoint) -> dict:
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", PEAK, mode, str(slide), str(out), str(checkpoint)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_a_large_slide_is_tiled_and_predicted_in_bounded_memory(data_root, tmp_path):
    """A 16384 x 12288 mosaic of real tissue (576 MiB decoded) against a 2048 x 1536 one: 50 times the tiles,
    the same peak memory (measured on real subprocesses), with a pyramid or without, and outputs equal to the model
    on the same tiles."""
    from dataclasses import asdict

    import torch

    from lymphoma.checkpoint import save_checkpoint
    from lymphoma.model import build_model
    from lymphoma.settings import AugmentSettings, ModelSettings, TileSettings
    from synthetic_slides import write_mosaic_slide

    images = sorted((data_root / "lowres").rglob("*.png"))[::20]
    small = write_mosaic_slide(tmp_path / "small.tiff", images, 2048, 1536)
    large = write_mosaic_slide(tmp_path / "large.tiff", images, 16384, 12288)
    architecture = ModelSettings().architecture(3)
    torch.manual_seed(0)
    model = build_model(architecture).eval()
    checkpoint = tmp_path / "model.pt"
    save_checkpoint({"model": model.state_dict(), "architecture": architecture, "classes": ["CLL", "FL", "MCL"],
                     "epoch": 0, "tiles": asdict(TileSettings(size=128, stride=128, target_mpp=1.0, min_tissue=0.5)),
                     "augment": asdict(AugmentSettings(crop=112))}, checkpoint)
    figures = {(mode, name): _peak(mode, slide, tmp_path / f"{mode}-{name}" / ("s.h5" if mode == "tile" else ""),
                                   checkpoint)
               for mode in ("tile", "predict") for name, slide in (("small", small), ("large", large))}
    # without a pyramid (one level, as some exports are) its thumbnails were made from all 576 MiB at once
    flat = write_mosaic_slide(tmp_path / "flat.tiff", images, 16384, 12288, levels=1)
    figures[("tile", "flat")] = _peak("tile", flat, tmp_path / "tile-flat" / "s.h5", checkpoint)
    assert figures[("tile", "flat")]["tiles"] > 20 * figures[("tile", "small")]["tiles"]  # its own tissue mask
    for mode, name in (("tile", "large"), ("predict", "large"), ("tile", "flat")):
        assert name == "flat" or figures[(mode, name)]["tiles"] > 40 * figures[(mode, "small")]["tiles"] > 0
        growth = figures[(mode, name)]["peak_mib"] - figures[(mode, "small")]["peak_mib"]
        assert growth < 100, (mode, name, figures)  # the slide decodes to 576 MiB: it is never held whole
    assert figures[("tile", "large")]["peak_mib"] < 400  # a tiling task imports no torch: the slide would not fit
    outputs = np.load(tmp_path / "predict-small" / "small.npz")
    with open_slide(small) as slide:
        grid = plan_grid(slide, 128, 128, 1.0, 0.5)
        tiles = np.concatenate(list(iter_tiles(slide, grid, 128)))
    np.testing.assert_array_equal(outputs["coords"], grid.coords)
    from lymphoma.augment import eval_batch

    with torch.inference_mode():
        direct = model(eval_batch(tiles, AugmentSettings(crop=112), torch.device("cpu"))).numpy()
    np.testing.assert_allclose(outputs["logits"], direct, rtol=1e-4, atol=1e-4)
    assert Image.open(tmp_path / "predict-small" / "small.png").size[0] == 256


def test_the_whole_pipeline_on_whole_slides(data_root, tmp_path, capsys):
    """`lymphoma run` on pyramidal TIFFs of real tissue: tiled at a target mpp, trained, predicted."""
    from conftest import FAST
    from synthetic_slides import write_mosaic_slide

    by_class = {label: sorted((data_root / "lowres" / label).glob("*.png")) for label in ("CLL", "FL", "MCL")}
    manifest = tmp_path / "slides.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "case"])
        for label, images in by_class.items():
            for k in range(2):
                slide = write_mosaic_slide(tmp_path / f"{label}-{k}.tiff", images[k * 8:k * 8 + 8], 1024, 768)
                writer.writerow([slide, label, f"{label}-case{k}"])
    code = main(["run", "--no-progress", f"data.source={manifest}", f"run.root={tmp_path}", "run.name=wsi-run",
                 *FAST, "tiles.target_mpp=1.0", "tiles.min_tissue=0.3", "split.val_fraction=0.5", "train.epochs=1",
                 "train.max_steps_per_epoch=2"])
    out = capsys.readouterr().out
    assert code == 0, out
    import json

    metrics = json.loads((tmp_path / "wsi-run" / "predict" / "metrics.json").read_text())
    assert metrics["predicted"] == metrics["slides"] == 3 and metrics["failed"] == 0
    record = json.loads(next((tmp_path / "wsi-run" / "predict" / "slides").glob("*.json")).read_text())
    assert record["n_tiles"] > 20 and sum(record["votes"].values()) == record["n_tiles"]


def test_a_target_objective_power_converts_with_each_slides_own(wsi_dir):
    from lymphoma.settings import TileSettings
    from lymphoma.wsi import target_mpp

    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as slide:  # 20x at 0.499 mpp
        assert target_mpp(slide, TileSettings(target_power=10)) == pytest.approx(0.998)
        grid = plan_grid(slide, 64, 64, target_mpp(slide, TileSettings(target_power=10)), 0.5)
        assert grid.level == 0 and grid.read_size == 128  # 10x from a 20x level 0: twice the pixels, resized
    with open_slide(wsi_dir / "TCGA-CR-7395-01A-01-TS1.svs", default_mpp=0.5) as slide:
        with pytest.raises(ImageError, match="needs the slide's objective power"):
            target_mpp(slide, TileSettings(target_power=10))
    with pytest.raises(Exception, match="not both"):
        TileSettings(target_mpp=0.5, target_power=20)
