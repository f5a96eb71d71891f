"""Linear probes on frozen encoders in the folds of `lymphoma cv`: each image's mean tile embedding (a `lymphoma
features` folder) classified by the reference baseline's logistic regression (C chosen by an inner case-grouped
CV of the training cases), beside the baseline's colour/texture features, over the same fold assignments as
`lymphoma cv cv.repeats=R` (seeds cv.seed + r), with a case-label permutation null on the first assignment.
An encoder that no case of the cohort trained (ImageNet weights) leaks nothing across folds, so one features
folder serves every fold. ``--cases REGEX``: only the cases whose id matches (e.g. ``^sj-05``: one year's
staining run, which holds all three classes), their folds dealt as `lymphoma cv` deals them. Each encoder is also
compared with the baseline assignment by assignment (``paired``: its accuracy less the baseline's in the same
folds, their mean +- sd and how many assignments lie above), the comparison that the dealing of cases does not blur;
``--repeats 30`` gives the spread of typical folds in under ten minutes.

    .venv/bin/python bench/cv_embeddings.py -c configs/lymphoma-lowres.yaml lite0=FEATURES_DIR \\
        [two-scales=DIR_A+DIR_B] [lite0-texture=FEATURES_DIR+baseline] [--repeats 3] [--permutations 50] \\
        [--cases REGEX] [--out bench/results/cv-embeddings.json]
"""

from __future__ import annotations

import argparse
import csv
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from common import assignment_scores, emit
from jobs.baseline import load_cohort
from jobs.run_folder import open_run
from lymphoma.baseline import Cohort, cv_records, permutation_null, pooled_accuracy
from lymphoma.crossval import grouped_folds
from lymphoma.features import read_features


def mean_embeddings(folder: Path, paths: list[str]) -> np.ndarray:
    """Every image's mean tile embedding, in the order of ``paths`` (an image without one is an error)."""
    files = {}
    with open(folder / "features.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["status"] == "ok":
                files[row["path"]] = row["file"]
    missing = [p for p in paths if p not in files]
    if missing:
        raise SystemExit(f"{folder}: no features for {len(missing)} image(s) (first: {missing[0]}); rerun "
                         "lymphoma features into it")
    return np.stack([read_features(files[p])[0].mean(0) for p in paths])


def joined_features(spec: str, cohort: Cohort) -> np.ndarray:
    """The features that ``spec`` names, side by side: features folders joined by ``+`` (each image's mean
    embedding), ``baseline`` for the reference's colour/texture features (e.g. two tile sizes, or an encoder
    beside colour and texture, each a single linear model's input)."""
    parts = [cohort.features if part == "baseline" else mean_embeddings(Path(part), cohort.paths)
             for part in spec.split("+")]
    return np.hstack(parts)


def scores(cohort: Cohort, assignments: list[list[list[str]]], seed: int, permutations: int,
           balance: str = "images") -> dict[str, Any]:
    """Pooled image and case accuracy per assignment, their mean +- sd, class recall, and the null (``balance``:
    the logistic regression's classes weighted by ``images`` or ``cases``)."""
    per, flat = [], []
    for r, folds in enumerate(assignments):
        by_fold = cv_records(cohort, folds, seed + r, balance=balance)
        per.append(pooled_accuracy(by_fold, cohort.classes))
        flat += [rec for fold in by_fold for rec in fold]
        if r == 0:
            null = permutation_null(cohort, folds, seed, permutations, per[0], balance)
    return {**assignment_scores(per, flat, cohort.classes), "null": null}


def paired(method: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """A method's accuracy less the baseline's, assignment by assignment: per level the differences, their mean
    +- sd and how many are above, level with and below zero."""
    out: dict[str, Any] = {}
    for level in ("image", "case"):
        diff = np.asarray(method[level]) - np.asarray(baseline[level])
        out[level] = {"differences": diff.round(3).tolist(), "mean": round(float(diff.mean()), 3),
                      "sd": round(float(diff.std()), 3), "above": int(np.sum(diff > 1e-9)),
                      "level": int(np.sum(np.abs(diff) <= 1e-9)), "below": int(np.sum(diff < -1e-9))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("encoders", nargs="+", help="name=features folder (folders and `baseline` joined by +)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--permutations", type=int, default=50)
    parser.add_argument("--cases", help="a regex: only the cases whose id it matches")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    run = open_run(args.config)
    inputs, cv = run.inputs(), run.config.cv
    records = [r for r in inputs.records if args.cases is None or re.search(args.cases, r.case)]
    assignments = [grouped_folds(records, cv.folds, cv.seed + r) for r in range(args.repeats)]
    cohort = load_cohort(records, inputs.classes, run.dir / ("baseline" if args.cases is None else "baseline-subset"))
    folders = dict(spec.split("=", 1) for spec in args.encoders)
    methods = {"baseline (colour/texture)": cohort}
    for name, spec in folders.items():
        methods[name] = replace(cohort, features=joined_features(spec, cohort))
    results = {name: scores(c, assignments, cv.seed, args.permutations) for name, c in methods.items()}
    reference = results["baseline (colour/texture)"]
    for name in folders:
        results[name]["paired"] = paired(results[name], reference)
    emit({"config": args.config, "features": folders, "cases": args.cases,
          "images": len(records), "folds": cv.folds,
          "seeds": [cv.seed + r for r in range(args.repeats)],
          "assignments": assignments, "methods": results}, args.out)


if __name__ == "__main__":
    main()
