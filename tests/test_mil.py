"""Attention-MIL: it learns a bag task carried by a few instances and attends to them; `lymphoma mil` on real
embeddings runs in the folds of `lymphoma cv`, with attention maps, a final model and clear errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import on_a_terminal, tiny_timm_file
from jobs.cli import main
from jobs.run_folder import folder_lock
from lymphoma.crossval import grouped_folds
from lymphoma.inputs import discover
from lymphoma.mil import SMALL_BAG, Bag, predict_bag, train_mil
from lymphoma.settings import MILSettings

pytestmark = pytest.mark.usefixtures("no_network")


def synthetic_bags(n: int, rng: np.random.Generator, classes: int = 3) -> tuple[list[Bag], list[np.ndarray]]:
    """Bags of 40 noise instances; in a bag of class c > 0, 3 instances carry a pattern on dimensions 2c, 2c+1
    (class 0: none). Returns the bags and each bag's key-instance indices."""
    bags, keys = [], []
    for i in range(n):
        label = i % classes
        x = rng.normal(0, 1, (40, 16)).astype(np.float32)
        key = rng.choice(40, size=3, replace=False) if label else np.array([], dtype=int)
        x[key, 2 * label:2 * label + 2] += 4.0
        bags.append(Bag(f"b{i}", x, label, np.asarray([f"b{i}"] * 40)))
        keys.append(key)
    return bags, keys


def test_mil_learns_a_few_instance_task_and_attends_to_those_instances():
    rng = np.random.default_rng(0)
    train, _ = synthetic_bags(90, rng)
    test, keys = synthetic_bags(30, rng)
    model = train_mil(train, 3, MILSettings(epochs=15, lr=1e-3, dropout=0.0))
    correct, recall, top = 0, [], []
    for bag, key in zip(test, keys):
        probs, attention = predict_bag(model, bag.features)
        correct += int(probs.argmax() == bag.label)
        assert attention.shape == (40,) and abs(attention.sum() - 1) < 1e-5
        if len(key):  # its attention ranks the instances that carry the label first
            order = np.argsort(-attention)
            recall.append(len(set(order[:3].tolist()) & set(key.tolist())) / 3)
            top.append(order[0] in key and attention[key].mean() > 50 * np.delete(attention, key).mean())
    assert correct / len(test) >= 0.9
    assert np.mean(recall) >= 0.9 and all(top)


