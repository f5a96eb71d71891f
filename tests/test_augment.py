"""The augmentation backends (DALI on the CPU, torchvision v2, torch batch operations) do what their settings say,
alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lymphoma.augment import build_augmenter
from lymphoma.errors import InputError
from lymphoma.phase_tiles import PhaseTiles
from lymphoma.settings import AugmentSettings

BACKENDS = ["dali", "torch", "batch"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiles(data_root) -> np.ndarray:
    """16 real 96-px tiles."""
    from lymphoma.images import read_rgb
    from lymphoma.settings import TileSettings
    from lymphoma.tiling import cut_tiles

    image = read_rgb(data_root / "lowres" / "MCL" / sorted(p.name for p in (data_root / "lowres" / "MCL").iterdir())[0])
    return cut_tiles(image, TileSettings(size=96, stride=96)).pixels[:12]


def run(settings: AugmentSettings, backend: str, train: bool, tiles: np.ndarray, seed: int = 0) -> np.ndarray:
    settings.backend = backend
    torch.manual_seed(seed)  # the torch backend draws from the global generator: the same draws whatever ran before
    augmenter = build_augmenter(settings, train, CPU, seed=seed)
    batch = torch.stack([augmenter.sample(t) for t in tiles]) if augmenter.sample else torch.from_numpy(tiles)
    out = augmenter.batch(batch, 0)
    assert out.dtype == torch.float32 and out.shape == (len(tiles), 3, settings.crop, settings.crop)
    return out.numpy()


def still(**changes: object) -> AugmentSettings:
    """Every random step off except those in ``changes``."""
    off = dict(hflip=0.0, vflip=0.0, rotate=0.0, rotate90=False, hue=0.0, hed_scale=0.0, hed_shift=0.0, grayscale_p=0.0)
    return AugmentSettings(**{**off, **changes})


def as_uint8(x: np.ndarray) -> np.ndarray:
    return np.rint(x * 255).astype(np.uint8).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("train", [True, False])
def test_backends_agree_on_shape_dtype_and_range(tiles, train):
    means = []
    for backend in BACKENDS:
        outs = [run(AugmentSettings(crop=80, saturation=0.2, brightness=0.2, contrast=0.2), backend, train, tiles, seed)
                for seed in range(4)]  # one draw of 12 tiles moves the mean by about 0.04
        for out in outs:
            assert 0.0 <= out.min() and out.max() <= 1.0 and out.max() > 0.5
        means.append(np.mean([out.mean() for out in outs]))
    assert max(means) - min(means) < 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_is_the_centre_crop_scaled_and_normalised(tiles, backend):
    settings = AugmentSettings(crop=64, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    out = run(settings, backend, False, tiles)
    expected = (tiles[:, 16:80, 16:80].astype(np.float32) / 255 - np.array(settings.mean)) / np.array(settings.std)
    np.testing.assert_allclose(out.transpose(0, 2, 3, 1), expected, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flips_are_exact(tiles, backend):
    np.testing.assert_array_equal(as_uint8(run(still(crop=96, hflip=1.0), backend, True, tiles)), tiles[:, :, ::-1])
    np.testing.assert_array_equal(as_uint8(run(still(crop=96, vflip=1.0), backend, True, tiles)), tiles[:, ::-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_right_angle_rotations_are_exact_and_all_occur(tiles, backend):
    settings = still(crop=96, rotate90=True)
    seen = set()
    for seed in range(3):
        out = as_uint8(run(settings, backend, True, tiles, seed=seed))
        for got, tile in zip(out, tiles):
            k = [k for k in range(4) if np.array_equal(got, np.rot90(tile, k))]
            assert len(k) == 1
            seen.add(k[0])
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_crop_is_a_window_of_the_tile_and_moves(tiles, backend):
    settings = still(crop=64)
    out = as_uint8(run(settings, backend, True, tiles))
    offsets = set()
    for got, tile in zip(out, tiles):
        hits = [(y, x) for y in range(33) for x in range(33) if np.array_equal(got, tile[y:y + 64, x:x + 64])]
        assert hits, "the crop must be a 64-px window of the tile"
        offsets.add(hits[0])
    assert len(offsets) > 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_arbitrary_rotation_fills_corners_and_keeps_the_centre(tiles, backend):
    settings = still(crop=96, rotate=180.0)
    out = as_uint8(run(settings, backend, True, tiles))
    black_corners = [(o[:3, :3] == 0).all() for o in out]
    assert sum(black_corners) >= len(out) // 2  # most angles leave the corners outside the source
    centre = np.abs(out[:, 47:49, 47:49].astype(int) - tiles[:, 47:49, 47:49].astype(int)).mean()
    assert centre < 40  # rotation is about the centre


@pytest.mark.parametrize("backend", BACKENDS)
def test_grayscale_probability_one_gives_equal_channels(tiles, backend):
    settings = still(crop=96, grayscale_p=1.0)
    out = run(settings, backend, True, tiles)
    assert np.abs(out[:, 0] - out[:, 1]).max() < 0.02 and np.abs(out[:, 1] - out[:, 2]).max() < 0.02


def test_settings_name_allowed_values():
    with pytest.raises(InputError, match="allowed: auto, dali, torch, batch"):
        AugmentSettings(backend="kornia")
    with pytest.raises(InputError, match="augment.hue must be in"):
        AugmentSettings(hue=0.9)


def test_more_processes_than_samples_is_an_error(tmp_path, make_dataset):
    from lymphoma.inputs import discover
    from lymphoma.loaders import make_loader
    from lymphoma.settings import TileSettings
    from lymphoma.sharding import ShardPlan, fingerprint
    from lymphoma.store import write_shard

    records = discover(make_dataset(1, 1)).records[:1]
    settings = TileSettings(size=312, stride=312)
    write_shard(tmp_path / "s.h5", "train", records, ["CLL", "FL", "MCL"], settings, "none",
                fingerprint(ShardPlan("train", 0, tuple(records)), ["CLL", "FL", "MCL"], settings, "none"))
    with pytest.raises(InputError, match="1 tiles for 4 processes: more processes than samples"):
        make_loader(PhaseTiles([tmp_path / "s.h5"]), None, 8, 0, 4, True, 0, 0)
