"""Which epoch's weights a training run keeps, and when it stops early.

A 3-class model that predicts one class for everything has a validation loss near ln 3, which on a
handful of validation patients can beat any confident model that is wrong on one of them. Selecting on
balanced accuracy cannot keep such a model (it scores 1/classes); the loss only breaks ties.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

History = Sequence[dict[str, Any]]


def score(entry: dict[str, Any], select: str) -> tuple[float, ...]:
    """Higher is better: ``balanced_accuracy`` then lower loss, lower ``loss``, or the later epoch (``last``)."""
    if select == "balanced_accuracy":
        return (round(float(entry["val_balanced_accuracy"]), 6), -float(entry["val_loss"]))
    if select == "loss":
        return (-float(entry["val_loss"]),)
    return (float(entry["epoch"]),)


def best_index(history: History, select: str, min_epochs: int = 1) -> Optional[int]:
    """The position in ``history`` of the epoch to keep; None while no epoch from ``min_epochs`` on exists."""
    candidates = [i for i, entry in enumerate(history) if entry["epoch"] + 1 >= min_epochs]
    if not candidates:
        return None
    return max(candidates, key=lambda i: (score(history[i], select), -i))


def stop_early(history: History, patience: Optional[int], select: str = "loss", min_epochs: int = 1) -> bool:
    """Whether the last ``patience`` epochs all failed to improve on the kept epoch (never before
    ``min_epochs``, never with ``select: last``)."""
    if patience is None or select == "last" or len(history) < min_epochs:
        return False
    best = best_index(history, select, min_epochs)
    return best is not None and len(history) - 1 - best >= patience


def at_chance(balanced_accuracy: float, classes: int) -> bool:
    """Whether a balanced accuracy is no better than chance (1/classes: what a model that predicts one class
    for everything scores)."""
    return balanced_accuracy <= 1 / max(1, classes) + 1e-6


def explain(history: History, select: str, min_epochs: int) -> str:
    """Why the kept epoch was kept, in words for the report."""
    best = best_index(history, select, min_epochs)
    if best is None:
        return "no epoch trained yet"
    entry = history[best]
    if select == "last":
        return f"epoch {entry['epoch'] + 1}: the last of a fixed schedule (train.select=last)"
    what = (f"highest val balanced accuracy {entry['val_balanced_accuracy']:.3f} (val loss {entry['val_loss']:.3f})"
            if select == "balanced_accuracy" else f"lowest val loss {entry['val_loss']:.3f}")
    floor = f" from epoch {min_epochs} on" if min_epochs > 1 else ""
    return f"epoch {entry['epoch'] + 1}: {what}{floor}"
