"""Cross-validation grouped by case and stratified by class: folds, each fold's phases, and the pooled report
with bootstrap intervals over cases."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from lymphoma.case_bootstrap import bootstrap_intervals
from lymphoma.cohort_report import level_metrics
from lymphoma.errors import InputError
from lymphoma.inputs import ImageRecord
from lymphoma.levels import LEVELS
from lymphoma.split import split_cases


def grouped_folds(records: Sequence[ImageRecord], folds: int, seed: int = 0) -> list[list[str]]:
    """The test cases of each fold: every case in exactly one fold, each class's cases dealt round-robin
    after a seeded shuffle, so each fold holds at least one case of every class."""
    cases_by_class: dict[str, set[str]] = defaultdict(set)
    for record in records:
        cases_by_class[record.label].add(record.case)
    n_cases = sum(len(c) for c in cases_by_class.values())
    if n_cases < folds:
        raise InputError(f"{n_cases} case(s) for cv.folds={folds}: each fold needs its own cases; lower cv.folds "
                         f"to at most {n_cases} or add cases")
    short = {label: len(cases) for label, cases in cases_by_class.items() if len(cases) < folds}
    if short:
        detail = ", ".join(f"{label} has {n}" for label, n in sorted(short.items()))
        raise InputError(f"too few cases for {folds} folds stratified by class ({detail}; each fold needs one case "
                         f"of every class): lower cv.folds to {min(short.values())} or add cases of those classes")
    rng = random.Random(seed)
    out: list[list[str]] = [[] for _ in range(folds)]
    offset = 0
    for label in sorted(cases_by_class):
        cases = sorted(cases_by_class[label])
        rng.shuffle(cases)
        for i, case in enumerate(cases):
            out[(offset + i) % folds].append(case)
        offset += len(cases)  # the next class starts where this one ended, so fold sizes stay even
    return [sorted(fold) for fold in out]


def fold_phases(records: Sequence[ImageRecord], test_cases: Sequence[str], inner_val_fraction: float,
                seed: int = 0) -> dict[str, str]:
    """Each case's phase in one fold: its test cases are ``test``; the other cases are split by class into
    ``train`` and an inner ``val`` that alone chooses the checkpoint and stops training early."""
    test = set(test_cases)
    rest = [r for r in records if r.case not in test]
    try:
        phase_of = split_cases(rest, inner_val_fraction, 0.0, seed)
    except InputError as err:
        raise InputError(f"inside a fold: {err} (the inner split of cv.inner_val_fraction={inner_val_fraction} "
                         "needs two cases of each class outside the test fold; lower cv.folds)") from None
    phase_of.update(dict.fromkeys(test, "test"))
    return phase_of


def cv_report(records_by_fold: Sequence[Sequence[dict[str, Any]]], classes: Sequence[str], resamples: int,
              confidence: float, seed: int = 0) -> dict[str, Any]:
    """Per-fold and pooled accuracy (image and case level, plain and balanced) for both aggregations, with
    case-bootstrap intervals on the pooled figures. Only predicted images with a label count."""
    folds = [[r for r in fold if r["status"] == "ok" and r.get("label")] for fold in records_by_fold]
    pooled = [r for fold in folds for r in fold]
    if not pooled:
        raise InputError("no fold has a predicted image with a known class: nothing to report")
    report: dict[str, Any] = {"classes": list(classes), "confidence": confidence, "bootstrap": resamples,
                              "n_images": len(pooled), "n_cases": len({r["case"] for r in pooled})}
    for aggregate in ("vote", "mean"):
        entry = level_metrics(pooled, classes, aggregate)
        entry["folds"] = [level_metrics(fold, classes, aggregate) if fold else None for fold in folds]
        entry["interval"] = bootstrap_intervals(pooled, classes, aggregate, resamples, confidence, seed,
                                                scores=aggregate == "vote")
        report[aggregate] = entry
    return report


def format_cv_report(report: dict[str, Any]) -> str:
    """The report as a few lines of text: pooled figures with intervals, then per fold."""
    pct = int(round(report["confidence"] * 100))
    lines = [f"{report['n_images']} images of {report['n_cases']} cases, each predicted by the one fold that never "
             f"saw its case; {pct}% intervals from {report['bootstrap']} case resamples"]
    for aggregate, name in (("vote", "majority vote"), ("mean", "mean probability")):
        entry = report[aggregate]
        parts = []
        for level in LEVELS:
            for kind in ("accuracy", "balanced_accuracy"):
                low, high = entry["interval"][f"{level}_{kind}"]
                label = f"{level} {'balanced ' if kind.startswith('balanced') else ''}accuracy"
                parts.append(f"{label} {entry[level][kind]:.3f} [{low:.3f}, {high:.3f}]")
        lines.append(f"{name}: " + "; ".join(parts))
        per_fold = ", ".join("-" if f is None else f"{f['image']['accuracy']:.2f}/{f['case']['accuracy']:.2f}"
                             for f in entry["folds"])
        lines.append(f"  per fold (image/case accuracy): {per_fold}")
    lines += format_scores(report)
    lines += format_repeats(report)
    for kept in report.get("kept", []):
        lines.append(f"  repeat {kept['repeat']} fold {kept['fold']} kept {kept['why']} ({kept['epochs']} epochs run)")
    if report.get("baseline"):
        lines += format_baseline(report["baseline"])
    if report.get("seconds"):
        lines.append("task seconds: " + ", ".join(f"{stage} {value:.0f}" for stage, value in report["seconds"].items()))
    return "\n".join(lines)


def format_scores(report: dict[str, Any]) -> list[str]:
    """Macro ROC AUC, macro F1 (majority vote) and ECE per level, with the AUC and ECE intervals."""
    entry, parts = report["vote"], []
    for level in LEVELS:
        values, interval = entry[level], entry["interval"]
        auc = "AUC -" if values.get("macro_auc") is None else f"macro AUC {values['macro_auc']:.3f}"
        if f"{level}_macro_auc" in interval and values.get("macro_auc") is not None:
            auc += " [{:.3f}, {:.3f}]".format(*interval[f"{level}_macro_auc"])
        ece = f"ECE {values['ece']:.3f}" + (" [{:.3f}, {:.3f}]".format(*interval[f"{level}_ece"])
                                            if f"{level}_ece" in interval else "")
        parts.append(f"{level} {auc}, macro F1 {values['macro_f1']:.3f}, {ece}")
    return ["scores (one class against the rest; F1 of the majority vote): " + "; ".join(parts)] if "ece" in entry[
        "image"] else []


def format_baseline(baseline: dict[str, Any]) -> list[str]:
    """The reference model's figures in the same folds, and its permutation null."""
    across = baseline["across_repeats"]
    image, case = across["vote_image_accuracy"], across["vote_case_accuracy"]
    lines = [f"baseline (logistic regression on colour/texture features, same folds): image accuracy "
             f"{image['mean']:.3f} +- {image['sd']:.3f}, case accuracy {case['mean']:.3f} +- {case['sd']:.3f} "
             f"over {across['n']} fold assignment(s)"]
    null = baseline.get("null")
    if null and null["permutations"]:
        lines.append(f"  its null ({null['permutations']} case-label permutations, first fold assignment): image "
                     f"{null['image']['mean']:.3f} +- {null['image']['sd']:.3f} (95th percentile {null['image']['p95']:.3f}), "
                     f"case {null['case']['mean']:.3f} +- {null['case']['sd']:.3f}; baseline p = "
                     f"{null['image']['p_value']:.3f} (image), {null['case']['p_value']:.3f} (case); CNN above the null's "
                     f"95th percentile: image {baseline['cnn_above_null']['image']}, case {baseline['cnn_above_null']['case']}")
    return lines + _format_spread(baseline)


