"""Levers on the reference baseline itself, in the folds of `lymphoma cv` over many fold assignments, each paired
with the baseline in the same folds (as `cv_embeddings.py` pairs frozen encoders):

- ``nuclei``: nuclear morphometry of the haematoxylin channel after Reinhard normalisation (the features a
  pathologist names: nuclear size, shape, density, spacing and chromatin; CLL small round nuclei, FL a mix of
  small cleaved and large, MCL medium irregular), alone and beside the colour/texture features;
- ``case-balanced``: the same logistic regression with classes balanced by case, not by image count;
- feature groups of the baseline: texture alone (LBP and GLCM), everything but the RGB percentiles, colour alone.

    .venv/bin/python bench/cv_baseline_levers.py -c configs/lymphoma-lowres.yaml [--repeats 30] [--out ...]

Nuclear features are cached in ``<run>/baseline/nuclei.npz`` (about 1 s an image on one core).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import numpy as np
from cv_embeddings import paired, scores
from scipy import ndimage as ndi

from common import emit, reference_cv_args
from jobs.baseline import cached_features, load_cohort
from jobs.run_folder import open_run
from lymphoma.baseline import Cohort, cohort_features
from lymphoma.crossval import grouped_folds

SIGMAS = (0.8, 1.0, 1.3, 1.6, 2.0, 2.5, 3.2, 4.0)  # nuclei are 3 to 5 px across at 0.3x
COLOUR, STAINS = slice(0, 15), slice(15, 25)  # the baseline's columns: RGB percentiles, H and E statistics


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """The haematoxylin optical density, stretched between its 1st and 99th percentiles to 0..1."""
    from skimage.color import rgb2hed

    h = rgb2hed(rgb)[..., 0]
    lo, hi = np.percentile(h, [1, 99])
    return np.clip((h - lo) / max(hi - lo, 1e-6), 0, 1)


def blob_features(h: np.ndarray) -> list[float]:
    """Scale-normalised Laplacian of Gaussian over ``SIGMAS``: the share of strong responses at each scale, the
    mean response per scale, and of its local maxima (nuclei) the density, spacing and scale."""
    from scipy.spatial import cKDTree
    from skimage.feature import peak_local_max

    stack = np.stack([-(s ** 2) * ndi.gaussian_laplace(h, s) for s in SIGMAS])
    best, scale = stack.max(0), stack.argmax(0)
    strong = best > np.percentile(best, 75)
    shares = np.bincount(scale[strong], minlength=len(SIGMAS)) / max(int(strong.sum()), 1)
    means = np.clip(stack, 0, None).mean(axis=(1, 2))
    peaks = peak_local_max(best, min_distance=2, threshold_abs=0.05)
    if len(peaks) < 8:
        return [*shares, *means, *[0.0] * 11]
    distances = cKDTree(peaks).query(peaks, k=7)[0]
    nearest, sixth = distances[:, 1], distances[:, -1]
    sizes = np.asarray(SIGMAS)[scale[peaks[:, 0], peaks[:, 1]]]
    return [*shares, *means, len(peaks) / h.size * 1e3, *np.percentile(nearest, [10, 50, 90]), sixth.mean(),
            nearest.std() / nearest.mean(), *np.percentile(sizes, [10, 50, 90]), sizes.std(),
            best[peaks[:, 0], peaks[:, 1]].mean()]


def _segment(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Otsu mask of nuclear haematoxylin and its nuclei split by a watershed of the distance transform."""
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    mask = h > threshold_otsu(h)
    distance = ndi.distance_transform_edt(mask)
    markers = np.zeros(mask.shape, np.int32)
    seeds = peak_local_max(distance, min_distance=2, threshold_abs=0.5)
    markers[tuple(seeds.T)] = np.arange(1, len(seeds) + 1)
    return mask, watershed(-distance, markers, mask=mask)


