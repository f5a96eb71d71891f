"""Distillation from the reference baseline (``train.distill``): the network learns each training tile's class
and, beside it, the probabilities that the reference's logistic regression on colour and texture features
(``lymphoma.baseline``) gives that tile. The teacher is cross-fitted: the tiles of each training case are
predicted by a fit on the other training cases only, so its probabilities hold what carries from patient to
patient and nothing of the tile's own patient.

Both the tile's class and its index travel in one integer target (``label + classes * index``), as the case
adversary's case does (``lymphoma.adversary``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Optional

import numpy as np
import torch

from lymphoma.baseline import choose_c, fewest_cases, fit_reference, image_features
from lymphoma.errors import InputError
from lymphoma.phase_tiles import PhaseTiles

log = logging.getLogger(__name__)


def tile_features(tiles: PhaseTiles, normalize: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> np.ndarray:
    """The reference's features of every tile ``[N, D]``, each tile normalised by ``normalize`` first if given
    (stain.scope tile: stored tiles are as read)."""
    rows = []
    for i in range(len(tiles)):
        tile = tiles[i][0]
        rows.append(image_features(normalize(tile) if normalize is not None else tile))
    return np.stack(rows)


def cross_fitted(x: np.ndarray, y: np.ndarray, cases: np.ndarray, num_classes: int, seed: int,
                 splits: int = 4) -> np.ndarray:
    """Each row's class probabilities ``[N, num_classes]`` from a logistic regression fitted without its case:
    C chosen once by the reference's inner case-grouped CV, then ``splits`` class-stratified groups of cases
    (fewer where a class has fewer cases), each predicted by a fit on the others."""
    from sklearn.model_selection import StratifiedGroupKFold

    cases_per_class = fewest_cases(y, cases)
    if len(np.unique(y)) < 2 or cases_per_class < 2:
        raise InputError("train.distill needs two or more training cases in every class (its teacher predicts each "
                         "case from the others); set train.distill=null")
    c = choose_c(x, y, cases, seed)
    probs = np.zeros((len(y), num_classes))
    for train, held in StratifiedGroupKFold(min(splits, cases_per_class), shuffle=True, random_state=seed).split(
            x, y, cases):
        model = fit_reference(c, x[train], y[train], cases[train], "images")
        probs[np.ix_(held, model.classes_)] = model.predict_proba(x[held])
    log.info(f"distillation teacher: C={c}, cross-fitted over {len(np.unique(cases))} cases, its class right for "
             f"{np.mean(probs.argmax(1) == y):.3f} of {len(y)} training tiles")
    return probs


def encode(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Each tile's class and index as one integer ``label + num_classes * index``."""
    return labels.astype(np.int64) + num_classes * np.arange(len(labels), dtype=np.int64)


class Distiller(torch.nn.Module):
    """The teacher's probabilities of every training tile and the loss that mixes them with the hard class."""

    def __init__(self, teacher: np.ndarray, weight: float) -> None:
        super().__init__()
        self.register_buffer("teacher", torch.as_tensor(teacher, dtype=torch.float32), persistent=False)
        self.num_classes, self.weight = teacher.shape[1], weight

    def split(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class, tile index) of each encoded target."""
        return targets % self.num_classes, targets // self.num_classes

    def loss(self, hard: torch.Tensor, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``(1 - weight) * hard + weight * cross-entropy to the teacher's probabilities of these tiles``."""
        soft = self.teacher.to(logits.device)[index]
        return (1.0 - self.weight) * hard + self.weight * torch.nn.functional.cross_entropy(logits.float(), soft)


def make_distiller(tiles: PhaseTiles, weight: float, seed: int,
                   normalize: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> Distiller:
    """The distiller of one training: the teacher fitted on these training tiles, their targets encoded."""
    classes = len(tiles.classes or [])
    teacher = cross_fitted(tile_features(tiles, normalize), tiles.labels, tiles.cases, classes, seed)
    tiles.targets = encode(tiles.labels, classes)
    return Distiller(teacher, weight)
