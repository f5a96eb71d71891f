"""The reference baseline of `lymphoma cv`, run in the parent after the folds: image features (cached in
``<run>/baseline/features.npz``), the logistic regression in every repeat's folds, its permutation null, and
its spread over many more fold assignments."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jobs.config import Config
from lymphoma.baseline import Cohort, cohort_features, cv_records, permutation_null, pooled_accuracy
from lymphoma.crossval import across_repeats, cv_report, grouped_folds
from lymphoma.files import write_csv_atomic, write_text_atomic
from lymphoma.inputs import ImageRecord
from lymphoma.levels import LEVELS

log = logging.getLogger(__name__)


def cached_features(cache: Path, paths: list[str], compute: Callable[[], np.ndarray]) -> np.ndarray:
    """The features in ``cache`` when it holds exactly these ``paths``; else ``compute()``'s, written there
    (atomically) for the next run."""
    if cache.is_file():
        with np.load(cache) as saved:
            if saved["paths"].tolist() == paths:
                return saved["features"]
    log.info(f"baseline: features of {len(paths)} images ({cache.name})")
    features = compute()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.stem}.tmp.npz")
    np.savez(tmp, paths=np.asarray(paths), features=features)
    tmp.replace(cache)
    return features


def load_cohort(records: list[ImageRecord], classes: list[str], out_dir: Path) -> Cohort:
    """Every image's features, read from the cache when it holds exactly these files."""
    paths = [r.path for r in records]
    features = cached_features(out_dir / "features.npz", paths,
                               lambda: cohort_features(paths, workers=min(4, os.cpu_count() or 1)))
    return Cohort([r.key for r in records], paths, features, np.asarray([classes.index(r.label) for r in records]),
                  np.asarray([r.case for r in records]), list(classes))


def run_baseline_task(*args: Any) -> dict[str, Any]:
    """``run_baseline`` as a SLURM job's entry point (``hpc.task``: its log, its allocation's threads)."""
    from hpc.task import task_setup

    with task_setup():
        return run_baseline(*args)


def run_baseline(cfg: Config, records: list[ImageRecord], classes: list[str], out_dir: Path,
                 cnn: dict[str, Any], assignments: list[list[list[str]]]) -> dict[str, Any]:
    """The baseline's report in the CNN's folds (``assignments``: each repeat's test cases per fold), its null
    on the first fold assignment, and whether the CNN's pooled accuracy of the first assignment lies above the
    null's 95th percentile."""
    cohort = load_cohort(records, classes, out_dir)
    reports, rows = [], []
    for r, folds in enumerate(assignments):
        seed = cfg.cv.seed + r
        by_fold = cv_records(cohort, folds, seed)
        reports.append({**cv_report(by_fold, classes, cfg.cv.bootstrap, cfg.cv.confidence, seed), "seed": seed,
                        "c": [fold[0]["c"] for fold in by_fold]})
        rows += [[r, k, rec["key"], rec["case"], rec["label"], rec["majority_class"], f"{rec['confidence']:.4f}"]
                 for k, fold in enumerate(by_fold) for rec in fold]
        if r == 0:
            null = permutation_null(cohort, folds, seed, cfg.cv.permutations, pooled_accuracy(by_fold, classes))
    out = {"method": "logistic regression (C by inner case-grouped CV) on colour/texture features after Reinhard",
           "repeats": reports, "across_repeats": across_repeats(reports), "null": null}
    out["assignments"] = assignment_spread(cfg, records, cohort, reports)
    out["cnn_minus_baseline"] = paired_differences(cnn, reports)
    if null["permutations"]:
        out["cnn_above_null"] = {level: bool(cnn["vote"][level]["accuracy"] > null[level]["p95"])
                                 for level in ("image", "case")}
    write_csv_atomic(out_dir / "predictions.csv", ["repeat", "fold", "image", "case", "truth", "predicted",
                                                    "confidence"], rows)
    write_text_atomic(out_dir / "report.json", json.dumps(out, indent=1) + "\n")
    return out


def assignment_spread(cfg: Config, records: list[ImageRecord], cohort: Cohort,
                      reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The baseline's pooled accuracies over ``cv.baseline_assignments`` fold assignments, the run's own first
    (seeds cv.seed, cv.seed + 1, ...), and the percentile of each of the run's assignments in that spread: a
    low one means folds that are hard for a model of stain and texture, and likely for the CNN too."""
    total = cfg.cv.baseline_assignments
    if total <= len(reports):
        return {"n": 0}
    values = [[rep["vote"][level]["accuracy"] for level in LEVELS] for rep in reports]
    for r in range(len(reports), total):
        folds = grouped_folds(records, cfg.cv.folds, cfg.cv.seed + r)
        values.append(list(pooled_accuracy(cv_records(cohort, folds, cfg.cv.seed + r), cohort.classes)))
    table = np.asarray(values)
    out: dict[str, Any] = {"n": total, "seeds": [cfg.cv.seed, cfg.cv.seed + total - 1]}
    for j, level in enumerate(LEVELS):
        column = table[:, j]
        out[level] = {"mean": float(column.mean()), "sd": float(column.std()), "values": column.tolist(),
                      "run_percentiles": mid_percentiles(column, len(reports))}
    return out


def mid_percentiles(values: np.ndarray, first: int) -> list[float]:
    """Where each of the first ``first`` values lies among all ``values``, in percent (ties count half)."""
    return [float(100 * (np.mean(values < v) + np.mean(values == v) / 2)) for v in values[:first]]


def paired_differences(cnn: dict[str, Any], reports: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """The CNN's pooled accuracy less the baseline's, assignment by assignment in the same folds (None where the
    CNN's repeat failed): the comparison that the dealing of cases does not blur."""
    repeats = cnn.get("repeats") or [cnn]
    return {level: [None if mine is None else mine["vote"][level]["accuracy"] - base["vote"][level]["accuracy"]
                    for mine, base in zip(repeats, reports)] for level in LEVELS}
