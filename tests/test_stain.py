"""Stain normalisation (Macenko, Reinhard) and HED jitter on real H&E tiles, in both backends and at
prediction, and the errors for references that cannot serve."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import hed2rgb, rgb2hed

from conftest import config_for
from jobs.config import ConfigError, load_config, to_object
from lymphoma.augment import DaliAugmenter, TorchAugmenter, build_augmenter
from lymphoma.errors import InputError
from lymphoma.images import read_rgb
from lymphoma.reinhard import reinhard
from lymphoma.settings import AugmentSettings
from lymphoma.stain import (
    DEFAULT_LAB,
    StainNormalizer,
    StainSettings,
    apply_od_affine,
    draw_hed,
    fit_target,
    hed_jitter_affine,
)

CPU = torch.device("cpu")
REFERENCE = "lowres/CLL/sj-05-5269-R10_004.png"
SOURCE = "lowres/CLL/sj-03-2810_001.png"


@pytest.fixture(scope="module")
def tiles(data_root) -> np.ndarray:
    image = read_rgb(data_root / SOURCE)
    return np.stack([image[y:y + 128, x:x + 128] for y, x in ((0, 0), (100, 200), (180, 280), (60, 120))])


def _stain_vectors(image: np.ndarray) -> np.ndarray:
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    fitted = NumpyMacenkoNormalizer()
    fitted.fit(image)
    return np.asarray(fitted.HERef)


def test_macenko_moves_a_tile_to_the_reference_stains(data_root, tiles):
    target = fit_target(StainSettings("macenko", str(data_root / REFERENCE)))
    out = StainNormalizer(target)(tiles[0])
    assert out.dtype == np.uint8 and out.shape == tiles[0].shape
    reference = np.asarray(target.he)
    before = np.abs(_stain_vectors(tiles[0]) - reference).max()
    after = np.abs(_stain_vectors(out) - reference).max()
    assert after < 0.05 < before  # the tile's own H and E directions become the reference's


def test_reinhard_matches_the_reference_lab_statistics(data_root, tiles):
    from torchstain.numpy.utils.rgb2lab import rgb2lab
    from torchstain.numpy.utils.split import lab_split

    def lab_stats(tile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        channels = lab_split(rgb2lab(tile.astype(np.float32) / 255))
        return np.array([c.mean() for c in channels]), np.array([c.std() for c in channels])

    target = fit_target(StainSettings("reinhard", str(data_root / REFERENCE)))
    mean, std = lab_stats(StainNormalizer(target)(tiles[1]))
    before_mean, before_std = lab_stats(tiles[1])
    assert np.abs(mean - target.lab_mean).max() < 1.5 < np.abs(before_mean - target.lab_mean).max()
    assert np.abs(std / target.lab_std - 1).max() < 0.1 < np.abs(before_std / target.lab_std - 1).max()


def test_reinhard_matches_torchstain_within_one_level_on_real_tiles(data_root):
    """lymphoma.reinhard (float32, tables; about 5x faster) against torchstain's NumpyReinhardNormalizer on 240
    tiles of 80 real images, both targets: at most one level apart, on under 1 pixel in 10,000."""
    from torchstain.numpy.normalizers import NumpyReinhardNormalizer

    paths = sorted((data_root / "lowres").glob("*/*.png"))[::4]
    tiles = [read_rgb(p)[y:y + 128, x:x + 128] for p in paths for y, x in ((0, 0), (100, 200), (180, 280))]
    for target in (fit_target(StainSettings("reinhard")), fit_target(StainSettings("reinhard", str(data_root / REFERENCE)))):
        reference = NumpyReinhardNormalizer()
        reference.target_means, reference.target_stds = np.asarray(target.lab_mean), np.asarray(target.lab_std)
        ours = np.stack([reinhard(t, target.lab_mean, target.lab_std) for t in tiles]).astype(int)
        theirs = np.stack([reference.normalize(t) for t in tiles]).astype(int)
        assert np.abs(ours - theirs).max() <= 1 and np.mean(ours != theirs) < 1e-4
    flat = np.full((16, 16, 3), (120, 60, 140), np.uint8)  # stained but uniform: nothing to scale
    assert reinhard(flat, DEFAULT_LAB[0], DEFAULT_LAB[1]) is None
    assert np.array_equal(StainNormalizer(fit_target(StainSettings("reinhard")))(flat), flat)


def _reinhard_in_float64(pixels: np.ndarray, mean, std, source=None) -> tuple[np.ndarray, tuple]:
    """torchstain's formulas written plainly in float64, one step after another through LAB: the output and the
    LAB statistics it moved from."""
    from lymphoma.reinhard import _RGB_TO_XYZ, _WHITE

    levels = np.arange(256) / 255
    linear = np.where(levels > 0.04045, ((levels + 0.055) / 1.055) ** 2.4, levels / 12.92)
    t = (_RGB_TO_XYZ / _WHITE[:, None]) @ linear[pixels.reshape(-1, 3)].T
    fx, fy, fz = np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16 / 116)
    lab = np.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)])
    mu, sd = source if source is not None else (lab.mean(1), lab.std(1))
    lab = (lab - np.asarray(mu)[:, None]) * (np.asarray(std)[:, None] / np.asarray(sd)[:, None]) + np.asarray(mean)[:, None]
    y = (lab[0] + 16) / 116
    t = np.stack([lab[1] / 500 + y, y, y - lab[2] / 200])
    linear = (np.linalg.inv(_RGB_TO_XYZ) * _WHITE[None, :]) @ np.where(t > 0.2068966, t ** 3, (t - 16 / 116) / 7.787)
    rgb = np.where(linear > 0.0031308, 1.055 * np.maximum(linear, 0) ** (1 / 2.4) - 0.055, 12.92 * linear)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8).T.reshape(pixels.shape), (mu, sd)


def test_reinhard_matches_its_formulas_in_float64(data_root):
    """lymphoma.reinhard (float32; the move from the pixel's f to its output's as one 3x3 matrix) against the
    formulas step by step in float64, on tiles (one block), whole images of several blocks, tiles moved by their
    image's statistics, an odd number of bytes, and pixels at the ends of the gamut (both branches of both
    piecewise functions): at most one level apart, on fewer than 1 value in 10,000; the statistics within 1e-5."""
    from lymphoma.reinhard import lab_statistics

    extremes = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [1, 2, 3], [9, 9, 9]],
                        np.uint8)[None].repeat(20, 0)
    differ = values = 0
    for path in sorted((data_root / "lowres").glob("*/*.png"))[::25]:
        image = read_rgb(path)
        statistics = lab_statistics(image)
        _, exact = _reinhard_in_float64(image, *DEFAULT_LAB)
        assert np.abs(statistics[0] - exact[0]).max() < 1e-4 and np.abs(statistics[1] / exact[1] - 1).max() < 1e-5
        cases = ((image[:128, :128], None), (image, None), (extremes, None), (image[64:192], exact),
                 (image[:5, :5], None))  # an odd number of bytes: decoded one byte at a time
        for pixels, source in cases:
            ours = reinhard(pixels, *DEFAULT_LAB, source).astype(int)
            theirs = _reinhard_in_float64(pixels, *DEFAULT_LAB, source)[0].astype(int)
            assert np.abs(ours - theirs).max() <= 1
            differ, values = differ + np.count_nonzero(ours != theirs), values + ours.size
    assert differ / values < 1e-4


def test_haematoxylin_only_drops_eosin_and_the_tiles_stain_intensity(tiles):
    """stain.normalize=haematoxylin: every pixel's optical density lies along the reference's H direction, and a
    tile whose haematoxylin is 0.7x as strong and eosin 1.6x (a different lab's staining, 29 levels off on
    average) comes out within half a level of the original's output."""
    target = fit_target(StainSettings("haematoxylin"))
    normalizer = StainNormalizer(target)
    out = normalizer(tiles[1])
    assert out.dtype == np.uint8 and out.shape == tiles[1].shape
    od = -np.log((out.reshape(-1, 3).astype(np.float64) + 1) / 256)
    h = np.asarray(target.he)[:, 0] / np.linalg.norm(np.asarray(target.he)[:, 0])
    stained = od.sum(1) > 0.3
    assert stained.mean() > 0.5 and (od[stained] @ h / np.linalg.norm(od[stained], axis=1)).min() > 0.999
    m, t = hed_jitter_affine(np.array([0.7, 1.6, 1.0]), np.zeros(3))
    restained = apply_od_affine(tiles[1], m[0], t[0])
    assert np.abs(restained.astype(int) - tiles[1]).mean() > 20
    assert np.abs(normalizer(restained).astype(int) - out).mean() < 0.5
    reinhard = StainNormalizer(fit_target(StainSettings("reinhard")))
    assert np.abs(reinhard(restained).astype(int) - reinhard(tiles[1])).mean() > 2  # which Reinhard does not undo


