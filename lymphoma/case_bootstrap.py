"""Case-bootstrap intervals of a cohort's figures: the cases are drawn with replacement, since the images of one
patient are not independent (a case drawn twice counts as two cases)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from lymphoma.levels import LEVELS, confusions, level_inputs
from lymphoma.metrics import accuracy, balanced_accuracy, calibration, one_vs_rest_auc

SCORE_RESAMPLES = 500  # case resamples for the intervals of macro AUC and ECE (about 2 ms each on 300 images)


@dataclass(frozen=True)
class CaseTable:
    """A cohort arranged by case (sorted): each case's own confusion counts per level, and per level the true
    class indices and probabilities (with ``scored``: only the AUC and ECE need them), with the image rows each
    case owns."""
    confusions: dict[str, np.ndarray]  # level -> (cases, classes, classes)
    scored: dict[str, tuple[np.ndarray, np.ndarray]]  # level -> (true class index, probabilities)
    image_rows: list[np.ndarray]

    @classmethod
    def of(cls, records: Sequence[dict[str, Any]], classes: Sequence[str], aggregate: str,
           scored: bool = True) -> "CaseTable":
        by_case: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            by_case[r["case"]].append(r)
        cases = sorted(by_case)
        per_case = [confusions(by_case[c], classes, aggregate) for c in cases]
        ordered = [r for c in cases for r in by_case[c]]  # so the case rows of level_inputs follow ``cases``
        sizes = [len(by_case[c]) for c in cases]
        return cls({level: np.stack([m[i] for m in per_case]) for i, level in enumerate(LEVELS)},
                   {level: (np.array([list(classes).index(t) for t in truth]), probs)
                    for level, (truth, _, probs) in level_inputs(ordered, classes, aggregate).items()} if scored else {},
                   [np.arange(end - n, end) for end, n in zip(np.cumsum(sizes), sizes)])

    @property
    def n_cases(self) -> int:
        return len(self.image_rows)

    def scores(self, picked: np.ndarray) -> dict[str, tuple[Optional[float], float]]:
        """Per level, the macro ROC AUC (None where a class is alone) and ECE of the cases ``picked`` (indices,
        repeats counted), as ``probability_scores`` finds them."""
        rows = {"image": np.concatenate([self.image_rows[i] for i in picked]), "case": picked}
        out = {}
        for level in LEVELS:
            truth, probs = (values[rows[level]] for values in self.scored[level])
            aucs = [v for v in one_vs_rest_auc(truth, probs) if v is not None]
            out[level] = (float(np.mean(aucs)) if aucs else None, calibration(truth, probs)["ece"])
        return out


def bootstrap_intervals(records: Sequence[dict[str, Any]], classes: Sequence[str], aggregate: str, resamples: int,
                        confidence: float, seed: int = 0, scores: bool = False) -> dict[str, list[float]]:
    """Percentile intervals of image- and case-level (balanced) accuracy over ``resamples`` draws of the cases,
    each draw's confusion the sum of its cases' own. With ``scores``, of macro ROC AUC and ECE too (ECE's
    re-centred: ``recentred``), from the first ``SCORE_RESAMPLES`` draws (they do not depend on the aggregation:
    the probabilities are the same). Keys ``<level>_<figure>``."""
    table = CaseTable.of(records, classes, aggregate, scored=scores)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = defaultdict(list)
    for r in range(resamples):
        picked = rng.integers(0, table.n_cases, table.n_cases)
        weights = np.bincount(picked, minlength=table.n_cases)
        for level in LEVELS:
            m = np.tensordot(weights, table.confusions[level], axes=1)
            draws[f"{level}_accuracy"].append(accuracy(m))
            draws[f"{level}_balanced_accuracy"].append(balanced_accuracy(m))
        if scores and r < SCORE_RESAMPLES:
            for level, (auc, ece) in table.scores(picked).items():
                draws[f"{level}_ece"].append(ece)
                if auc is not None:
                    draws[f"{level}_macro_auc"].append(auc)
    tail = (1 - confidence) / 2 * 100
    out = {name: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] for name, v in draws.items()}
    if scores and resamples:
        every = table.scores(np.arange(table.n_cases))
        for level in LEVELS:
            out[f"{level}_ece"] = recentred(draws[f"{level}_ece"], every[level][1], tail)
    return out


def recentred(draws: Sequence[float], estimate: float, tail: float) -> list[float]:
    """The percentile interval of a binned ECE's resamples moved by their mean's distance from the estimate,
    within [0, 1]. A bin's gap |confidence - accuracy| only grows with the noise a resample adds, so the resamples
    of a small cohort lie above the estimate (the estimate was often at or below the plain interval's low end);
    moved back, the interval keeps their spread around the estimate."""
    shift = float(np.mean(draws)) - estimate
    return [float(np.clip(np.percentile(draws, q) - shift, 0.0, 1.0)) for q in (tail, 100 - tail)]
