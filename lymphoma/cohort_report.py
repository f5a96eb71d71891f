"""The cohort report of a prediction: one row per slide, image- and case-level metrics (accuracy, balanced
accuracy, ROC AUC, F1, calibration), confusion matrices, ROC and reliability plots; an image's or case's class by
majority vote of tiles or by mean probability."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lymphoma.files import write_csv_atomic, write_text_atomic
from lymphoma.metrics import accuracy, balanced_accuracy, probability_scores
from lymphoma.plots import save_confusion, save_reliability, save_roc


def seen_cases_notes(records: Sequence[dict[str, Any]], cases_seen: Optional[Sequence[str]]) -> list[str]:
    """A warning where cases predicted with a known class are among those the model learnt from or chose its epoch
    on (its checkpoint's ``cases_seen``): their accuracy is no held-out figure. Nothing where none is."""
    known = {r["case"] for r in records if r.get("status") == "ok" and r.get("label") and r.get("case")}
    seen = sorted(known & set(cases_seen or ()))
    if not seen:
        return []
    return [f"{len(seen)} of the {len(known)} case(s) predicted with a known class were learnt from in training (or "
            f"chose the model's epoch): {', '.join(seen[:5])}{' ...' if len(seen) > 5 else ''}; accuracy on them is "
            "not a held-out figure: judge a model on cases it never saw (`lymphoma cv`)"]


def write_report(records: Sequence[dict[str, Any]], classes: Sequence[str], out_dir: Path,
                 aggregate: str = "vote", warnings: Sequence[str] = ()) -> dict[str, Any]:
    """summary.csv (one row per slide), metrics.json and confusion PNGs at image and case level; an image's
    class is its tiles' majority ``vote`` or their ``mean`` probability's class; ``warnings`` about the whole
    prediction go into metrics.json (and from there onto the run's report page)."""
    rows = []
    for r in records:
        ok = r["status"] == "ok"
        rows.append([r["key"], r["path"], r["status"], image_class(r, aggregate) if ok else "",
                     r.get("mean_prob_class", ""),
                     f"{r['confidence']:.4f}" if ok else ""]
                    + [r["votes"][c] if ok else "" for c in classes]
                    + [r.get("n_tiles", ""), r.get("label") or "", r.get("case") or "", r.get("error", "")])
    write_csv_atomic(out_dir / "summary.csv", ["slide", "path", "status", "predicted", "mean_prob_class", "confidence"]
                     + [f"votes_{c}" for c in classes] + ["n_tiles", "truth", "case", "error"], rows)
    done = [r for r in records if r["status"] == "ok"]
    metrics: dict[str, Any] = {"slides": len(records), "predicted": len(done), "failed": len(records) - len(done),
                               "classes": list(classes), "aggregate": aggregate}
    if warnings:
        metrics["warnings"] = list(warnings)
    known = [r for r in done if r.get("label")]
    if known:
        image, case = confusions(known, classes, aggregate)
        scores = level_scores(known, classes, aggregate, out_dir)
        for level, confusion in (("image", image), ("case", case)):
            metrics[level] = {"n": int(confusion.sum()), "accuracy": accuracy(confusion),
                              "balanced_accuracy": balanced_accuracy(confusion), "confusion": confusion.tolist(),
                              **scores[level]}
            save_confusion(confusion, classes, out_dir / f"confusion_{level}.png",
                           f"{level} level: accuracy {metrics[level]['accuracy']:.3f} (n={confusion.sum()})")
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def probability_record(probs: np.ndarray, classes: Sequence[str], **fields: Any) -> dict[str, Any]:
    """A record of an image classified from one probability vector (a linear model, a MIL bag) rather than a tile
    vote: one vote for its class, so vote and mean agree; ``fields`` (key, path, label, case, ...) go in as given."""
    name = classes[int(probs.argmax())]
    return {**fields, "status": "ok", "majority_class": name, "mean_prob_class": name, "confidence": float(probs.max()),
            "mean_probs": dict(zip(classes, probs.tolist())), "votes": {c: int(c == name) for c in classes}}


def image_class(record: dict[str, Any], aggregate: str) -> str:
    """An image's class from its record: the tiles' majority ``vote`` or their ``mean`` probability's class."""
    return record["majority_class"] if aggregate == "vote" else record["mean_prob_class"]


def case_class(records: Sequence[dict[str, Any]], classes: Sequence[str], aggregate: str = "vote") -> str:
    """A case's class. ``vote``: the majority of its images' voted classes, ties to the larger summed mean
    probability; ``mean``: the class of its images' averaged mean probabilities."""
    def summed(c: str) -> float:
        return sum(r["mean_probs"][c] for r in records)

    if aggregate == "mean":
        return max(classes, key=summed)
    counts = Counter(r["majority_class"] for r in records)
    best = max(counts.values())
    return max([c for c in classes if counts.get(c) == best], key=summed)


def confusions(records: Sequence[dict[str, Any]], classes: Sequence[str],
               aggregate: str = "vote") -> tuple[np.ndarray, np.ndarray]:
    """``[true, predicted]`` counts over images and over cases, for records that carry a label."""
    index = {c: i for i, c in enumerate(classes)}
    image = np.zeros((len(classes), len(classes)), dtype=int)
    by_case: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        image[index[r["label"]], index[image_class(r, aggregate)]] += 1
        by_case[r["case"]].append(r)
    case = np.zeros_like(image)
    for items in by_case.values():
        case[index[items[0]["label"]], index[case_class(items, classes, aggregate)]] += 1
    return image, case


def level_inputs(records: Sequence[dict[str, Any]], classes: Sequence[str],
                 aggregate: str = "vote") -> dict[str, tuple[list[str], list[str], np.ndarray]]:
    """Per level (image, case): truth, predicted class and class probabilities (an image's mean tile
    probability; a case's mean over its images), for records that carry a label."""
    by_case: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_case[r["case"]].append(r)

    def probs(items: Sequence[dict[str, Any]]) -> list[float]:
        return [float(np.mean([r["mean_probs"][c] for r in items])) for c in classes]

    return {"image": ([r["label"] for r in records], [image_class(r, aggregate) for r in records],
                      np.array([probs([r]) for r in records])),
            "case": ([items[0]["label"] for items in by_case.values()],
                     [case_class(items, classes, aggregate) for items in by_case.values()],
                     np.array([probs(items) for items in by_case.values()]))}


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