def test_grey_level_keeps_the_reinhard_tiles_luminance_and_no_colour(tiles):
    """stain.normalize=grey: three equal channels holding the Reinhard-normalised tile's luminance; a tile
    restained with 1.6x eosin keeps its structure (correlation) but loses every hue difference."""
    target = fit_target(StainSettings("grey"))
    reinhard = StainNormalizer(fit_target(StainSettings("reinhard")))(tiles[2]).astype(np.float64)
    out = StainNormalizer(target)(tiles[2])
    assert out.dtype == np.uint8 and out.shape == tiles[2].shape
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    assert np.abs(out[..., 0] - reinhard @ [0.299, 0.587, 0.114]).max() <= 0.5 + 1e-9
    m, t = hed_jitter_affine(np.array([1.0, 1.6, 1.0]), np.zeros(3))
    again = StainNormalizer(target)(apply_od_affine(tiles[2], m[0], t[0]))
    assert np.corrcoef(again[..., 0].ravel(), out[..., 0].ravel())[0, 1] > 0.95


def test_a_tile_without_tissue_is_left_alone(data_root):
    blank = np.full((128, 128, 3), 236, np.uint8)
    for method in ("macenko", "reinhard"):
        assert np.array_equal(StainNormalizer(fit_target(StainSettings(method)))(blank), blank)


