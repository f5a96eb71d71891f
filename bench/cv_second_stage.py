"""Second stages in the folds of a finished `lymphoma cv` run, against its tile vote: each fold's test images
classified by (a) the tile vote, as the run did; (b) the mean tile probability; (c) the reference logistic
regression on colour/texture features; (d) the CNN's mean probability and (c) averaged, half each (fixed, not
tuned); (e) a logistic regression on each image's mean embedding from the fold's own tile model (`lymphoma
features` into ``repeat-<r>/fold-<k>/features``), fitted on the fold's training cases, C chosen among them as the
baseline does; (f) the same on the embedding and the colour/texture features together. No test case takes part
in any fit or choice. Pooled image and case accuracy per fold assignment, mean +- sd over them, class recall.

    for r in 0 1 2; do for k in 0 1 2 3; do lymphoma features -c configs/lymphoma-lowres.yaml \\
        --checkpoint RUN/repeat-$r/fold-$k/train/checkpoints/best.pt --out RUN/repeat-$r/fold-$k/features; done; done
    .venv/bin/python bench/cv_second_stage.py RUN [--out bench/results/cv-second-stage.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from common import assignment_scores, emit
from jobs.baseline import load_cohort
from lymphoma.baseline import cv_records, pooled_accuracy
from lymphoma.cohort_report import probability_record
from lymphoma.features import read_features
from lymphoma.inputs import ImageRecord

METHODS = ("tile vote", "mean tile probability", "baseline", "CNN + baseline", "embedding LR", "embedding + features LR")


def as_record(source: dict[str, Any], probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """A prediction record (image class and one vote) from class probabilities."""
    return probability_record(probs, classes, key=source["key"], label=source["label"], case=source["case"])


def probabilities(record: dict[str, Any], classes: list[str]) -> np.ndarray:
    """A record's mean class probabilities, in the order of ``classes``."""
    return np.array([record["mean_probs"][c] for c in classes])


def fold_tests(fold: Path) -> list[dict[str, Any]]:
    """The fold's own prediction records of its test images."""
    return [json.loads(p.read_text()) for p in sorted((fold / "predict" / "slides").glob("*.json"))]


def embeddings(fold: Path, keys: list[str]) -> np.ndarray:
    """Every image's mean tile embedding by the fold's own model, in the order of ``keys``."""
    return np.stack([read_features(fold / "features" / "h5_files" / f"{key}.h5")[0].mean(0) for key in keys])


def assignment(run: Path, repeat: int, classes: list[str]) -> dict[str, list[list[dict[str, Any]]]]:
    """Every method's records, by fold, in one fold assignment."""
    folds = sorted((run / f"repeat-{repeat}").glob("fold-*"), key=lambda p: int(p.name.split("-")[1]))
    tests = [fold_tests(fold) for fold in folds]
    everyone = sorted((r for fold in tests for r in fold), key=lambda r: r["key"])
    cohort = load_cohort([ImageRecord(r["path"], r["label"], r["case"]) for r in everyone], classes, run / "baseline")
    keys = [r["key"] for r in everyone]
    out: dict[str, list[list[dict[str, Any]]]] = {m: [] for m in METHODS}
    for fold, records in zip(folds, tests):
        test_cases = sorted({r["case"] for r in records})
        x = embeddings(fold, keys)
        fitted = {name: {r["key"]: probabilities(r, classes) for r in cv_records(replace(cohort, features=features),
                                                                                  [test_cases], repeat)[0]}
                  for name, features in (("baseline", cohort.features), ("embedding LR", x),
                                         ("embedding + features LR", np.hstack([x, cohort.features])))}
        baseline, cnn = fitted.pop("baseline"), {r["key"]: probabilities(r, classes) for r in records}
        out["tile vote"].append(records)
        out["mean tile probability"].append([as_record(r, cnn[r["key"]], classes) for r in records])
        out["baseline"].append([as_record(r, baseline[r["key"]], classes) for r in records])
        out["CNN + baseline"].append([as_record(r, (cnn[r["key"]] + baseline[r["key"]]) / 2, classes) for r in records])
        for name, probs in fitted.items():
            out[name].append([as_record(r, probs[r["key"]], classes) for r in records])
    return out


def summary(per_repeat: list[dict[str, list[list[dict[str, Any]]]]], classes: list[str]) -> dict[str, Any]:
    """Per method: image and case accuracy per assignment, their mean +- sd, and each class's image recall."""
    rows = {}
    for method in METHODS:
        per = [pooled_accuracy(by_fold[method], classes) for by_fold in per_repeat]
        flat = [r for by_fold in per_repeat for fold in by_fold[method] for r in fold]
        rows[method] = assignment_scores(per, flat, classes)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a `lymphoma cv` run folder whose folds hold features/")
    parser.add_argument("--classes", nargs="+", default=["CLL", "FL", "MCL"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    repeats = sorted(int(p.name.split("-")[1]) for p in args.run.glob("repeat-*")
                     if all((f / "features" / "features.csv").is_file() and (f / "predict" / "summary.csv").is_file()
                            for f in p.glob("fold-*")))
    per_repeat = [assignment(args.run, r, args.classes) for r in repeats]
    emit({"run": str(args.run), "repeats": repeats, "methods": summary(per_repeat, args.classes)}, args.out)


if __name__ == "__main__":
    main()
