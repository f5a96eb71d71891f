"""An image's and a case's class from their records (the tiles' majority vote or mean probability), and the
confusion counts and scoring inputs of a cohort at both levels."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

LEVELS = ("image", "case")


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
