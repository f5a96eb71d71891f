"""The cost of stain handling per tile, on real 128-px tiles: Macenko (torchstain) and Reinhard (lymphoma.reinhard,
against torchstain's NumpyReinhardNormalizer in the same run, also on whole images) normalisation, the same per-tile step for both
backends, prediction and features, and HED jitter in each augmentation backend, as ratios against the same
backend's augmentation without it, measured in one run.

    .venv/bin/python bench/bench_stain.py [--tiles 256] [--images 32] [--out bench/results/stain.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from common import emit
from jobs.config import default_data_root
from lymphoma.augment import build_augmenter
from lymphoma.images import read_rgb
from lymphoma.settings import AugmentSettings, StainSettings
from lymphoma.stain import DEFAULT_LAB, StainNormalizer, fit_target


def real_tiles(n: int) -> np.ndarray:
    """``n`` 128-px tiles cut at stride 64 from the real low-resolution images, in file order."""
    out = []
    for path in sorted(Path(default_data_root(), "lowres").glob("*/*.png")):
        image = read_rgb(path)
        out += [image[y:y + 128, x:x + 128] for y in range(0, image.shape[0] - 127, 64)
                for x in range(0, image.shape[1] - 127, 64)]
        if len(out) >= n:
            return np.stack(out[:n])
    return np.stack(out)


def per_tile_ms(fn, tiles: np.ndarray, repeats: int = 3) -> float:
    """Best of ``repeats`` passes over the tiles, in milliseconds per tile."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(tiles)
        best = min(best, time.perf_counter() - start)
    return best / len(tiles) * 1000


def torchstain_reinhard():
    """torchstain's Reinhard normaliser, what lymphoma.reinhard replaces, with the same target."""
    from torchstain.numpy.normalizers import NumpyReinhardNormalizer

    normalizer = NumpyReinhardNormalizer()
    normalizer.target_means, normalizer.target_stds = np.asarray(DEFAULT_LAB[0]), np.asarray(DEFAULT_LAB[1])
    return lambda tiles: [normalizer.normalize(t) for t in tiles]


def whole_images(n: int) -> dict[str, float]:
    """Reinhard by image (stain.scope image, what the default models' tiling and prediction run): each whole
    417x312 image normalised with its own statistics, against torchstain's normaliser on the same images."""
    images = np.stack([read_rgb(p) for p in sorted(Path(default_data_root(), "lowres").glob("*/*.png"))[:n]])
    ours = StainNormalizer(fit_target(StainSettings("reinhard", scope="image")))
    ms, theirs = per_tile_ms(ours.batch, images), per_tile_ms(torchstain_reinhard(), images)
    return {"images": len(images), "reinhard_by_image_ms_per_image": round(ms, 2),
            "reinhard_by_image_torchstain_ms_per_image": round(theirs, 2),
            "reinhard_by_image_speedup_over_torchstain": round(theirs / ms, 2)}


def augment_ms(backend: str, hed: bool, tiles: np.ndarray, batch: int = 64) -> float:
    settings = AugmentSettings(backend=backend, hed_scale=0.05 if hed else 0.0, hed_shift=0.05 if hed else 0.0)
    augmenter = build_augmenter(settings, True, torch.device("cpu"), seed=0)

    def run(all_tiles: np.ndarray) -> None:
        for start in range(0, len(all_tiles), batch):
            part = all_tiles[start:start + batch]
            x = torch.stack([augmenter.sample(t) for t in part]) if augmenter.sample else torch.from_numpy(part)
            augmenter.batch(x, 0)

    run(tiles[:batch])  # build the DALI pipeline outside the timing
    return per_tile_ms(run, tiles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=256)
    parser.add_argument("--images", type=int, default=32, help="whole images for Reinhard by image")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one loader worker's view: the cost each tile adds to a worker
    tiles = real_tiles(args.tiles)
    results: dict[str, object] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                                  "tiles": len(tiles), "tile_px": 128, "threads": 1}
    for method in ("macenko", "reinhard"):
        normalizer = StainNormalizer(fit_target(StainSettings(method)))
        results[f"normalize_{method}_ms_per_tile"] = round(per_tile_ms(normalizer.batch, tiles), 3)
    results["normalize_reinhard_torchstain_ms_per_tile"] = round(per_tile_ms(torchstain_reinhard(), tiles), 3)
    results["reinhard_speedup_over_torchstain"] = round(results["normalize_reinhard_torchstain_ms_per_tile"]
                                                        / results["normalize_reinhard_ms_per_tile"], 2)
    results.update(whole_images(args.images))
    for backend in ("torch", "dali"):
        base, hed = augment_ms(backend, False, tiles), augment_ms(backend, True, tiles)
        results[f"augment_{backend}_ms_per_tile"] = round(base, 3)
        results[f"augment_{backend}_with_hed_ms_per_tile"] = round(hed, 3)
        results[f"hed_{backend}_cost_ratio"] = round(hed / base, 3)
    for method in ("macenko", "reinhard"):
        for backend in ("torch", "dali"):
            results[f"{method}_vs_{backend}_augmentation"] = round(
                results[f"normalize_{method}_ms_per_tile"] / results[f"augment_{backend}_ms_per_tile"], 2)
    emit(results, args.out)


if __name__ == "__main__":
    main()