def test_the_stained_share_is_the_share_of_pixels_dark_in_every_channel(data_root):
    from lymphoma.stain import _STAINED_MAX, _stained_share

    images = [read_rgb(path) for path in sorted((data_root / "lowres").glob("*/*.png"))[::40]]
    for image in [*images, images[0][:40, :50], np.full((8, 8, 3), 236, np.uint8)]:
        assert _stained_share(image) == float(np.mean((image <= _STAINED_MAX).all(axis=-1)))
    assert 0.05 < _stained_share(images[0]) < 1
    assert _stained_share(images[0][:0]) == 0.0  # no pixel: no tissue to normalise, rather than NaN


def test_bad_references_are_named(tmp_path, data_root):
    white = tmp_path / "white.png"
    Image.fromarray(np.full((200, 200, 3), 245, np.uint8)).save(white)
    with pytest.raises(InputError, match=r"white.png is blank .*choose an H&E image"):
        fit_target(StainSettings("macenko", str(white)))
    image = read_rgb(data_root / REFERENCE)
    gray = tmp_path / "gray.png"
    Image.fromarray(np.repeat(image.mean(2, keepdims=True).astype(np.uint8), 3, 2)).save(gray)
    with pytest.raises(InputError, match="gray.png does not look like an H&E stain"):
        fit_target(StainSettings("reinhard", str(gray)))
    hed = rgb2hed(image)  # the same tissue, stained with DAB only (an IHC image, not H&E)
    dab = np.zeros_like(hed)
    dab[..., 2] = hed[..., 0] + hed[..., 1]
    ihc = tmp_path / "dab.png"
    Image.fromarray((np.clip(hed2rgb(dab), 0, 1) * 255).astype(np.uint8)).save(ihc)
    with pytest.raises(InputError, match="dab.png does not look like an H&E stain"):
        fit_target(StainSettings("macenko", str(ihc)))
    with pytest.raises(InputError, match="stain.reference: .*missing.png"):
        fit_target(StainSettings("macenko", str(tmp_path / "missing.png")))
    with pytest.raises(ConfigError, match="stain.normalize is 'vahadane'; allowed: none, macenko, reinhard"):
        to_object(load_config(None, ["stain.normalize=vahadane"]))
    with pytest.raises(ConfigError, match="augment.hed_scale must be in"):
        to_object(load_config(None, ["augment.hed_scale=1.5"]))