def nucleus_features(h: np.ndarray) -> list[float]:
    """Of the segmented nuclei (4 px or more): density, area percentiles and spread, eccentricity (from the
    second moments), compactness (4 pi area / boundary pixels squared), haematoxylin mean and texture, with the
    nuclear area fraction, the nucleus-background contrast and the share of the mask left by openings of radius
    1 and 2 (granulometry)."""
    from skimage.morphology import disk, opening

    mask, nuclei = _segment(h)
    ids = np.arange(1, nuclei.max() + 1)
    rows, cols = np.indices(h.shape).astype(np.float64)
    area = ndi.sum(np.ones_like(h), nuclei, ids)
    mean_r, mean_c = ndi.mean(rows, nuclei, ids), ndi.mean(cols, nuclei, ids)
    var_r = ndi.mean(rows ** 2, nuclei, ids) - mean_r ** 2
    var_c = ndi.mean(cols ** 2, nuclei, ids) - mean_c ** 2
    cov = ndi.mean(rows * cols, nuclei, ids) - mean_r * mean_c
    half_trace, det = (var_r + var_c) / 2, var_r * var_c - cov ** 2
    spread = np.sqrt(np.maximum(half_trace ** 2 - det, 0))
    eccentricity = np.sqrt(1 - np.maximum(half_trace - spread, 0) / np.maximum(half_trace + spread, 1e-9))
    boundary = ndi.sum((nuclei != ndi.grey_erosion(nuclei, size=3)) & (nuclei > 0), nuclei, ids)
    compact = 4 * np.pi * area / np.maximum(boundary, 1) ** 2
    inside, texture = ndi.mean(h, nuclei, ids), ndi.standard_deviation(h, nuclei, ids)
    keep = area >= 4
    area, eccentricity, compact, inside, texture = (v[keep] for v in (area, eccentricity, compact, inside, texture))
    granules = [opening(mask, disk(r)).mean() / max(mask.mean(), 1e-6) for r in (1, 2)]
    if len(area) < 8:
        return [mask.mean(), *[0.0] * 14, *granules]
    return [mask.mean(), len(area) / h.size * 1e3, *np.percentile(area, [10, 25, 50, 75, 90]),
            area.std() / area.mean(), eccentricity.mean(), np.percentile(eccentricity, 90), np.median(compact),
            inside.mean(), inside.std(), texture.mean(), h[mask].mean() - h[~mask].mean(), *granules]


def nuclear_image_features(rgb: np.ndarray) -> list[float]:
    """The 44 nuclear features of one stain-normalised image (``lymphoma.baseline.cohort_features`` normalises)."""
    h = haematoxylin(rgb)
    return blob_features(h) + nucleus_features(h)


def levers(cohort: Cohort, nuclei: np.ndarray) -> dict[str, tuple[Cohort, str]]:
    """Every row but the baseline: its cohort (features) and how its classes are balanced."""
    f = cohort.features
    return {"nuclei": (replace(cohort, features=nuclei), "images"),
            "nuclei beside colour/texture": (replace(cohort, features=np.hstack([f, nuclei])), "images"),
            "case-balanced": (cohort, "cases"),
            "texture alone": (replace(cohort, features=f[:, STAINS.stop:]), "images"),
            "without RGB percentiles": (replace(cohort, features=f[:, COLOUR.stop:]), "images"),
            "colour alone": (replace(cohort, features=f[:, :STAINS.stop]), "images")}


def main() -> None:
    args = reference_cv_args(__doc__)
    run = open_run(args.config)
    inputs, cv = run.inputs(), run.config.cv
    assignments = [grouped_folds(inputs.records, cv.folds, cv.seed + r) for r in range(args.repeats)]
    cohort = load_cohort(inputs.records, inputs.classes, run.dir / "baseline")
    nuclei = cached_features(run.dir / "baseline" / "nuclei.npz", cohort.paths, lambda: cohort_features(
        cohort.paths, workers=min(2, os.cpu_count() or 1), describe=nuclear_image_features))
    results: dict[str, Any] = {"baseline (colour/texture)": scores(cohort, assignments, cv.seed, 0)}
    for name, (variant, balance) in levers(cohort, nuclei).items():
        results[name] = scores(variant, assignments, cv.seed, 0, balance)
        results[name]["paired"] = paired(results[name], results["baseline (colour/texture)"])
    emit({"config": args.config, "images": len(inputs.records), "folds": cv.folds,
          "seeds": [cv.seed + r for r in range(args.repeats)], "nuclear_features": nuclei.shape[1],
          "methods": results}, args.out)


if __name__ == "__main__":
    main()
