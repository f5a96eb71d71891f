"""The case adversary (train.case_adversary): reversed gradients, class-conditional case targets, and a training
that carries it, saves it beside an unchanged model, and resumes it exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import SHORT_STEPS, config_for
from jobs.train import run_train
from lymphoma.adversary import CaseAdversary, encode, reverse_gradient
from lymphoma.checkpoint import load_checkpoint
from lymphoma.errors import InputError
from lymphoma.model import build_model
from lymphoma.settings import TrainSettings
from lymphoma.training import make_optimizer, make_scheduler, weights_digest

STEPS = [*SHORT_STEPS, "train.case_adversary=1.0"]


def _tiny_densenet() -> torch.nn.Module:
    return build_model({"growth_rate": 4, "block_config": [1], "num_init_features": 8, "bn_size": 2,
                        "drop_rate": 0.0, "num_classes": 3})


def test_reversed_gradient_is_the_plain_one_negated_and_scaled():
    x = torch.randn(4, 5, requires_grad=True)
    (reverse_gradient(x, 0.3) ** 2).sum().backward()
    assert torch.allclose(x.grad, -0.3 * 2 * x.detach())


def test_targets_carry_class_and_case_and_the_adversary_chooses_within_the_class():
    labels, cases = np.array([0, 0, 1, 1, 0, 2]), np.array(["b", "a", "c", "d", "b", "e"])
    targets, names, case_class = encode(labels, cases, 3)
    assert names == ["a", "b", "c", "d", "e"] and case_class.tolist() == [0, 0, 1, 1, 2]
    assert (targets % 3).tolist() == labels.tolist() and [names[i] for i in targets // 3] == cases.tolist()
    with pytest.raises(InputError, match="two classes"):
        encode(np.array([0, 1]), np.array(["a", "a"]), 2)

    model = _tiny_densenet()
    adversary = CaseAdversary(model, case_class, 3, weight=1.0, epochs=2)
    y, case = adversary.split(torch.as_tensor(targets))
    model(torch.randn(6, 3, 32, 32))
    loss = adversary.loss(y, case, epoch=0)
    # the FL tile's case is the only FL case: its share of the loss is 0; among 2 cases chance is ln 2
    assert 0 < loss.item() < 2 * np.log(2)
    assert adversary.epoch_stats()["case_adversary_accuracy"] >= 1 / 6  # the lone FL case is always named
    assert adversary.scale(0) == 0.0 and 0.99 < adversary.scale(2) <= 1.0


def test_a_cohort_with_one_case_per_class_or_mixed_tiles_is_refused():
    model = _tiny_densenet()
    with pytest.raises(InputError, match="two or more training cases"):
        CaseAdversary(model, np.array([0, 1, 2]), 3, weight=1.0, epochs=2)
    with pytest.raises(InputError, match="train.mix=none"):
        TrainSettings(case_adversary=0.5, mix="mixup")


def test_the_adversary_head_learns_at_its_own_rate_under_the_same_schedule():
    model = _tiny_densenet()
    adversary = CaseAdversary(model, np.array([0, 0, 1, 1]), 3, weight=1.0, epochs=2)
    settings = TrainSettings(lr=1e-3, case_adversary=1.0, case_adversary_lr=10.0, warmup_epochs=1, epochs=4)
    optimizer = make_optimizer(model, settings, adversary)
    scheduler = make_scheduler(optimizer, settings)
    net, head = optimizer.param_groups
    assert {id(p) for p in head["params"]} == {id(p) for p in adversary.head.parameters()}
    assert len(net["params"]) == len(list(model.parameters()))
    for _ in range(3):
        assert head["lr"] == pytest.approx(10 * net["lr"]) and 0 < net["lr"] <= 1e-3
        optimizer.step()
        scheduler.step()
    with pytest.raises(InputError, match="case_adversary_lr"):
        TrainSettings(case_adversary=1.0, case_adversary_lr=0)


def test_training_with_a_case_adversary_keeps_the_model_alone_and_resumes_exactly(three_cases):
    """The adversary learns (its history entries), best.pt and last.pt hold the plain model (it loads strictly
    and predicts as any other), the adversary rides in last.pt, and 1 + 1 epochs equal 2 bit for bit."""
    run_train(config_for(three_cases, "adv", *STEPS))
    out = three_cases[1] / "adv" / "train"
    history = json.loads((out / "history.json").read_text())
    assert all(0 < e["case_adversary_loss"] and 0 <= e["case_adversary_accuracy"] <= 1 for e in history)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert set(state["adversary"]) == {"head.weight", "head.bias", "case_class"}
    assert state["adversary"]["case_class"].tolist() == [0, 0, 2, 2, 1, 1]  # sj-03 CLL, sj-04 MCL, sj-05 FL
    model = build_model(state["architecture"])
    model.load_state_dict(state["model"])  # strict: no adversary weights in the model
    assert "training on cpu" in next((out / "logs").rglob("*_log.out")).read_text()

    run_train(config_for(three_cases, "adv-resumed", *STEPS, "train.epochs=1"))
    run_train(config_for(three_cases, "adv-resumed", *STEPS))
    resumed = load_checkpoint(three_cases[1] / "adv-resumed" / "train" / "checkpoints" / "last.pt")
    again = build_model(resumed["architecture"])
    again.load_state_dict(resumed["model"])
    assert weights_digest(again) == weights_digest(model)
    assert torch.equal(resumed["adversary"]["head.weight"], state["adversary"]["head.weight"])


def test_resuming_without_the_adversary_it_trained_with_is_refused(three_cases):
    run_train(config_for(three_cases, "adv-then-off", *STEPS, "train.epochs=1"))
    with pytest.raises(Exception, match="train.case_adversary"):
        run_train(config_for(three_cases, "adv-then-off", *STEPS[:-1]))


def test_two_gloo_processes_keep_one_adversary(three_cases):
    """Each process draws other tiles, so each head's gradient differs: the heads stay identical only because
    they are averaged over the processes, as the network's are by DDP."""
    results = run_train(config_for(three_cases, "adv-ddp", *STEPS, "train.epochs=1", "cluster.tasks_per_node=2"))
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert results[0]["weights_sha1"] == results[1]["weights_sha1"]
    assert results[0]["adversary_sha1"] == results[1]["adversary_sha1"]
