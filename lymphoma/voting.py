"""From per-tile outputs to an image's class: vote counts, majority vote, mean probability."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Vote:
    """The image-level answer: the tutorial's majority vote and the mean-probability class."""

    votes: list[int]
    majority: int
    mean_probs: list[float]
    mean_class: int
    confidence: float

    def as_dict(self, classes: Sequence[str]) -> dict[str, object]:
        return {"votes": dict(zip(classes, self.votes)), "majority_class": classes[self.majority],
                "mean_prob_class": classes[self.mean_class], "confidence": self.confidence,
                "mean_probs": dict(zip(classes, self.mean_probs))}


def vote(probs: np.ndarray) -> Vote:
    """Aggregate ``[ntile, nclass]`` probabilities. A majority tie goes to the tied class with the larger
    mean probability; ``confidence`` is the mean probability of the mean-probability class."""
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"need [ntile, nclass] probabilities with at least one tile, got shape {probs.shape}")
    counts = np.bincount(probs.argmax(1), minlength=probs.shape[1])
    mean = probs.mean(0)
    tied = np.flatnonzero(counts == counts.max())
    majority = int(tied[np.argmax(mean[tied])])
    return Vote(votes=counts.tolist(), majority=majority, mean_probs=mean.round(6).tolist(),
                mean_class=int(mean.argmax()), confidence=float(mean.max()))