def test_mil_runs_small_bags_on_one_thread_and_large_ones_on_all_then_restores_the_setting():
    """Small bags train and predict on one thread (with several, each step waits for the slowest thread: 85x
    slower on this 2-core machine beside two busy processes); bags of at least SMALL_BAG values on all."""
    seen: list[int] = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        small, _ = synthetic_bags(6, np.random.default_rng(0))
        model = train_mil(small, 3, MILSettings(epochs=1))
        predict_bag(model, small[0].features)
        assert set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        large = np.zeros((SMALL_BAG // 16 + 1, 16), dtype=np.float32)
        predict_bag(model, large)
        assert set(seen) == {2} and torch.get_num_threads() == 2
    finally:
        hook.remove()
        torch.set_num_threads(before)


def _another_cohorts_predictions_go_elsewhere(out: Path, common: list[str], tmp_path: Path, capsys) -> None:
    """`--predict` of a second features folder of the same name never replaces (or mixes with) the first's
    predictions in the default folder: refused, naming both; `--out` puts them elsewhere."""
    first = (out / "predict" / "new" / "predictions.csv").read_bytes()
    shutil.copytree(tmp_path / "new", tmp_path / "cohort-2" / "new")
    capsys.readouterr()
    assert main(["mil", *common, "--predict", str(tmp_path / "cohort-2" / "new")]) == 2
    assert f"{out / 'predict' / 'new'} holds the MIL predictions of {tmp_path / 'new'}; give --out" in \
        capsys.readouterr().err
    assert (out / "predict" / "new" / "predictions.csv").read_bytes() == first
    assert main(["mil", *common, "--predict", str(tmp_path / "cohort-2" / "new"), "--out", str(tmp_path / "p2")]) == 0
    assert (tmp_path / "p2" / "predictions.csv").read_bytes() == first  # the same embeddings
    with folder_lock(tmp_path / "p2", "mil"):  # as a prediction into it, still running, holds it
        assert main(["mil", *common, "--predict", str(tmp_path / "cohort-2" / "new"), "--out", str(tmp_path / "p2")]) == 2
    assert f"another `lymphoma mil` (pid {os.getpid()}) is using {tmp_path / 'p2'}" in capsys.readouterr().err
    with folder_lock(out.parent, "mil"):  # as a `lymphoma mil` training in this run holds it
        assert main(["mil", *common, "cv.folds=2", "mil.epochs=1"]) == 2
    assert f"another `lymphoma mil` (pid {os.getpid()}) is using {out.parent}; wait for it to end or choose another " \
        "run.name" in capsys.readouterr().err


def _labelled_slides_are_reported(out: Path, trained: list, unseen: list, predicted: list[dict[str, str]],
                                  captured) -> None:
    """New slides with a class get `lymphoma predict`'s cohort report (each slide's class its bag's), with intervals,
    and a warning naming the cases the saved model learnt from (every case of its cross-validation)."""
    assert torch.load(out / "mil.pt", weights_only=False)["cases_seen"] == sorted({r.case for r in trained})
    metrics = json.loads((out / "predict" / "new" / "metrics.json").read_text())
    assert (metrics["image"]["n"], metrics["case"]["n"]) == (6, 3) and "accuracy" in metrics["case"]["interval"]
    right = sum(r["predicted"] == Path(r["path"]).parent.name for r in predicted)
    assert metrics["image"]["accuracy"] == pytest.approx(right / 6)
    assert f"image-level accuracy {metrics['image']['accuracy']:.3f} [" in captured.out
    learnt = sorted({r.case for r in unseen} & {r.case for r in trained})
    assert learnt  # the first cases of each class, as make_dataset picks them
    assert f"{len(learnt)} of the 3 case(s) predicted with a known class were learnt from in training" in captured.err


def test_mil_command_runs_in_the_folds_of_cv_with_attention_maps(make_dataset, tmp_path, capsys):
    source = make_dataset(cases_per_class=4, images_per_case=1)
    weights = tmp_path / "resnet10t.safetensors"
    tiny_timm_file(weights, "resnet10t", num_classes=1000)
    common = [f"data.source={source}", f"run.root={tmp_path}", "run.name=mil", "cluster.kind=debug"]
    assert main(["features", "model.backbone=timm:resnet10t", f"model.weights={weights}", *common]) == 0
    assert main(["mil", *common, "cv.folds=2", "cv.repeats=2", "cv.bootstrap=100", "mil.epochs=3", "mil.bag=case"]) == 0
    printed = capsys.readouterr().out
    assert "attention-MIL, one bag per case (12 bags)" in printed and "over 2 fold assignments" in printed
    out = tmp_path / "mil" / "mil"
    report = json.loads((out / "report.json").read_text())
    assert report["n_images"] == 12 and report["n_cases"] == 12 and len(report["repeats"]) == 2
    assert report["encoder_saw_test_cases"] == []  # pretrained weights: no case of this cohort
    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    records = discover(str(source), ["CLL", "FL", "MCL"]).records
    for repeat in (0, 1):
        folds = grouped_folds(records, 2, repeat)  # lymphoma cv's folds for cv.seed=0
        for k, cases in enumerate(folds):
            assert sorted(r["case"] for r in rows if r["repeat"] == str(repeat) and r["fold"] == str(k)) == cases
    for image in source.rglob("*.png"):
        saved = np.load(out / "attention" / f"{image.stem}.npz")
        assert abs(saved["attention"].sum() - 1) < 1e-4  # one slide per case: the bag is the slide
        assert (out / "attention" / f"{image.stem}.png").stat().st_size > 1000
    assert (out / "mil.pt").is_file() and main(["mil", f"run.root={tmp_path}", "run.name=none"]) == 2
    assert "features.csv not found: run `lymphoma features` first" in capsys.readouterr().err
    unseen = make_dataset(cases_per_class=1, images_per_case=2, name="unseen")  # new slides for the saved model
    assert main(["features", "--out", str(tmp_path / "new"), "model.backbone=timm:resnet10t", f"model.weights={weights}",
                 *common, f"{unseen}/**/*.png"]) == 0
    capsys.readouterr()
    assert main(["mil", *common, "--predict", str(tmp_path / "new")]) == 0
    captured = capsys.readouterr()
    with (out / "predict" / "new" / "predictions.csv").open() as handle:
        predicted = list(csv.DictReader(handle))
    _labelled_slides_are_reported(out, records, discover(str(unseen), ["CLL", "FL", "MCL"]).records, predicted, captured)
    assert len(predicted) == 6 and {r["predicted"] for r in predicted} <= {"CLL", "FL", "MCL"}
    assert all(abs(sum(float(r[f"prob_{c}"]) for c in ("CLL", "FL", "MCL")) - 1) < 1e-3 for r in predicted)
    assert len(list((out / "predict" / "new" / "attention").glob("*.png"))) == 6
    _another_cohorts_predictions_go_elsewhere(out, common, tmp_path, capsys)
    assert main(["features", "--out", str(tmp_path / "other"), "model.backbone=timm:resnet10t", *common,
                 f"{unseen}/CLL/*.png"]) == 0  # random weights: another encoder
    capsys.readouterr()
    assert main(["mil", *common, "--predict", str(tmp_path / "other")]) == 2
    assert "with other settings than the MIL model was trained on" in capsys.readouterr().err
    assert main(["mil", *common, "--predict", str(tmp_path / "nothing")]) == 2  # a typo: no traceback
    assert f"{tmp_path / 'nothing'}: no features.csv, so no embeddings" in capsys.readouterr().err
    whole = (out / "mil.pt").read_bytes()
    (out / "mil.pt").write_bytes(whole[:1000])  # cut short
    assert main(["mil", *common, "--predict", str(tmp_path / "new")]) == 2
    assert f"MIL model {out / 'mil.pt'} cannot be read: it is damaged or cut short" in capsys.readouterr().err
    (out / "mil.pt").write_bytes(whole)
    per_fold = tmp_path / "cv-run"  # a `lymphoma cv` run whose folds each hold their own model's embeddings
    shutil.copytree(tmp_path / "mil" / "features", per_fold / "repeat-0" / "fold-0" / "features")
    _a_rerun_of_other_settings_is_refused_and_restart_keeps_the_first(out, common, per_fold, capsys)
    shutil.copytree(tmp_path / "mil" / "features", per_fold / "repeat-0" / "fold-1" / "features")
    assert main(["mil", *common, "cv.folds=2", f"mil.features={per_fold}", "mil.epochs=1", "cv.bootstrap=100"]) == 0
    assert "(each fold its own encoder)" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["encoders"] == "one per fold"
    _a_bar_counts_the_models_on_a_terminal(common)


def _a_rerun_of_other_settings_is_refused_and_restart_keeps_the_first(out: Path, common: list[str], per_fold: Path,
                                                                      capsys) -> None:
    """`lymphoma mil` of other settings on a run that holds a MIL model: refused, naming what differs; with
    --restart the earlier model and report are set aside whole (here before the run fails on missing embeddings)."""
    capsys.readouterr()
    assert main(["mil", *common, "cv.folds=2", f"mil.features={per_fold}", "mil.epochs=1"]) == 2
    assert f"{out} holds a MIL model and report of other settings (they differ in: mil.features (None there, " \
           f"{per_fold} now), mil.bag (case there, slide now), mil.epochs (3 there, 1 now), cv.repeats (2 there, 1 " \
           "now)), which this run would replace: `lymphoma mil --restart` sets them aside" in capsys.readouterr().err
    before = {name: (out / name).read_bytes() for name in ("mil.pt", "report.json")}
    assert main(["mil", *common, "cv.folds=2", f"mil.features={per_fold}", "mil.epochs=1", "--restart"]) == 2
    assert "per-fold embeddings missing in " in capsys.readouterr().err and "fold-1" not in str(per_fold)
    aside = list(out.parent.glob("mil.before-*"))  # the earlier model and report kept, not replaced
    assert len(aside) == 1 and {name: (aside[0] / name).read_bytes() for name in before} == before


def _a_bar_counts_the_models_on_a_terminal(common: list[str]) -> None:
    """On a terminal a bar counts the models: 2 folds, then one on every case; none with --no-progress."""
    command = [sys.executable, "-m", "jobs.cli", "mil", *common, "cv.folds=2", "mil.epochs=1", "cv.bootstrap=100",
               "--restart"]  # the run holds a MIL model of other features
    for quiet in ([], ["--no-progress"]):
        code, printed = on_a_terminal(command + quiet, timeout_s=300)
        bar = [line for line in printed.replace("\r", "\n").splitlines() if line.startswith("mil:")]
        assert code == 0 and "attention-MIL, one bag per slide" in printed, printed
        assert (bar[-1].startswith("mil: 100%") and "| 3/3 " in bar[-1]) if not quiet else not bar, bar


def test_mil_refuses_features_of_two_encoders(make_dataset, tmp_path, capsys):
    source = make_dataset(cases_per_class=2, images_per_case=1)
    common = [f"data.source={source}", f"run.root={tmp_path}", "run.name=mixed", "cluster.kind=debug"]
    for out, stride in (("a", 64), ("b", 96)):
        assert main(["features", "--out", str(tmp_path / out), "model.backbone=timm:resnet10t", f"tiles.stride={stride}",
                     *common]) == 0
    rows = {}
    for out in ("a", "b"):
        with (tmp_path / out / "features.csv").open(newline="") as handle:
            rows[out] = list(csv.DictReader(handle))
    mixed = [r for r in rows["a"] if r["label"] == "CLL"] + [r for r in rows["b"] if r["label"] != "CLL"]
    (tmp_path / "c").mkdir()
    with (tmp_path / "c" / "features.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(mixed[0]))
        writer.writeheader()
        writer.writerows(mixed)
    capsys.readouterr()
    assert main(["mil", *common, "cv.folds=2", f"mil.features={tmp_path / 'c'}"]) == 2
    assert "come from 2 encoders or settings" in capsys.readouterr().err


def test_mil_needs_only_the_embeddings_when_the_slides_are_not_here(make_dataset, tmp_path, caplog):
    source = make_dataset(cases_per_class=2, images_per_case=1)
    weights = tmp_path / "resnet10t.safetensors"
    tiny_timm_file(weights, "resnet10t", num_classes=1000)
    common = [f"run.root={tmp_path}", "run.name=moved", "cluster.kind=debug"]
    assert main(["features", f"data.source={source}", "model.backbone=timm:resnet10t", f"model.weights={weights}",
                 *common]) == 0
    shutil.move(source, tmp_path / "elsewhere")  # embedded on one machine, MIL run where the slides are not
    assert main(["mil", *common, "cv.folds=2", "cv.bootstrap=100", "mil.epochs=1"]) == 0
    out = tmp_path / "moved" / "mil"
    assert json.loads((out / "report.json").read_text())["n_images"] == 6
    saved = sorted(path.stem for path in (out / "attention").glob("*.npz"))
    assert len(saved) == 6 and not list((out / "attention").glob("*.png"))
    warned = [r.getMessage() for r in caplog.records if "attention picture(s) not drawn" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("6 of 6") and "file not found" in warned[0]
    caplog.clear()
    assert main(["mil", *common, "--predict", str(tmp_path / "moved" / "features")]) == 0
    with (out / "predict" / "features" / "predictions.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 6
    assert len(list((out / "predict" / "features" / "attention").glob("*.npz"))) == 6
    assert any(r.getMessage().startswith("6 of 6 attention picture(s) not drawn") for r in caplog.records)
