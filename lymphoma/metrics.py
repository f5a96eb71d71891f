"""Class weights, confusion matrices, accuracies, and the probability scores the field reports (ROC AUC, F1,
calibration)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

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
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=index.device)
    # index_add, not bincount: bincount sizes its output from the data, which makes the host wait for a GPU
    return counts.index_add_(0, index, torch.ones_like(index)).reshape(num_classes, num_classes)


def accuracy(confusion: torch.Tensor | np.ndarray) -> float:
    confusion = np.asarray(confusion)
    return float(np.trace(confusion) / max(1, confusion.sum()))


def balanced_accuracy(confusion: torch.Tensor | np.ndarray) -> float:
    """Mean recall over the classes that occur."""
    confusion = np.asarray(confusion, dtype=np.float64)
    support = confusion.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(confusion)[present] / support[present])) if present.any() else 0.0


def probability_scores(truth: Sequence[str], predicted: Sequence[str], probs: np.ndarray, classes: Sequence[str],
                       bins: int = 10) -> dict[str, Any]:
    """The figures the field reports beside accuracy, with scikit-learn: per class one-vs-rest ROC AUC (None for a
    class absent from, or alone in, the truth) and their macro mean; precision, recall and F1 of the predicted
    classes per class and macro-averaged; the expected calibration error of the probabilities' top class over
    ``bins`` equal-width confidence bins, and the reliability table it comes from."""
    from sklearn.metrics import precision_recall_fscore_support

    probs = np.asarray(probs, dtype=np.float64)
    truth_index = np.array([list(classes).index(t) for t in truth])
    auc = dict(zip(classes, one_vs_rest_auc(truth_index, probs)))
    defined = [v for v in auc.values() if v is not None]
    precision, recall, f1, _ = precision_recall_fscore_support(list(truth), list(predicted), labels=list(classes),
                                                               zero_division=0)
    present = [k for k, name in enumerate(classes) if name in set(truth)]
    return {"auc": auc, "macro_auc": float(np.mean(defined)) if defined else None,
            "precision": dict(zip(classes, map(float, precision))), "recall": dict(zip(classes, map(float, recall))),
            "f1": dict(zip(classes, map(float, f1))), "macro_f1": float(np.mean(f1[present])) if present else 0.0,
            **calibration(truth_index, probs, bins)}


def one_vs_rest_auc(truth_index: np.ndarray, probs: np.ndarray) -> list[Optional[float]]:
    """Per class, the ROC AUC of its probability against the other classes: the Mann-Whitney statistic from mid-ranks
    (a tie counts half, as the ROC curve's trapezoids count it), without scikit-learn's checks, which cost a case
    bootstrap seconds; None for a class absent from, or alone in, the truth."""
    from scipy.stats import rankdata

    out: list[Optional[float]] = []
    for k in range(probs.shape[1]):
        positive = truth_index == k
        n_positive = int(positive.sum())
        n_negative = len(positive) - n_positive
        if not n_positive or not n_negative:
            out.append(None)
            continue
        ranks = rankdata(probs[:, k])
        out.append(float((ranks[positive].sum() - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)))
    return out


def calibration(truth_index: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error (Guo et al. 2017) of the top class's probability: the share-weighted mean gap
    between confidence and accuracy over ``bins`` equal-width bins; with the per-bin table."""
    confidence, chosen = probs.max(axis=1), probs.argmax(axis=1)
    correct = (chosen == truth_index).astype(np.float64)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    table = {"count": [], "confidence": [], "accuracy": []}
    ece = 0.0
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        table["count"].append(n)
        table["confidence"].append(float(confidence[inside].mean()) if n else None)
        table["accuracy"].append(float(correct[inside].mean()) if n else None)
        if n:
            ece += n / len(probs) * abs(float(confidence[inside].mean()) - float(correct[inside].mean()))
    return {"ece": ece, "reliability": {"bins": bins, **table}}
