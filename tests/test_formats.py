"""Slide formats people have, through the one slide reader: OME-TIFF pyramids (every level, which OpenSlide does
not see) and DICOM WSI, on files the tests write from real tissue, read back pixel for pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lymphoma.errors import ImageError, InputError
from lymphoma.settings import TileSettings
from lymphoma.slides import open_slide
from lymphoma.tile_sources import open_tiles
from synthetic_slides import damage_level0_tiles, mosaic_levels, write_ome_pyramid


@pytest.fixture(scope="module")
def levels(data_root):
    images = sorted((data_root / "lowres").rglob("*.png"))[::25]
    return mosaic_levels(images, 1300, 900, levels=3)  # not a multiple of the 256-px tiles: ragged edges


def test_ome_tiff_reads_every_level_pixel_for_pixel(levels, tmp_path):
    import openslide

    path = write_ome_pyramid(tmp_path / "slide.ome.tif", levels, mpp=0.5)
    with open_slide(path) as reader:
        info = reader.info
        assert info.vendor == "ome-tiff" and info.mpp == pytest.approx(0.5)
        assert info.level_dimensions == tuple((a.shape[1], a.shape[0]) for a in levels)
        assert info.level_downsamples == pytest.approx([1.0, 1300 / 650, 1300 / 325])
        for level, pixels in enumerate(levels):
            d = info.level_downsamples[level]
            h, w = pixels.shape[:2]
            for x, y, size in [(0, 0, 64), (250, 200, 300), (w - 100, h - 80, 150), (0, 0, max(w, h))]:
                region = reader.read_region(round(x * d), round(y * d), level, size, size)
                expected = np.full((size, size, 3), 255, dtype=np.uint8)  # beyond the edge: white
                part = pixels[y:y + size, x:x + size]
                expected[:part.shape[0], :part.shape[1]] = part
                np.testing.assert_array_equal(region, expected, err_msg=f"level {level} at {(x, y)}")
        assert reader.thumbnail(200).shape == (138, 200, 3)
    with openslide.OpenSlide(str(path)) as other:  # what OpenSlide alone would have given
        assert other.level_count < len(levels)


def test_an_ome_tiff_tile_that_does_not_decode_is_an_error_naming_the_file(levels, tmp_path):
    path = write_ome_pyramid(tmp_path / "slide.ome.tif", levels, mpp=0.5)
    damaged = tmp_path / "damaged.ome.tif"
    damage_level0_tiles(path, damaged, 1, 1)
    with open_slide(damaged) as reader:
        assert reader.read_region(0, 0, 0, 64, 64).shape == (64, 64, 3)  # tile 0 is whole
        assert reader.thumbnail(100).shape[1] == 100  # from a level left whole
        with pytest.raises(ImageError, match="damaged.ome.tif: its tile 1 of level 0 cannot be decoded .*damaged"):
            reader.read_region(0, 0, 0, 600, 64)


@pytest.mark.parametrize("compression", ["jpeg", "lzw"])
def test_ome_tiffs_of_jpeg_or_lzw_tiles_read_as_tifffile_decodes_them(levels, tmp_path, compression):
    """QuPath writes RGB OME-TIFFs of JPEG tiles: they were called damaged (tifffile alone decodes neither JPEG nor
    LZW, and the first tile was read where making tifffile's decoder had moved the file's position)."""
    import tifffile

    path = write_ome_pyramid(tmp_path / "slide.ome.tif", levels, mpp=0.5, compression=compression)
    with tifffile.TiffFile(path) as tif:
        decoded = [level.asarray() for level in tif.series[0].levels]
    with open_slide(path) as reader:
        for level, pixels in enumerate(decoded):
            h, w = pixels.shape[:2]
            d = reader.info.level_downsamples[level]
            np.testing.assert_array_equal(reader.read_region(round(50 * d), round(40 * d), level, 100, 100),
                                          pixels[40:140, 50:150])
            np.testing.assert_array_equal(reader.read_region(0, 0, level, w, h), pixels)
    if compression == "lzw":  # lossless
        np.testing.assert_array_equal(decoded[0], levels[0])


def test_a_tiff_of_strips_too_large_to_decode_whole_is_read_strip_by_strip_as_a_slide(levels, tmp_path, monkeypatch):
    """An export without tiles or pyramid (strips) declaring more than tiles.max_pixels was refused as a possible
    decompression bomb even when tiled as a whole slide, which its own advice said to do (and tiles.max_pixels
    was not applied there at all): now it is read strip by strip, pixel for pixel, at the microns per pixel of its
    resolution tags; a PNG as large, tiled as a whole slide, gets the advice that works: convert it."""
    import tifffile
    from PIL import Image

    import lymphoma.slides

    pixels, limit = levels[0], 500_000  # 1300 x 900 = 1,170,000 pixels
    monkeypatch.setattr(lymphoma.slides, "BAND_PIXELS", 50_000)  # thumbnails made of 25 bands of 36 rows
    for compression in (None, "lzw", "jpeg"):
        path = tmp_path / f"strips-{compression}.tif"
        tifffile.imwrite(path, pixels, photometric="rgb", rowsperstrip=16, compression=compression,
                         resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
        decoded = tifffile.imread(path)
        with open_slide(path, max_pixels=limit) as reader:
            assert reader.info.vendor == "tiff-strips" and reader.info.mpp == pytest.approx(0.5)
            for x, y, size in [(0, 0, 64), (250, 200, 300), (1200, 850, 150)]:
                expected = np.full((size, size, 3), 255, dtype=np.uint8)  # beyond the edge: white
                part = decoded[y:y + size, x:x + size]
                expected[:part.shape[0], :part.shape[1]] = part
                np.testing.assert_array_equal(reader.read_region(x, y, 0, size, size), expected)
            whole = Image.fromarray(decoded).resize((200, 138), Image.Resampling.LANCZOS, reducing_gap=2.0)
            np.testing.assert_array_equal(reader.thumbnail(200), np.asarray(whole))  # made band by band, the same
        with open_slide(path) as reader:  # within the limit: the plain image, decoded whole, as before
            assert reader.info.vendor == "image"
    settings = TileSettings(size=128, stride=128, target_mpp=1.0, min_tissue=0.0, max_pixels=limit)
    source = open_tiles(str(path), settings)
    assert len(np.concatenate(list(source.batches))) == (900 // 256) * (1300 // 256)
    with pytest.raises(ImageError, match=r"or read it as a whole slide, region by region, as 8-bit RGB TIFFs are with "):
        open_tiles(str(path), TileSettings(size=128, stride=128, max_pixels=limit))  # cut by pixels: decoded whole
    png = tmp_path / "large.png"
    Image.fromarray(pixels).save(png)
    with pytest.raises(ImageError, match=r"large.png: declares 1300 x 900 .* or convert it to a tiled pyramidal TIFF"):
        open_tiles(str(png), settings)


def test_ome_tiff_slides_are_tiled_from_the_level_of_their_resolution(levels, tmp_path):
    path = write_ome_pyramid(tmp_path / "slide.ome.tiff", levels, mpp=0.5)
    source = open_tiles(str(path), TileSettings(size=128, stride=128, target_mpp=1.0, min_tissue=0.0))
    tiles = np.concatenate(list(source.batches))
    assert len(tiles) == len(source.coords) == (900 // 256) * (1300 // 256)  # 128 px at 1 mpp = 256 level-0 px
    for (x, y), tile in zip(source.coords, tiles):  # level 1 (1 mpp), no resampling: the level's own pixels
        np.testing.assert_array_equal(tile, levels[1][y // 2:y // 2 + 128, x // 2:x // 2 + 128])


def test_dicom_wsi_reads_every_level_pixel_for_pixel_from_any_file_of_its_series(levels, tmp_path):
    from synthetic_slides import write_dicom_pyramid

    files = write_dicom_pyramid(tmp_path / "slide-7", levels, mpp=0.5)
    for given in (files[0], files[2]):  # OpenSlide finds the series' other instances beside the one given
        with open_slide(given) as reader:
            assert reader.info.vendor == "dicom" and reader.info.mpp == pytest.approx(0.5)
            assert reader.info.level_dimensions == tuple((a.shape[1], a.shape[0]) for a in levels)
            for level, pixels in enumerate(levels):
                d = round(reader.info.level_downsamples[level])
                h, w = pixels.shape[:2]
                for x, y, size in [(0, 0, 64), (250, 200, 300), (w - 100, h - 80, 90)]:
                    region = reader.read_region(x * d, y * d, level, size, size)
                    np.testing.assert_array_equal(region[:h - y, :w - x], pixels[y:y + size, x:x + size],
                                                  err_msg=f"level {level} at {(x, y)}")


def test_dicom_slides_in_class_and_case_folders_are_one_image_each(levels, tmp_path):
    """Training's class folders hold a DICOM slide as its series folder, under the class (`CLL/slide-1/*.dcm`, its
    case from the pattern) or under a case (`MCL/p2/slide-2/*.dcm`); prediction tells the same class and case."""
    import re

    from lymphoma.inputs import discover
    from lymphoma.prediction_inputs import expand_inputs
    from synthetic_slides import write_dicom_pyramid

    first = write_dicom_pyramid(tmp_path / "cohort" / "CLL" / "slide-1", levels)
    second = write_dicom_pyramid(tmp_path / "cohort" / "MCL" / "p2" / "slide-2", levels)
    inputs = discover(tmp_path / "cohort", ["CLL", "FL", "MCL"], r"^(?P<case>.+)$", strict=True)
    assert [(r.key, r.label, r.case) for r in inputs.records] == [("slide-1", "CLL", "slide-1"),
                                                                   ("slide-2", "MCL", "p2")]
    assert {Path(r.path).parent for r in inputs.records} == {first[0].parent, second[0].parent}  # one file each
    slides = expand_inputs([str(tmp_path / "cohort")], None, None, ["CLL", "FL", "MCL"], re.compile(r"^(?P<case>.+)$"))
    assert [(s.key, s.label, s.case) for s in slides] == [(r.key, r.label, r.case) for r in inputs.records]


def test_a_dicom_slide_is_predicted_once_named_after_its_folder(levels, tmp_path):
    import re

    from lymphoma.prediction_inputs import expand_inputs
    from synthetic_slides import write_dicom_pyramid

    for name in ("slide-1", "slide-2"):
        write_dicom_pyramid(tmp_path / "cohort" / name, levels)
    (tmp_path / "regions").mkdir()
    (tmp_path / "regions" / "slide-2.geojson").write_text("{}")
    slides = expand_inputs([f"{tmp_path}/cohort/**/*.dcm"], None, None, ["CLL", "FL", "MCL"],
                           re.compile(r"^(?P<case>.+)$"), str(tmp_path / "regions"))
    assert [s.key for s in slides] == ["slide-1", "slide-2"]  # six files, two slides
    (tmp_path / "cohort" / "notes.txt").write_text("not a slide")
    given_folder = expand_inputs([str(tmp_path / "cohort")], None, None, ["CLL", "FL", "MCL"],
                                 re.compile(r"^(?P<case>.+)$"))  # a folder: every image file under it
    assert [(s.key, s.path) for s in given_folder] == [(s.key, s.path) for s in slides]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="'.*empty' matches no image file"):
        expand_inputs([str(tmp_path / "empty")], None, None, ["CLL"], re.compile(r"^(?P<case>.+)$"))
    assert [Path(s.regions).name for s in slides if s.regions] == ["slide-2.geojson"]  # found by the slide's name
    source = open_tiles(slides[0].path, TileSettings(size=128, stride=128, target_mpp=1.0, min_tissue=0.0))
    tiles = np.concatenate(list(source.batches))
    for (x, y), tile in zip(source.coords, tiles):
        np.testing.assert_array_equal(tile, levels[1][y // 2:y // 2 + 128, x // 2:x // 2 + 128])
