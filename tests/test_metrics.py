"""The probability scores of the reports (ROC AUC, precision/recall/F1, calibration) against scikit-learn and
inputs whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from lymphoma.metrics import probability_scores

CLASSES = ["CLL", "FL", "MCL"]


def test_a_perfect_predictor_scores_one_and_is_calibrated():
    truth = ["CLL", "FL", "MCL", "FL", "CLL", "MCL"]
    probs = np.eye(3)[[CLASSES.index(t) for t in truth]]
    scores = probability_scores(truth, truth, probs, CLASSES)
    assert scores["auc"] == {"CLL": 1.0, "FL": 1.0, "MCL": 1.0} and scores["macro_auc"] == 1.0
    assert scores["f1"] == {"CLL": 1.0, "FL": 1.0, "MCL": 1.0} and scores["macro_f1"] == 1.0
    assert scores["ece"] == 0.0 and scores["reliability"]["count"][-1] == 6


def test_scores_equal_scikit_learns_on_random_inputs():
    rng = np.random.default_rng(3)
    truth = list(rng.choice(CLASSES, 60))
    probs = rng.dirichlet(np.ones(3), 60)
    predicted = list(rng.choice(CLASSES, 60))
    scores = probability_scores(truth, predicted, probs, CLASSES)
    for k, name in enumerate(CLASSES):
        assert scores["auc"][name] == pytest.approx(roc_auc_score(np.array(truth) == name, probs[:, k]))
    assert scores["macro_auc"] == pytest.approx(roc_auc_score(truth, probs, multi_class="ovr", average="macro",
                                                              labels=CLASSES))
    for name, fn in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score)):
        expected = fn(truth, predicted, labels=CLASSES, average=None, zero_division=0)
        assert [scores[name][c] for c in CLASSES] == pytest.approx(expected.tolist())
    assert scores["macro_f1"] == pytest.approx(f1_score(truth, predicted, labels=CLASSES, average="macro"))


def test_auc_counts_ties_as_scikit_learn_does():
    """Probabilities rounded to one decimal tie often (as a vote share or a saturated bf16 softmax does): each tie
    between a positive and a negative counts half, as scikit-learn's ROC curve counts it."""
    rng = np.random.default_rng(4)
    truth = list(rng.choice(CLASSES, 80))
    probs = np.round(rng.dirichlet(np.ones(3), 80), 1)
    scores = probability_scores(truth, truth, probs, CLASSES)
    for k, name in enumerate(CLASSES):
        assert scores["auc"][name] == pytest.approx(roc_auc_score(np.array(truth) == name, probs[:, k]), abs=1e-12)


def test_expected_calibration_error_of_a_worked_example():
    """Confidences 0.9 (right), 0.6 (wrong), 0.8 (right), one per bin: (0.1 + 0.6 + 0.2) / 3."""
    probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.8, 0.2, 0.0]])
    scores = probability_scores(["CLL", "FL", "CLL"], ["CLL", "CLL", "CLL"], probs, CLASSES)
    assert scores["ece"] == pytest.approx(0.3)
    assert scores["reliability"]["count"] == [0, 0, 0, 0, 0, 0, 1, 0, 1, 1]
    assert scores["auc"]["MCL"] is None  # a class absent from the truth has no AUC; the macro is over the others
    assert scores["macro_auc"] == pytest.approx(np.mean([scores["auc"]["CLL"], scores["auc"]["FL"]]))