def _signed(values: Sequence[float | None]) -> str:
    return ", ".join("failed" if v is None else f"{v:+.3f}" for v in values)


def _format_spread(baseline: dict[str, Any]) -> list[str]:
    """The CNN less the baseline in the same folds, and the baseline's spread over many fold assignments."""
    lines = []
    paired = baseline.get("cnn_minus_baseline")
    if paired:
        lines.append(f"  CNN less baseline, same folds, assignment by assignment: image {_signed(paired['image'])}; "
                     f"case {_signed(paired['case'])}")
    spread = baseline.get("assignments") or {}
    if spread.get("n"):
        first, last = spread["seeds"]
        image, case = spread["image"], spread["case"]
        lines.append(f"  baseline alone over {spread['n']} fold assignments (seeds {first}-{last}, this run's first): "
                     f"image {image['mean']:.3f} +- {image['sd']:.3f}, case {case['mean']:.3f} +- {case['sd']:.3f}; "
                     f"this run's assignments at percentiles {', '.join(f'{p:.0f}' for p in image['run_percentiles'])} "
                     f"(image), {', '.join(f'{p:.0f}' for p in case['run_percentiles'])} (case) of that spread "
                     "(low: folds harder than most)")
    return lines


def across_repeats(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sd over fold assignments of each pooled accuracy (image and case level, both aggregations):
    how much the figure depends on which cases happened to share a fold."""
    out: dict[str, Any] = {"n": len(reports)}
    for aggregate in ("vote", "mean"):
        for level in LEVELS:
            for kind in ("accuracy", "balanced_accuracy"):
                values = [rep[aggregate][level][kind] for rep in reports]
                out[f"{aggregate}_{level}_{kind}"] = {"mean": float(np.mean(values)), "sd": float(np.std(values)),
                                                      "values": values}
    return out


def format_repeats(report: dict[str, Any]) -> list[str]:
    """Lines for every repeat and the mean +- sd across them."""
    across = report.get("across_repeats") or {}
    if across.get("n", 1) <= 1:
        return []
    lines = []
    for aggregate in ("vote", "mean"):
        image, case = across[f"{aggregate}_image_accuracy"], across[f"{aggregate}_case_accuracy"]
        lines.append(f"{aggregate} over {across['n']} fold assignments: image accuracy {image['mean']:.3f} +- "
                     f"{image['sd']:.3f} ({', '.join(f'{v:.2f}' for v in image['values'])}), case accuracy "
                     f"{case['mean']:.3f} +- {case['sd']:.3f} ({', '.join(f'{v:.2f}' for v in case['values'])})")
    return lines