def _hed_only(backend: str) -> AugmentSettings:
    return AugmentSettings(backend=backend, crop=128, hflip=0, vflip=0, rotate=0, rotate90=False, hue=0, grayscale_p=0,
                           hed_scale=0.2, hed_shift=0.05)


def test_dali_hed_jitter_is_the_optical_density_map(tiles):
    out = DaliAugmenter(_hed_only("dali"), True, CPU, seed=3).batch(torch.from_numpy(tiles), epoch=0)
    m, t = hed_jitter_affine(*draw_hed(np.random.default_rng([3, 0]), len(tiles), 0.2, 0.05))
    for i, tile in enumerate(tiles):
        expected = apply_od_affine(tile, m[i], t[i])
        diff = np.abs(out[i].permute(1, 2, 0).numpy() * 255 - expected)
        assert diff.max() < 1.001 and diff.mean() < 0.01  # DALI's float log/exp round a few .5s the other way
        assert np.abs(expected.astype(float) - tile).mean() > 2  # it did change the colours


def test_torch_hed_jitter_is_the_optical_density_map(tiles):
    augmenter = TorchAugmenter(_hed_only("torch"), True, CPU)
    torch.manual_seed(7)
    out = augmenter.sample(tiles[2])
    torch.manual_seed(7)
    alpha, beta = 1 + 0.2 * (2 * torch.rand(3).numpy() - 1), 0.05 * (2 * torch.rand(3).numpy() - 1)
    m, t = hed_jitter_affine(alpha, beta)
    expected = apply_od_affine(tiles[2], m[0], t[0])
    assert np.abs(out.permute(1, 2, 0).numpy() * 255 - expected).max() < 1e-3


def test_batch_hed_jitter_is_the_optical_density_map(tiles):
    from lymphoma.batch_augment import BatchAugmenter

    out = BatchAugmenter(_hed_only("batch"), True, CPU, seed=3).batch(torch.from_numpy(tiles), epoch=1)
    g = torch.Generator().manual_seed(3 * 100_003 + 1)  # the epoch's generator: alpha, then beta
    alpha = 0.8 + 0.4 * torch.rand((len(tiles), 3), generator=g)
    beta = -0.05 + 0.1 * torch.rand((len(tiles), 3), generator=g)
    m, t = hed_jitter_affine(alpha.numpy(), beta.numpy())
    for i, tile in enumerate(tiles):
        expected = apply_od_affine(tile, m[i], t[i])
        diff = np.abs(out[i].permute(1, 2, 0).numpy() * 255 - expected)
        assert diff.max() < 1.001 and diff.mean() < 0.01  # float32 log/exp on either side of a .5


def test_hed_identity_keeps_the_tile(tiles):
    m, t = hed_jitter_affine(np.ones(3), np.zeros(3))
    assert np.abs(apply_od_affine(tiles[0], m[0], t[0]).astype(int) - tiles[0]).max() <= 1


def test_both_backends_normalise_alike_in_eval_mode(data_root, tiles):
    normalizer = StainNormalizer(fit_target(StainSettings("macenko", str(data_root / REFERENCE))))
    outs = []
    for backend in ("dali", "torch"):
        aug = build_augmenter(AugmentSettings(backend=backend), False, CPU, normalizer=normalizer)
        batch = torch.stack([aug.sample(t) for t in tiles]) if aug.sample else torch.from_numpy(tiles)
        outs.append(aug.batch(batch))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    plain = build_augmenter(AugmentSettings(backend="torch"), False, CPU)
    assert not torch.allclose(outs[1], torch.stack([plain.sample(t) for t in tiles]), atol=0.05)


