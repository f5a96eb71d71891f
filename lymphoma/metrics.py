"""Class weights, confusion matrices and accuracies."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lymphoma.errors import InputError


def class_weights(counts: Sequence[int], classes: Sequence[str]) -> torch.Tensor:
    """The tutorial's weights: one minus each class's share of the training tiles."""
    counts_array = np.asarray(counts, dtype=np.float64)
    empty = [name for name, n in zip(classes, counts_array) if n == 0]
    if empty:
        raise InputError(f"class(es) {empty} have no training tiles; add images of them to the training cases "
                         "or drop them from data.classes")
    return torch.tensor(1.0 - counts_array / counts_array.sum(), dtype=torch.float32)


def confusion_matrix(truth: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[true, predicted]`` counts."""
    index = truth.to(torch.int64) * num_classes + predicted.to(torch.int64)
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(confusion: torch.Tensor | np.ndarray) -> float:
    confusion = np.asarray(confusion)
    return float(np.trace(confusion) / max(1, confusion.sum()))


def balanced_accuracy(confusion: torch.Tensor | np.ndarray) -> float:
    """Mean recall over the classes that occur."""
    confusion = np.asarray(confusion, dtype=np.float64)
    support = confusion.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(confusion)[present] / support[present])) if present.any() else 0.0
