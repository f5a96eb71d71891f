"""The tiler on real images: counts follow the formula, pixels equal the source at their coordinates."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lymphoma.errors import InputError
from lymphoma.images import read_rgb
from lymphoma.settings import TileSettings
from lymphoma.tiling import background_share, cut_tiles, grid_shape


@pytest.fixture(scope="module")
def image(data_root):
    return read_rgb(data_root / "lowres" / "FL" / "sj-05-1881-R1_001.png")


def expected_count(h: int, w: int, size: int, stride: int, pad: int) -> int:
    return ((h + 2 * pad - size) // stride + 1) * ((w + 2 * pad - size) // stride + 1)


@pytest.mark.parametrize(("size", "stride", "pad"), [(128, 64, 0), (128, 128, 0), (64, 32, 16), (100, 37, 50), (312, 1, 0)])
def test_tile_count_matches_formula(image, size, stride, pad):
    h, w = image.shape[:2]
    tiles = cut_tiles(image, TileSettings(size=size, stride=stride, pad=pad))
    assert len(tiles.pixels) == expected_count(h, w, size, stride, pad)
    assert tiles.pixels.shape[1:] == (size, size, 3) and tiles.pixels.dtype == np.uint8
    assert grid_shape(h, w, TileSettings(size=size, stride=stride, pad=pad))[0] * \
        grid_shape(h, w, TileSettings(size=size, stride=stride, pad=pad))[1] == len(tiles.pixels)


@pytest.mark.parametrize("pad", [0, 24])
def test_tiles_equal_source_pixels_at_their_coordinates(image, pad):
    settings = TileSettings(size=96, stride=40, pad=pad)
    tiles = cut_tiles(image, settings)
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    assert tiles.coords.min() == -pad
    for tile, (x, y) in zip(tiles.pixels, tiles.coords):
        np.testing.assert_array_equal(tile, padded[y + pad:y + pad + 96, x + pad:x + pad + 96])
    inside = (tiles.coords >= 0).all(axis=1) & (tiles.coords[:, 0] + 96 <= image.shape[1]) \
        & (tiles.coords[:, 1] + 96 <= image.shape[0])
    x, y = tiles.coords[inside][0]
    np.testing.assert_array_equal(tiles.pixels[inside][0], image[y:y + 96, x:x + 96])


def test_resize_factor_is_applied_before_tiling(image):
    settings = TileSettings(size=64, stride=64, resize=0.5, resample="box")
    tiles = cut_tiles(image, settings)
    h, w = round(image.shape[0] * 0.5), round(image.shape[1] * 0.5)
    small = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BOX))
    assert len(tiles.pixels) == expected_count(h, w, 64, 64, 0)
    x, y = tiles.coords[-1]
    np.testing.assert_array_equal(tiles.pixels[-1], small[y:y + 64, x:x + 64])


def test_background_filter_drops_white_tiles_and_counts_them(image):
    img = image.copy()
    img[:, :200] = 250  # the left half is blank glass
    keep_all = cut_tiles(img, TileSettings(size=64, stride=64))
    filtered = cut_tiles(img, TileSettings(size=64, stride=64, max_background=0.5))
    assert filtered.n_background > 0
    assert len(filtered.pixels) + filtered.n_background == len(keep_all.pixels)
    assert (filtered.coords[:, 0] + 64 > 200).all()  # every kept tile reaches the tissue
    white = (filtered.pixels >= 220).all(axis=-1).mean(axis=(1, 2))
    assert (white <= 0.5).all()


def test_background_share_is_each_tiles_own_mean_whatever_the_overlap(image):
    """The summed-area count equals the mean over each tile's own pixels, on real tissue with glass painted in,
    for tiles that overlap by half, by two thirds, not at all, and with sizes that share no factor but 1."""
    from numpy.lib.stride_tricks import sliding_window_view

    img = image.copy()
    img[:90, :150] = 245
    for size, stride, level in ((128, 64, 220), (96, 32, 200), (64, 64, 180), (77, 13, 210), (50, 7, 230)):
        rows, cols = (img.shape[0] - size) // stride + 1, (img.shape[1] - size) // stride + 1
        grid = sliding_window_view(img, (size, size, 3))[::stride, ::stride, 0][:rows, :cols]
        share = background_share(img, level, size, stride, rows, cols)
        np.testing.assert_array_equal(share, (grid >= level).all(axis=-1).mean(axis=(-2, -1)))
        assert share.min() < 0.1 and share.max() > 0.5  # tissue and glass both counted


def test_image_smaller_than_a_tile_is_an_error_naming_the_fix(image):
    with pytest.raises(InputError, match="smaller than a 400-pixel tile.*lower tiles.size"):
        cut_tiles(image, TileSettings(size=400, stride=64))


def test_settings_name_allowed_values():
    with pytest.raises(InputError, match="allowed: nearest, bilinear"):
        TileSettings(resample="cubic-ish")
    with pytest.raises(InputError, match="tiles.stride must be positive"):
        TileSettings(stride=0)


def test_a_jpeg_to_be_shrunk_is_decoded_smaller_and_cut_as_if_decoded_whole(data_root, manifest_rows):
    """A full-size JPEG cut at 0.3 (tiles.resize, or matched to a model trained on the 417x312 copies) is decoded at
    half size by its DCT scaling, then resized the rest of the way: the grid, coordinates and overview of the image
    decoded whole, its tiles within 1.5 levels of them on average (Reinhard by image after the resize either way).
    A PNG, and a JPEG cut at its own size, are decoded whole and cut bit for bit as before."""
    from lymphoma.image_scale import TrainingScale
    from lymphoma.images import decode_rgb
    from lymphoma.stain import StainNormalizer, StainSettings, fit_target
    from lymphoma.tile_sources import open_tiles

    row = next(r for r in manifest_rows if r["fullres_jpeg_path"])
    jpeg, png = data_root / row["fullres_jpeg_path"], data_root / row["lowres_path"]
    pixels, full = decode_rgb(jpeg, shrink_to=lambda height, width: (312, 416))
    assert pixels.shape == (520, 694, 3) and full == (1040, 1388)
    assert decode_rgb(png, shrink_to=lambda height, width: (100, 100))[0].shape == (312, 417, 3)
    normalise = StainNormalizer(fit_target(StainSettings("reinhard", scope="image")))
    for settings, scale in ((TileSettings(resize=0.3), None), (TileSettings(), TrainingScale((312, 417), 1.0))):
        source = open_tiles(str(jpeg), settings, stain=normalise, scale=scale)
        resize = 1 / source.to_level0
        whole = cut_tiles(read_rgb(jpeg), TileSettings(resize=resize), normalise)
        tiles = np.concatenate(list(source.batches))
        assert resize == pytest.approx(0.3, abs=0.001) and source.shape == (1040, 1388)
        np.testing.assert_array_equal(source.coords, whole.coords)
        assert np.abs(tiles.astype(int) - whole.pixels).mean() < 1.5
        assert source.overview.shape[:2] == (156, 208 if scale is None else 209) and source.coord_scale == 0.5
    for path, settings in ((png, TileSettings(resize=0.5)), (jpeg, TileSettings())):
        source = open_tiles(str(path), settings, stain=normalise)
        whole = cut_tiles(read_rgb(path), settings, normalise)
        np.testing.assert_array_equal(np.concatenate(list(source.batches)), whole.pixels)
