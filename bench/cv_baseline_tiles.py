"""The reference baseline at the CNN's scale: the same colour/texture features and logistic regression, fitted on
the 128-px tiles of each image (after Reinhard with the whole image's statistics, as the default config tiles)
and read as the CNN is, by the tiles' majority vote and by their mean probability, in the folds of `lymphoma cv`
over many fold assignments, paired with the baseline on whole images in the same folds.

It asks where the CNN's failure on MCL comes from: the whole-image baseline calls 0.43 of MCL images over 30
assignments, every CNN from scratch 0.02 to 0.27. If the linear model keeps its MCL when it too must decide tile
by tile, a tile holds what MCL needs and the CNN does not learn it from these patients; if it loses it, what
separates MCL here is a statistic of the whole image, and a model that decides per tile cannot see it.

    .venv/bin/python bench/cv_baseline_tiles.py -c configs/lymphoma-lowres.yaml [--repeats 30] [--tile 128] [--out ...]

Tile features are cached in ``<run>/baseline/tiles-<size>.npz``; the grid is cut from the top left without
overlap (417x312 images: 3x2 tiles of 128 px).
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import numpy as np
from cv_embeddings import paired, scores

from common import assignment_scores, emit, reference_cv_parser
from jobs.baseline import cached_features, load_cohort
from jobs.run_folder import open_run
from lymphoma.baseline import Cohort, cohort_features, fold_records, image_features, pooled_accuracy
from lymphoma.crossval import grouped_folds
from lymphoma.voting import vote


def tile_features(rgb: np.ndarray, size: int) -> np.ndarray:
    """The baseline's features of every ``size``-px tile of a grid cut from the top left, concatenated."""
    rows, cols = rgb.shape[0] // size, rgb.shape[1] // size
    return np.concatenate([image_features(rgb[r * size:(r + 1) * size, c * size:(c + 1) * size])
                           for r in range(rows) for c in range(cols)])


def tile_cohort(cohort: Cohort, flat: np.ndarray) -> tuple[Cohort, int]:
    """The cohort of tiles (each with its image's class and case) and the tiles per image."""
    width = cohort.features.shape[1]
    per_image = flat.shape[1] // width
    return Cohort([f"{k}#{t}" for k in cohort.keys for t in range(per_image)], np.repeat(cohort.paths, per_image).tolist(),
                  flat.reshape(-1, width), np.repeat(cohort.labels, per_image), np.repeat(cohort.cases, per_image),
                  cohort.classes), per_image


def image_record(tiles: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """One image's record from its tiles' records, aggregated as `lymphoma predict` aggregates a CNN's tiles
    (``lymphoma.voting.vote``: their majority, ties to the larger mean probability, and their mean's class)."""
    probs = np.asarray([[t["mean_probs"][c] for c in classes] for t in tiles])
    first = tiles[0]
    return {"key": first["key"].split("#")[0], "path": first["path"], "label": first["label"], "case": first["case"],
            "status": "ok", **vote(probs).as_dict(classes)}


def tile_scores(tiles: Cohort, per_image: int, assignments: list[list[list[str]]], seed: int) -> dict[str, Any]:
    """Image and case accuracy per assignment by the tiles' vote and by their mean probability."""
    per: dict[str, list[tuple[float, float]]] = {"vote": [], "mean": []}
    flat: dict[str, list[dict[str, Any]]] = {"vote": [], "mean": []}
    for r, folds in enumerate(assignments):
        by_fold = []
        for test_cases in folds:
            records = fold_records(tiles, tiles.labels, test_cases, seed + r)
            by_fold.append([image_record(records[i:i + per_image], tiles.classes)
                            for i in range(0, len(records), per_image)])
        for aggregate in per:
            images = [rec if aggregate == "vote" else {**rec, "majority_class": rec["mean_prob_class"]}
                      for fold in by_fold for rec in fold]
            per[aggregate].append(pooled_accuracy([images], tiles.classes))
            flat[aggregate] += images
    return {aggregate: assignment_scores(per[aggregate], flat[aggregate], tiles.classes) for aggregate in per}


def main() -> None:
    parser = reference_cv_parser(__doc__)
    parser.add_argument("--tile", type=int, default=128)
    args = parser.parse_args()
    run = open_run(args.config)
    inputs, cv = run.inputs(), run.config.cv
    assignments = [grouped_folds(inputs.records, cv.folds, cv.seed + r) for r in range(args.repeats)]
    cohort = load_cohort(inputs.records, inputs.classes, run.dir / "baseline")
    flat = cached_features(run.dir / "baseline" / f"tiles-{args.tile}.npz", cohort.paths, lambda: cohort_features(
        cohort.paths, workers=min(2, os.cpu_count() or 1), describe=partial(tile_features, size=args.tile)))
    tiles, per_image = tile_cohort(cohort, flat)
    whole = scores(cohort, assignments, cv.seed, 0)
    by_tile = tile_scores(tiles, per_image, assignments, cv.seed)
    methods: dict[str, Any] = {"whole image": whole}
    for aggregate, result in by_tile.items():
        methods[f"{args.tile}-px tiles, {aggregate}"] = {**result, "paired": paired(result, whole)}
    emit({"config": args.config, "images": len(inputs.records), "tiles_per_image": per_image, "folds": cv.folds,
          "seeds": [cv.seed + r for r in range(args.repeats)], "methods": methods}, args.out)


if __name__ == "__main__":
    main()
