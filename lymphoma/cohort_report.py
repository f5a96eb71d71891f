"""The cohort report of a prediction: one row per slide, image- and case-level metrics (accuracy, balanced
accuracy, ROC AUC, F1, calibration), confusion matrices, ROC and reliability plots."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lymphoma.case_bootstrap import bootstrap_intervals
from lymphoma.files import write_csv_atomic, write_text_atomic
from lymphoma.levels import LEVELS, case_class, confusions, image_class, level_inputs
from lymphoma.metrics import accuracy, balanced_accuracy, probability_scores
from lymphoma.plots import save_confusion, save_reliability, save_roc


def seen_cases_notes(records: Sequence[dict[str, Any]], cases_seen: Optional[Sequence[str]],
                     judge: str = "`lymphoma cv`") -> list[str]:
    """A warning where cases predicted with a known class are among those the model learnt from or chose its epoch
    on (its checkpoint's ``cases_seen``): their accuracy is no held-out figure. Nothing where none is."""
    known = {r["case"] for r in records if r.get("status") == "ok" and r.get("label") and r.get("case")}
    seen = sorted(known & set(cases_seen or ()))
    if not seen:
        return []
    return [f"{len(seen)} of the {len(known)} case(s) predicted with a known class were learnt from in training (or "
            f"chose the model's epoch): {', '.join(seen[:5])}{' ...' if len(seen) > 5 else ''}; accuracy on them is "
            f"not a held-out figure: judge a model on cases it never saw ({judge})"]


def write_report(records: Sequence[dict[str, Any]], classes: Sequence[str], out_dir: Path,
                 aggregate: str = "vote", warnings: Sequence[str] = (),
                 intervals: Optional[tuple[int, float]] = None) -> dict[str, Any]:
    """summary.csv (one row per slide: its class, votes, mean tile probability per class, truth and case),
    cases.csv (one row per case: ``write_case_summary``), metrics.json and confusion PNGs at image and case level; an image's
    class is its tiles' majority ``vote`` or their ``mean`` probability's class; ``warnings`` about the whole
    prediction go into metrics.json (and from there onto the run's report page). With ``intervals`` (resamples,
    confidence), each level's figures get case-bootstrap intervals: ``interval``, figure -> [low, high]."""
    rows = []
    for r in records:
        ok = r["status"] == "ok"
        rows.append([r["key"], r["path"], r["status"], image_class(r, aggregate) if ok else "",
                     r.get("mean_prob_class", ""),
                     f"{r['confidence']:.4f}" if ok else ""]
                    + [r["votes"][c] if ok else "" for c in classes]
                    + [f"{r['mean_probs'][c]:.4f}" if ok else "" for c in classes]
                    + [r.get("n_tiles", ""), r.get("label") or "", r.get("case") or "", r.get("error", "")])
    write_csv_atomic(out_dir / "summary.csv", ["slide", "path", "status", "predicted", "mean_prob_class", "confidence"]
                     + [f"votes_{c}" for c in classes] + [f"prob_{c}" for c in classes]
                     + ["n_tiles", "truth", "case", "error"], rows)
    done = [r for r in records if r["status"] == "ok"]
    write_case_summary(records, classes, out_dir / "cases.csv", aggregate)
    metrics: dict[str, Any] = {"slides": len(records), "predicted": len(done), "failed": len(records) - len(done),
                               "classes": list(classes), "aggregate": aggregate}
    if warnings:
        metrics["warnings"] = list(warnings)
    known = [r for r in done if r.get("label")]
    if known:
        metrics.update(level_metrics(known, classes, aggregate, out_dir))
        for level in LEVELS:
            save_confusion(np.asarray(metrics[level]["confusion"]), classes, out_dir / f"confusion_{level}.png",
                           f"{level} level: accuracy {metrics[level]['accuracy']:.3f} (n={metrics[level]['n']})")
        if intervals:
            metrics.update(bootstrap=intervals[0], confidence=intervals[1])
            drawn = bootstrap_intervals(known, classes, aggregate, *intervals, scores=True)
            for level in LEVELS:
                metrics[level]["interval"] = {name[len(level) + 1:]: v for name, v in drawn.items()
                                              if name.startswith(f"{level}_")}
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def write_case_summary(records: Sequence[dict[str, Any]], classes: Sequence[str], path: Path,
                       aggregate: str = "vote") -> None:
    """``cases.csv``: one row per case (patient) of the slides that have one, as the case level of ``metrics.json``
    counts it: its class (``levels.case_class``), the mean over its slides of their mean tile probability per class,
    its slides by predicted class, its truth, and how many of its slides failed."""
    by_case: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("case"):
            by_case[str(r["case"])].append(r)
    rows = []
    for case, items in sorted(by_case.items()):
        done = [r for r in items if r["status"] == "ok"]
        counts = Counter(image_class(r, aggregate) for r in done)
        rows.append([case, len(done), case_class(done, classes, aggregate) if done else ""]
                    + [f"{np.mean([r['mean_probs'][c] for r in done]):.4f}" if done else "" for c in classes]
                    + [counts.get(c, 0) for c in classes] + [items[0].get("label") or "", len(items) - len(done)])
    write_csv_atomic(path, ["case", "slides", "predicted"] + [f"prob_{c}" for c in classes]
                     + [f"slides_{c}" for c in classes] + ["truth", "failed_slides"], rows)


def level_metrics(records: Sequence[dict[str, Any]], classes: Sequence[str], aggregate: str,
                  out_dir: Optional[Path] = None) -> dict[str, dict[str, Any]]:
    """Per level: n, accuracy, balanced accuracy, confusion and ``level_scores`` (ROC AUC, F1, calibration; with
    ``out_dir``, their plots there), of records that carry a label."""
    image, case = confusions(records, classes, aggregate)
    scores = level_scores(records, classes, aggregate, out_dir)
    return {level: {"n": int(m.sum()), "accuracy": accuracy(m), "balanced_accuracy": balanced_accuracy(m),
                    "confusion": m.tolist(), **scores[level]} for level, m in zip(LEVELS, (image, case))}


def figure_text(level: dict[str, Any], key: str, missing: str = "-") -> str:
    """A figure of a level's metrics (metrics.json), with its interval where it has one; ``missing`` where it has
    none (a macro AUC of one class)."""
    value, interval = level.get(key), level.get("interval", {}).get(key)
    if value is None:
        return missing
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def metrics_lines(metrics: dict[str, Any]) -> list[str]:
    """The figures of a cohort report (``write_report``'s metrics) as printed: per level accuracy, balanced accuracy
    and macro AUC, with their intervals and what they come from."""
    lines = [f"{level}-level " + ", ".join(f"{name} {figure_text(metrics[level], key)}" for name, key in
                                          (("accuracy", "accuracy"), ("balanced", "balanced_accuracy"),
                                           ("macro AUC", "macro_auc"))) + f" (n={metrics[level]['n']})"
             for level in LEVELS if level in metrics]
    if "confidence" in metrics and "case" in metrics:
        lines.append(f"  {metrics['confidence']:.0%} intervals from {metrics['bootstrap']} resamples of the "
                     f"{metrics['case']['n']} cases (a patient's images are not independent)")
    return lines


def probability_record(probs: np.ndarray, classes: Sequence[str], **fields: Any) -> dict[str, Any]:
    """A record of an image classified from one probability vector (a linear model, a MIL bag) rather than a tile
    vote: one vote for its class, so vote and mean agree; ``fields`` (key, path, label, case, ...) go in as given."""
    name = classes[int(probs.argmax())]
    return {**fields, "status": "ok", "majority_class": name, "mean_prob_class": name, "confidence": float(probs.max()),
            "mean_probs": dict(zip(classes, probs.tolist())), "votes": {c: int(c == name) for c in classes}}


def level_scores(records: Sequence[dict[str, Any]], classes: Sequence[str], aggregate: str = "vote",
                 out_dir: Optional[Path] = None) -> dict[str, dict[str, Any]]:
    """``probability_scores`` at image and case level; with ``out_dir``, ``roc_<level>.png`` and
    ``reliability_<level>.png`` there."""
    scores = {}
    for level, (truth, predicted, probs) in level_inputs(records, classes, aggregate).items():
        scores[level] = probability_scores(truth, predicted, probs, classes)
        if out_dir is not None:
            truth_index = np.array([list(classes).index(t) for t in truth])
            macro = scores[level]["macro_auc"]
            save_roc(truth_index, probs, classes, out_dir / f"roc_{level}.png",
                     f"{level} level, one class against the rest (n={len(truth)})"
                     + (f": macro AUC {macro:.3f}" if macro is not None else ""))
            save_reliability(scores[level]["reliability"], scores[level]["ece"], out_dir / f"reliability_{level}.png",
                             f"{level} level (n={len(truth)})")
    return scores