def test_prediction_normalises_with_the_checkpoint_target_without_the_reference(tiled, tmp_path, data_root, tiles):
    from jobs.train import run_train
    from lymphoma.augment import eval_batch
    from lymphoma.prediction import Predictor

    reference = tmp_path / "reference.png"
    shutil.copyfile(data_root / REFERENCE, reference)
    cfg = config_for(tiled, "stain", "train.epochs=1", "train.max_steps_per_epoch=2", "stain.normalize=macenko",
                     f"stain.reference={reference}", "augment.hed_scale=0.05", "augment.hed_shift=0.05")
    summary = run_train(cfg)[0]
    reference.unlink()  # prediction must not need it
    predictor = Predictor.from_checkpoint(Path(summary["checkpoints"]) / "best.pt", CPU, 32)
    assert predictor.normalizer is not None and predictor.normalizer.target.method == "macenko"
    assert predictor.normalizer.target.he == fit_target(StainSettings("macenko", str(data_root / REFERENCE))).he
    small = tiles[:, :64, :64].copy()
    got = predictor.logits(small)
    with torch.inference_mode():
        x = eval_batch(predictor.normalizer.batch(small), predictor.augment, CPU)
        expected = predictor.model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, atol=1e-5)
    with torch.inference_mode():
        unnormalised = predictor.model(eval_batch(small, predictor.augment, CPU).contiguous(
            memory_format=torch.channels_last))
    assert not torch.allclose(got, unnormalised, atol=1e-4)


def _lightness_of_each(tiles: np.ndarray) -> np.ndarray:
    from lymphoma.reinhard import to_lab

    return np.asarray([to_lab(t)[0].mean() for t in tiles])


