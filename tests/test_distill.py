"""Distillation from the reference (train.distill): a cross-fitted teacher that never learns a case from its own
labels, the mixed loss, and a real training that carries it and resumes exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import SHORT_STEPS, config_for
from jobs.train import run_train
from lymphoma.checkpoint import load_checkpoint
from lymphoma.distill import Distiller, cross_fitted, encode
from lymphoma.errors import InputError
from lymphoma.settings import TrainSettings

STEPS = [*SHORT_STEPS, "train.distill=0.5"]


def _cohort(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3 classes x 4 cases x 30 tiles: the class in features 0-2, each case's own offset in features 3-14."""
    rng = np.random.default_rng(seed)
    x, y, cases = [], [], []
    for k in range(3):
        for c in range(4):
            mean = np.zeros(15)
            mean[k] = 3.0
            mean[3 + 4 * k + c] = 3.0  # what only this case has: a model that sees its labels can use it
            x.append(mean + rng.normal(size=(30, 15)))
            y += [k] * 30
            cases += [f"{k}-{c}"] * 30
    return np.concatenate(x), np.array(y), np.array(cases)


def test_a_case_is_taught_by_the_other_cases_never_by_its_own_labels():
    x, y, cases = _cohort()
    probs = cross_fitted(x, y, cases, 3, seed=0)
    assert probs.shape == (len(y), 3) and np.allclose(probs.sum(1), 1)
    assert np.mean(probs.argmax(1) == y) > 0.8
    # case 0-0 labelled as class 1: an in-sample fit learns that label through the case's own feature, the
    # cross-fitted teacher still calls its tiles what the other cases say such tiles are
    wrong = y.copy()
    wrong[cases == "0-0"] = 1
    taught = cross_fitted(x, wrong, cases, 3, seed=0)
    assert np.mean(taught[cases == "0-0"].argmax(1) == 0) >= 0.7
    assert np.mean(taught[cases == "0-0"].argmax(1) == 1) < 0.15
    from lymphoma.baseline import fit_reference

    in_sample = fit_reference(1.0, x, wrong, cases, "images").predict(x[cases == "0-0"])
    assert np.mean(in_sample == 1) > 0.5


def test_targets_carry_class_and_index_and_the_loss_mixes_hard_and_soft():
    labels = np.array([2, 0, 1, 1])
    targets = encode(labels, 3)
    teacher = np.array([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1], [0.3, 0.4, 0.3], [0.0, 1.0, 0.0]])
    distiller = Distiller(teacher, weight=0.5)
    y, index = distiller.split(torch.as_tensor(targets))
    assert y.tolist() == labels.tolist() and index.tolist() == [0, 1, 2, 3]
    logits = torch.randn(4, 3)
    soft = -(torch.as_tensor(teacher, dtype=torch.float32) * logits.log_softmax(1)).sum(1).mean()
    hard = torch.nn.functional.cross_entropy(logits, y)
    assert distiller.loss(hard, logits, index).item() == pytest.approx(0.5 * hard.item() + 0.5 * soft.item(), rel=1e-5)
    assert Distiller(teacher, 1.0).loss(hard, logits, index).item() == pytest.approx(soft.item(), rel=1e-5)


@pytest.mark.parametrize("bad", [{"distill": 0.0}, {"distill": 1.5}, {"distill": 0.5, "mix": "mixup"},
                                 {"distill": 0.5, "case_adversary": 1.0}])
def test_settings_that_cannot_distil_are_refused(bad):
    with pytest.raises(InputError, match="train.distill"):
        TrainSettings(**bad)


def test_a_class_with_one_training_case_cannot_teach():
    x, y, cases = _cohort()
    keep = cases != "2-1"
    keep &= ~np.isin(cases, ["2-2", "2-3"])
    with pytest.raises(InputError, match="two or more training cases in every class"):
        cross_fitted(x[keep], y[keep], cases[keep], 3, seed=0)


def test_a_training_distilled_from_the_reference_runs_and_resumes_exactly(three_cases):
    run_train(config_for(three_cases, "distil", *STEPS))
    out = three_cases[1] / "distil" / "train"
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2 and all(np.isfinite(e["train_loss"]) for e in history)
    log = next((out / "logs").rglob("*_log.out")).read_text()
    assert "distilled from the reference (train.distill=0.5)" in log
    assert "distillation teacher: C=" in log and "cross-fitted over 6 cases" in log

    run_train(config_for(three_cases, "distil-resumed", *STEPS, "train.epochs=1"))
    run_train(config_for(three_cases, "distil-resumed", *STEPS))
    first = load_checkpoint(out / "checkpoints" / "last.pt")
    resumed = load_checkpoint(three_cases[1] / "distil-resumed" / "train" / "checkpoints" / "last.pt")
    assert all(torch.equal(first["model"][k], resumed["model"][k]) for k in first["model"])

    run_train(config_for(three_cases, "plain", *STEPS[:-1]))
    plain = load_checkpoint(three_cases[1] / "plain" / "train" / "checkpoints" / "last.pt")
    assert not all(torch.equal(first["model"][k], plain["model"][k]) for k in first["model"])
