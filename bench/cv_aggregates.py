"""Aggregation, a lever of the science issue: from the tiles' probabilities to an image's class, measured on the
trained folds of a `lymphoma cv` run (every image predicted by the fold that never saw its patient, the tiles'
probabilities read back from the folds' ``predict/slides/<key>.npz``), so that every rule judges exactly the same models.
Rules: the majority vote (the default), the mean probability, trimmed means (the top and bottom ``t`` of each
class's tile probabilities left out) and the median. Cases: the majority of their images' classes for the vote
(ties to the larger summed mean probability, as the CV report does), else the class of their images' averaged
aggregated probabilities. Per fold assignment: pooled image and case accuracy; then mean +- sd over them.
Beside them, late fusion with the reference baseline: each image's mean tile probability and the baseline's
logistic-regression probability averaged with equal weights, the baseline refitted in exactly the run's folds
and seeds (its features read from ``<run>/baseline/features.npz``; C chosen inside each fold's training cases, as
`lymphoma cv` does). Nothing is chosen here: every rule is reported.

    .venv/bin/python bench/cv_aggregates.py runs/lymphoma-lowres [--out bench/results/cv-aggregates.json]
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy.stats import trim_mean

from common import emit
from lymphoma.levels import case_class
from lymphoma.voting import vote

RULES: dict[str, Callable[[dict[str, Any]], np.ndarray]] = {
    "mean": lambda image: image["probs"].mean(0),
    "trimmed-0.1": lambda image: trim_mean(image["probs"], 0.1, axis=0),
    "trimmed-0.25": lambda image: trim_mean(image["probs"], 0.25, axis=0),
    "median": lambda image: np.median(image["probs"], axis=0),
    "mean + baseline": lambda image: (image["probs"].mean(0) + image["baseline"]) / 2,
    "baseline alone": lambda image: image["baseline"],
}


def baseline_probs(run: Path, images: dict[int, list[dict[str, Any]]], seed0: int) -> None:
    """Add each image's baseline probability (``baseline``) for its assignment, refitted in the run's folds."""
    from lymphoma.baseline import Cohort, cv_records

    with np.load(run / "baseline" / "features.npz") as saved:
        paths, features = saved["paths"].tolist(), saved["features"]
    rows = list(csv.DictReader((run / "folds.csv").open()))
    truth = {r["path"]: (r["case"], r["label"]) for r in rows}
    classes = images[min(images)][0]["classes"]
    cohort = Cohort([Path(p).stem for p in paths], paths, features,
                    np.asarray([classes.index(truth[p][1]) for p in paths]), np.asarray([truth[p][0] for p in paths]),
                    classes)
    for repeat, items in images.items():
        tests: dict[str, list[str]] = defaultdict(list)
        for r in rows:
            if int(r["repeat"]) == repeat and r["phase"] == "test" and r["case"] not in tests[r["fold"]]:
                tests[r["fold"]].append(r["case"])
        folds = [tests[k] for k in sorted(tests, key=int)]
        by_path = {rec["path"]: rec for fold in cv_records(cohort, folds, seed0 + repeat) for rec in fold}
        for image in items:
            image["baseline"] = np.asarray([by_path[image["path"]]["mean_probs"][c] for c in classes])


def fold_images(run: Path, repeat: int) -> list[dict[str, Any]]:
    """Every test image of one fold assignment: label, case and its tiles' probabilities ``[n, classes]``."""
    images = []
    for record_path in sorted(run.glob(f"repeat-{repeat}/fold-*/predict/slides/*.json")):
        record = json.loads(record_path.read_text())
        if record.get("status") != "ok" or not record.get("label"):
            continue
        with np.load(record_path.with_suffix(".npz")) as npz:
            images.append({"label": record["label"], "case": record["case"], "path": record["path"],
                           "probs": npz["probs"],
                           "classes": [str(c) for c in npz["classes"]]})
    return images


def scores(images: list[dict[str, Any]], rule: str) -> tuple[float, float]:
    """Pooled image and case accuracy of one rule over one assignment's images; the vote's cases as the CV report
    counts them (``lymphoma.levels.case_class``)."""
    classes = images[0]["classes"]
    by_case: dict[str, list[dict[str, Any]]] = defaultdict(list)
    right = 0
    for image in images:
        result = vote(image["probs"])
        aggregated = RULES[rule](image) if rule != "vote" else np.asarray(result.mean_probs)
        predicted = classes[result.majority if rule == "vote" else int(aggregated.argmax())]
        right += predicted == image["label"]
        by_case[image["case"]].append({"label": image["label"], "majority_class": predicted,
                                       "mean_probs": dict(zip(classes, result.mean_probs)), "aggregated": aggregated})
    cases_right = 0
    for items in by_case.values():
        if rule == "vote":
            predicted = case_class(items, classes, "vote")
        else:
            predicted = classes[int(np.mean([i["aggregated"] for i in items], axis=0).argmax())]
        cases_right += predicted == items[0]["label"]
    return right / len(images), cases_right / len(by_case)


def summary(values: np.ndarray) -> dict[str, Any]:
    sd = round(float(values.std()), 3) if len(values) > 1 else None  # as the CV report: over the assignments run
    return {"per_assignment": values.round(3).tolist(), "mean": round(float(values.mean()), 3), "sd": sd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a `lymphoma cv` run folder")
    parser.add_argument("--seed", type=int, default=0, help="the run's cv.seed")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    repeats = sorted(int(p.name.split("-")[1]) for p in args.run.glob("repeat-*"))
    assignments = {r: fold_images(args.run, r) for r in repeats}
    fused = (args.run / "baseline" / "features.npz").is_file()  # written by the run's baseline, after its folds
    if fused:
        baseline_probs(args.run, assignments, args.seed)
    results: dict[str, Any] = {"run": str(args.run), "images_per_assignment": {r: len(v) for r, v in assignments.items()}}
    for rule in ("vote", *(r for r in RULES if fused or "baseline" not in r)):
        per = np.array([scores(assignments[r], rule) for r in repeats])
        results[rule] = {f"{level}_{key}": value for i, level in enumerate(("image", "case"))
                         for key, value in summary(per[:, i]).items()}
    emit(results, args.out)


if __name__ == "__main__":
    main()