def test_image_scope_moves_every_tile_by_its_images_statistics(data_root, wsi_dir):
    from lymphoma.reinhard import lab_statistics
    from lymphoma.settings import TileSettings
    from lymphoma.tile_sources import open_tiles
    from lymphoma.tiling import cut_tiles

    by_image = StainNormalizer(fit_target(StainSettings("reinhard", scope="image")))
    by_tile = StainNormalizer(fit_target(StainSettings("reinhard")))
    assert not by_image.per_tile and by_tile.per_tile
    path = data_root / "lowres/MCL/sj-04-3077-R2_001.png"
    settings = TileSettings(size=128, stride=64)
    got = np.concatenate(list(open_tiles(str(path), settings, stain=by_image).batches))
    image = read_rgb(path)
    assert np.array_equal(got, cut_tiles(by_image(image), settings).pixels)  # the image normalised whole, then cut
    # resized, the image is normalised at the scale it is cut at (with that scale's statistics), then cut
    half = np.asarray(Image.fromarray(image).resize((image.shape[1] // 2, image.shape[0] // 2), Image.Resampling.BOX))
    got_half = np.concatenate(list(open_tiles(str(path), replace(settings, resize=0.5, resample="box"),
                                              stain=by_image).batches))
    assert np.array_equal(got_half, cut_tiles(by_image(half), settings).pixels)
    # tile by tile, every tile's lightness is the target's; by image, tiles keep their differences in density
    assert np.ptp(_lightness_of_each(by_tile.batch(cut_tiles(image, settings).pixels))) < 0.2
    assert np.ptp(_lightness_of_each(got)) > 2
    # a slide: the statistics of its tissue in the thumbnail move every tile, so its tissue ends on the target
    slide = TileSettings(size=128, stride=128, target_mpp=1.0, min_tissue=0.5)
    path = wsi_dir / "CMU-1-Small-Region.svs"
    normalised = np.concatenate(list(open_tiles(str(path), slide, stain=by_image).batches))
    raw = np.concatenate(list(open_tiles(str(path), slide).batches))
    target = np.asarray(by_image.target.lab_mean)
    assert np.abs(lab_statistics(normalised)[0] - target).max() < 4 < np.abs(lab_statistics(raw)[0] - target).max()
    assert np.ptp(_lightness_of_each(normalised)) > 2


def test_image_scope_moves_a_batch_of_tiles_as_each_tile_alone(data_root):
    """A slide's batch of tiles is moved in one call (stain.apply): the same bytes as each tile moved alone."""
    image = read_rgb(data_root / "lowres/MCL/sj-04-3077-R2_001.png")  # another year's staining than the target's
    tiles = np.stack([image[y:y + 128, x:x + 128] for y, x in ((0, 0), (100, 200), (180, 280), (60, 120))])
    normalizer = StainNormalizer(fit_target(StainSettings("reinhard", scope="image")))
    statistics = normalizer.image_statistics(tiles)
    got = normalizer.apply(tiles, statistics)
    assert np.array_equal(got, np.stack([reinhard(t, *DEFAULT_LAB, statistics) for t in tiles]))
    assert got.shape == tiles.shape and np.abs(got.astype(int) - tiles).mean() > 5


def test_image_scope_needs_a_method_that_a_thumbnail_can_estimate():
    with pytest.raises(InputError, match="stain.scope=image works with stain.normalize none, reinhard, grey"):
        StainSettings("macenko", scope="image")
    with pytest.raises(InputError, match="stain.scope is 'slide'; allowed: tile, image"):
        StainSettings("reinhard", scope="slide")


def test_image_scope_tiles_train_and_predict_normalised_once_by_image(tiled, tmp_path, data_root):
    import tables

    from jobs.tile import run_tile
    from jobs.train import run_train
    from lymphoma.prediction import Predictor, SlideInput, predict_slides
    from lymphoma.sharding import load_manifest
    from lymphoma.tile_sources import open_tiles

    cfg = config_for(tiled, "image-scope", "train.epochs=1", "train.max_steps_per_epoch=2", "stain.scope=image")
    with pytest.raises(InputError, match="stored as read .* tile again with these settings"):
        run_train(cfg)  # its tiles are the shared ones, stored as read
    run_tile(cfg, progress=False)  # the stain target is part of every shard's fingerprint: all tiled again
    manifest = load_manifest(cfg.tiles)
    assert manifest["stain"]["scope"] == "image" and manifest["stain"]["method"] == "reinhard"
    shard = Path(cfg.tiles) / manifest["phases"]["train"]["shards"][0]["path"]
    with tables.open_file(shard) as h5:
        first = h5.root.images[0]
        stored = h5.root.imgs[:int(first["n_tiles"])]
        assert json.loads(h5.root._v_attrs.stain) == manifest["stain"]
    path = next(Path(tiled[0]).rglob(first["filename"].decode()))
    normalizer = StainNormalizer(fit_target(StainSettings("reinhard", scope="image")))
    settings = cfg.config.tiles
    assert np.array_equal(stored, np.concatenate(list(open_tiles(str(path), settings, stain=normalizer).batches)))

    checkpoint = Path(run_train(cfg)[0]["checkpoints"]) / "best.pt"
    predictor = Predictor.from_checkpoint(checkpoint, CPU, 32)
    assert predictor.normalizer.target.scope == "image"
    predict_slides(predictor, [SlideInput(str(path), "one")], tmp_path / "slides")
    logits = np.load(tmp_path / "slides" / "one.npz")["logits"]
    assert np.allclose(logits, predictor.logits(stored).numpy(), atol=1e-5)  # normalised by image, not again
    by_tile = StainNormalizer(fit_target(StainSettings("reinhard")))
    raw = np.concatenate(list(open_tiles(str(path), settings).batches))
    assert not np.allclose(logits, predictor.logits(by_tile.batch(raw)).numpy(), atol=1e-3)
    from lymphoma.validation import validate  # the tutorial's step 3 sees the tiles as training and prediction do

    validate(checkpoint, cfg.tiles, "train", tmp_path / "validate")
    with (tmp_path / "validate" / "tiles.csv").open() as handle:
        rows = [r for _, r in zip(range(len(stored)), csv.DictReader(handle))]  # the first shard's first image
    shown = np.array([[float(r[f"logit_{c}"]) for c in ("CLL", "FL", "MCL")] for r in rows])
    assert np.allclose(shown, logits, atol=1e-4)
