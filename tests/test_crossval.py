"""Grouped cross-validation: folds by case and class, no test case in training or model selection, the
report and its bootstrap intervals, and `lymphoma cv` end to end on real images."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import tables

from conftest import FAST
from jobs.cli import main
from jobs.cv import run_cv
from jobs.fold import FoldJob, FoldTask
from jobs.run_folder import open_run
from lymphoma.case_bootstrap import bootstrap_intervals
from lymphoma.crossval import cv_report, fold_phases, grouped_folds
from lymphoma.errors import InputError
from lymphoma.inputs import ImageRecord


@pytest.fixture(scope="module")
def records(manifest_rows, data_root) -> list[ImageRecord]:
    return [ImageRecord(str(data_root / r["lowres_path"]), r["cls"], r["case_id"]) for r in manifest_rows]


def test_folds_hold_every_case_once_with_every_class(records):
    folds = grouped_folds(records, 4, seed=0)
    cases = [c for fold in folds for c in fold]
    assert sorted(cases) == sorted({r.case for r in records})  # each of the 23 cases exactly once
    label = {r.case: r.label for r in records}
    for fold in folds:
        per_class = defaultdict(int)
        for case in fold:
            per_class[label[case]] += 1
        assert set(per_class) == {"CLL", "FL", "MCL"} and max(per_class.values()) <= 2
    assert [len(f) for f in folds] in ([6, 6, 6, 5], [6, 6, 5, 6], [6, 5, 6, 6], [5, 6, 6, 6])
    assert grouped_folds(records, 4, seed=0) == folds and grouped_folds(records, 4, seed=1) != folds


def test_fold_phases_keep_test_cases_out_of_training_and_selection(records):
    for test_cases in grouped_folds(records, 4, seed=0):
        phase_of = fold_phases(records, test_cases, 0.2, seed=0)
        assert {c for c, p in phase_of.items() if p == "test"} == set(test_cases)
        inner = {c for c, p in phase_of.items() if p == "val"}
        assert not inner & set(test_cases)
        assert {r.label for r in records if r.case in inner} == {"CLL", "FL", "MCL"}  # one inner case per class
        assert set(phase_of) == {r.case for r in records}


@pytest.mark.parametrize("folds, message", [(24, r"23 case\(s\) for cv.folds=24"),
                                            (8, "FL has 7; each fold needs one case of every class")])
def test_too_few_cases_for_the_folds(records, folds, message):
    with pytest.raises(InputError, match=message) as err:
        grouped_folds(records, folds)
    assert "lower cv.folds" in str(err.value)


def test_inner_split_needs_two_cases_per_class(records):
    few = [r for r in records if r.case in {"sj-03-2810", "sj-03-476", "sj-03-5521"} or r.label != "CLL"]
    cll = {r.case for r in few if r.label == "CLL"}
    with pytest.raises(InputError, match="inside a fold: .*class CLL.*lower cv.folds"):
        fold_phases(few, sorted(cll)[:2], 0.2)


def _record(case: str, label: str, predicted: str) -> dict:
    probs = {c: (0.8 if c == predicted else 0.1) for c in ("A", "B")}
    return {"key": f"{case}-{predicted}", "status": "ok", "label": label, "case": case, "majority_class": predicted,
            "mean_prob_class": predicted, "mean_probs": probs, "confidence": 0.8}


def test_report_pools_folds_and_bootstraps_cases():
    right = [_record(f"a{i}", "A", "A") for i in range(6)] + [_record(f"b{i}", "B", "B") for i in range(4)]
    wrong = [_record(f"b{i}", "B", "A") for i in range(4, 8)]
    report = cv_report([right[:5], right[5:] + wrong], ["A", "B"], resamples=500, confidence=0.9)
    vote = report["vote"]
    assert vote["image"]["accuracy"] == pytest.approx(10 / 14) and vote["case"]["n"] == 14
    assert vote["folds"][0]["image"]["accuracy"] == 1.0 and vote["folds"][1]["image"]["accuracy"] == pytest.approx(5 / 9)
    low, high = vote["interval"]["image_accuracy"]
    assert low < 10 / 14 < high and 0.4 < low and high < 1.0
    perfect = bootstrap_intervals(right, ["A", "B"], "vote", 200, 0.95)
    assert perfect["image_accuracy"] == [1.0, 1.0] and perfect["case_balanced_accuracy"] == [1.0, 1.0]
    assert bootstrap_intervals(right + wrong, ["A", "B"], "vote", 300, 0.95, seed=3) == \
        bootstrap_intervals(right + wrong, ["A", "B"], "vote", 300, 0.95, seed=3)


def test_calibration_error_interval_surrounds_its_estimate():
    """A binned ECE's case resamples lie above the estimate (noise only widens a bin's gap): the reported interval is
    their percentile interval moved back by that shift, so it keeps their width and holds the estimate."""
    rng = np.random.default_rng(1)
    records = []
    for i in range(23):  # as many cases as the real data set, four images each, probabilities about calibrated
        label = "AB"[i % 2]
        for j in range(4):
            confidence = rng.uniform(0.5, 1.0)
            predicted = label if rng.random() < confidence else "AB"[1 - i % 2]
            records.append({"key": f"{i}-{j}", "status": "ok", "label": label, "case": f"c{i}", "confidence": confidence,
                            "majority_class": predicted, "mean_prob_class": predicted,
                            "mean_probs": {predicted: confidence, "AB"[predicted == "A"]: 1 - confidence}})
    vote = cv_report([records], ["A", "B"], resamples=500, confidence=0.95)["vote"]
    for level in ("image", "case"):
        low, high = vote["interval"][f"{level}_ece"]
        # the plain percentile interval put the image-level estimate (0.054) at 0.13 of its width [0.038, 0.161]
        assert 0.25 < (vote[level]["ece"] - low) / (high - low) < 0.75 and 0 < low


def test_a_fold_refuses_a_case_in_two_phases(tmp_path, records):
    case = records[0].case
    mine = tuple(r for r in records if r.case == case)
    task = FoldTask(open_run().at(tmp_path), 0, 0, mine, (), mine[:1], ("CLL", "FL", "MCL"), 1)
    with pytest.raises(InputError, match=f"case {case} is in both train and test"):
        FoldJob()(task)


def _shard_cases(paths: list[Path]) -> set[str]:
    cases: set[str] = set()
    for path in paths:
        with tables.open_file(path) as h5:
            cases |= {c.decode() if isinstance(c, bytes) else str(c) for c in h5.root.cases[:]}
    return cases


def test_cv_end_to_end(make_dataset, make_config, caplog):
    caplog.set_level(logging.INFO)  # run_cv, called as a library, logs its report (the CLI shows it)
    source = make_dataset(cases_per_class=4, images_per_case=2)
    overrides = [*FAST, "cv.folds=2", "cv.inner_val_fraction=0.3", "cv.bootstrap=200", "train.epochs=2",
                 "train.max_steps_per_epoch=2", "predict.heatmaps=false", "train.patience=1", "cv.repeats=2",
                 "cv.permutations=3", "cv.baseline_assignments=6"]
    report = run_cv(make_config(source, *overrides))
    run_dir = make_config(source).dir
    assert report["n_images"] == 24 and report["n_cases"] == 12 and report["failed_folds"] == []
    test_of = _check_folds_never_saw_their_test_cases(run_dir)

    with (run_dir / "cv" / "predictions.csv").open() as handle:
        predicted = list(csv.DictReader(handle))
    assert len(predicted) == 48 and len({(p["repeat"], p["image"]) for p in predicted}) == 48
    assert all(p["case"] in test_of[int(p["repeat"]), int(p["fold"])] for p in predicted)
    assert len(report["repeats"]) == 2 and report["across_repeats"]["n"] == 2
    assert [k["why"].split(":")[0].startswith("epoch") for k in report["kept"]] == [True] * 4
    _check_baseline_in_the_same_folds(report, run_dir, test_of)

    # the first repeat's fold models: shipped as one ensemble, less those at or below chance on their inner val
    shipped = report["ensemble"]
    assert len(shipped["members"]) + len(shipped["left_out"]) == 2
    assert (shipped["path"] is not None) == bool(shipped["members"])
    _check_ensemble(run_dir, source)
    # each fold model records the cases it learnt from or chose its epoch on (with train.patience, the inner val's
    # too): every case but its test cases; the ensemble, their union (for `lymphoma mil`'s check of its encoder)
    from lymphoma.checkpoint import load_checkpoint

    every = set().union(*test_of.values())
    for k in (0, 1):
        seen = load_checkpoint(run_dir / "repeat-0" / f"fold-{k}" / "train" / "checkpoints" / "best.pt")["cases_seen"]
        assert seen == sorted(every - test_of[0, k])
    assert load_checkpoint(run_dir / "ensemble.pt")["cases_seen"] == sorted(every)
    _check_pooled_report(run_dir, caplog.text)
    assert report["seconds"]["train"] > 0

    # TTA on the same run: the trained folds are reused (no new epoch), the predictions are new
    best = run_dir / "repeat-0" / "fold-0" / "train" / "checkpoints" / "best.pt"
    before = best.stat().st_mtime_ns
    assert main(["cv", f"data.source={source}", f"run.root={run_dir.parent}", "run.name=test",
                 "tiles.images_per_shard=4", *overrides, "predict.tta=true"]) == 0
    assert best.stat().st_mtime_ns == before
    tta = json.loads((run_dir / "cv-tta" / "report.json").read_text())
    assert tta["tta"] is True and tta["n_images"] == 24
    assert tta["vote"]["image"]["confusion"] != [[0] * 3] * 3


def _check_folds_never_saw_their_test_cases(run_dir):
    """Every case tested once per repeat, the repeats dealing the cases differently, and no fold's tiles (its
    learning and its checkpoint choice) holding a case it tests; returns each fold's test cases."""
    with (run_dir / "folds.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    test_of = defaultdict(set)
    for row in rows:
        if row["phase"] == "test":
            test_of[int(row["repeat"]), int(row["fold"])].add(row["case"])
    for repeat in (0, 1):
        assert sorted(c for (r, _), cases in test_of.items() if r == repeat for c in cases) == \
            sorted({r["case"] for r in rows})
    assert {frozenset(test_of[0, k]) for k in (0, 1)} != {frozenset(test_of[1, k]) for k in (0, 1)}
    for (repeat, fold), test_cases in test_of.items():
        tiles = run_dir / f"repeat-{repeat}" / f"fold-{fold}" / "tiles"
        seen = _shard_cases(sorted(tiles.glob("train/*.h5"))) | _shard_cases(sorted(tiles.glob("val/*.h5")))
        assert seen and not seen & test_cases
        assert not list(tiles.glob("test/*"))
        history = json.loads((run_dir / f"repeat-{repeat}" / f"fold-{fold}" / "train" / "history.json").read_text())
        assert 1 <= len(history) <= 2
    return test_of


def _check_baseline_in_the_same_folds(report, run_dir, test_of):
    """The baseline ran in the same folds, with a 3-permutation null, and alone over 6 assignments whose first 2
    give the figures it had in the run's folds."""
    baseline = report["baseline"]
    assert baseline["null"]["permutations"] == 3 and 0 < baseline["null"]["image"]["p_value"] <= 1
    with (run_dir / "baseline" / "predictions.csv").open() as handle:
        base_rows = list(csv.DictReader(handle))
    assert len(base_rows) == 48
    assert all(row["case"] in test_of[int(row["repeat"]), int(row["fold"])] for row in base_rows)
    spread = baseline["assignments"]
    for level in ("image", "case"):
        assert spread["n"] == 6 and len(spread[level]["values"]) == 6
        assert spread[level]["values"][:2] == baseline["across_repeats"][f"vote_{level}_accuracy"]["values"]
        assert all(0 < p < 100 for p in spread[level]["run_percentiles"])
        assert baseline["cnn_minus_baseline"][level] == pytest.approx(
            [report["repeats"][r]["vote"][level]["accuracy"] - spread[level]["values"][r] for r in (0, 1)])


def _check_pooled_report(run_dir, printed):
    """The saved report: pooled votes, plots, ROC AUC and calibration with case-bootstrap intervals; the printed
    report names them."""
    saved = json.loads((run_dir / "cv" / "report.json").read_text())
    assert saved["vote"]["image"]["n"] == 24 and len(saved["vote"]["folds"]) == 2
    assert (run_dir / "cv" / "confusion_image.png").is_file() and (run_dir / "cv" / "roc_case.png").is_file()
    pooled = saved["vote"]
    for level in ("image", "case"):
        low, high = pooled["interval"][f"{level}_macro_auc"]
        assert low <= pooled[level]["macro_auc"] <= high and 0 <= pooled[level]["ece"] <= 1
        assert pooled["interval"][f"{level}_ece"][0] <= pooled[level]["ece"] <= pooled["interval"][f"{level}_ece"][1]
    assert "scores (one class against the rest; F1 of the majority vote): image macro AUC" in printed
    assert "95% intervals from 200 case resamples" in printed and "over 2 fold assignments" in printed
    assert "baseline (logistic regression" in printed and "its null (3 case-label permutations" in printed
    assert "CNN less baseline, same folds" in printed and "baseline alone over 6 fold assignments (seeds 0-5" in printed
    assert "task seconds: tile" in printed


def _check_ensemble(run_dir: Path, source: Path) -> None:
    import numpy as np
    import torch

    from jobs.cv import at_chance
    from lymphoma.checkpoint import load_checkpoint, save_checkpoint
    from lymphoma.ensemble import write_ensemble
    from lymphoma.prediction import Predictor

    folds = [run_dir / "repeat-0" / f"fold-{k}" / "train" / "checkpoints" / "best.pt" for k in (0, 1)]
    write_ensemble(folds, run_dir / "ensemble.pt")
    ensemble = load_checkpoint(run_dir / "ensemble.pt")
    assert ensemble["architecture"]["members"] == 2 and len(ensemble["ensemble"]) == 2
    assert ensemble["image_size"] == [312, 417]  # the training images' size, for prediction's scale check
    members = [Predictor.from_checkpoint(Path(m["path"]), torch.device("cpu")) for m in ensemble["ensemble"]]
    both = Predictor.from_checkpoint(run_dir / "ensemble.pt", torch.device("cpu"))
    tiles = np.random.default_rng(0).integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    mean = torch.stack([m.logits(tiles).softmax(1) for m in members]).mean(0)
    assert torch.allclose(both.logits(tiles).softmax(1), mean, atol=1e-5)
    out = run_dir / "ensemble-predict"
    assert main(["predict", "--checkpoint", str(run_dir / "ensemble.pt"), "--out", str(out),
                 str(next(Path(source).rglob("*.png")))]) == 0
    assert (out / "summary.csv").is_file()

    state = load_checkpoint(folds[0])  # a fold model is left out when its kept epoch was no better than chance
    entry = next(h for h in state["history"] if h["epoch"] == state["epoch"])
    for balanced, expected in ((1 / 3, True), (0.2, True), (0.5, False)):
        entry["val_balanced_accuracy"] = balanced
        save_checkpoint(state, run_dir / "probe.pt")
        assert at_chance(run_dir / "probe.pt") is expected
    other = dict(load_checkpoint(folds[1]), classes=["CLL", "FL", "XX"])
    save_checkpoint(other, run_dir / "other.pt")
    with pytest.raises(InputError, match="differs from .* in 'classes'"):
        write_ensemble([folds[0], run_dir / "other.pt"], run_dir / "bad.pt")


def test_a_cv_run_whose_cases_changed_is_refused_until_restarted(make_dataset, data_root, manifest_rows, tmp_path,
                                                                 capsys):
    """Slides added to data.source deal the cases into other folds, whose fold models learnt from cases they would
    now test: the rerun is refused before anything is written (a report of stale folds was written, then every fold
    failed); `--restart` keeps the earlier folds aside and runs afresh; more repeats extend the run."""
    source = make_dataset(cases_per_class=4, images_per_case=1)
    command = ["cv", "--no-progress", f"data.source={source}", f"run.root={tmp_path}", "run.name=grow", *FAST,
               "cv.folds=2", "cv.inner_val_fraction=0.3", "cv.bootstrap=100", "train.epochs=1",
               "train.max_steps_per_epoch=2", "predict.heatmaps=false", "cv.baseline=false"]
    assert main(command) == 0
    run = tmp_path / "grow"
    kept = {p: p.read_bytes() for p in (run / "folds.csv", run / "cv" / "report.json")}
    capsys.readouterr()
    assert main([*command, "tiles.stride=32"]) == 1  # the same folds, other tiles: every fold's training refuses,
    err = capsys.readouterr().err                    # and no report is made of the earlier models' predictions
    assert "`lymphoma cv --restart` alike" in err and {p: p.read_bytes() for p in kept} == kept, err
    used = {r["case_id"] for r in manifest_rows if (source / r["cls"] / Path(r["lowres_path"]).name).exists()}
    row = next(r for r in manifest_rows if r["cls"] == "CLL" and r["case_id"] not in used)
    shutil.copyfile(data_root / row["lowres_path"], source / "CLL" / Path(row["lowres_path"]).name)  # a new case
    capsys.readouterr()
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"{run}: repeat 0 fold " in err and "was dealt otherwise by an earlier run (folds.csv: " in err, err
    assert "`lymphoma cv --restart` sets the earlier folds aside" in err
    assert {p: p.read_bytes() for p in kept} == kept  # nothing written
    assert main([*command, "--restart"]) == 0
    aside = list(run.glob("cv.before-*"))
    assert len(aside) == 1 and (aside[0] / "folds.csv").read_bytes() == kept[run / "folds.csv"]
    assert (aside[0] / "repeat-0" / "fold-0" / "train" / "checkpoints" / "best.pt").is_file()
    assert json.loads((run / "cv" / "report.json").read_text())["n_images"] == 13
    assert main([*command, "cv.repeats=2"]) == 0  # a second assignment beside the first: no refusal
    assert json.loads((run / "cv" / "report.json").read_text())["across_repeats"]["n"] == 2


def test_cv_command_names_the_problem(make_dataset, tmp_path, capsys):
    source = make_dataset(cases_per_class=2, images_per_case=1)
    assert main(["cv", f"data.source={source}", f"run.root={tmp_path}", "cv.folds=3"]) == 2
    err = capsys.readouterr().err
    assert "lymphoma cv: error: too few cases for 3 folds stratified by class" in err and "lower cv.folds to 2" in err
    assert main(["cv", f"data.source={source}", f"run.root={tmp_path}", "cv.folds=2"]) == 2
    assert "inside a fold:" in capsys.readouterr().err  # 1 case per class left: no inner split possible
    assert main(["cv", f"data.source={source}", f"run.root={tmp_path}", "run.name=typo", "model.backbone=timm:resnet10x",
                 *FAST]) == 2  # named once, before any fold's task is submitted or the run folder made
    assert "timm has no architecture 'resnet10x'" in capsys.readouterr().err and not (tmp_path / "typo").exists()


def test_grid_is_chosen_on_the_inner_val_of_each_fold(make_dataset, make_config):
    from jobs.config import ConfigError
    from jobs.fold import grid_points

    assert grid_points({}) == [{}]
    assert grid_points({"train.lr": [0.1, 0.2], "model.drop_rate": [0.0]}) == [
        {"model.drop_rate": 0.0, "train.lr": 0.1}, {"model.drop_rate": 0.0, "train.lr": 0.2}]
    with pytest.raises(ConfigError, match="must be a setting of train, model"):
        grid_points({"cv.folds": [2, 3]})
    source = make_dataset(cases_per_class=4, images_per_case=1)
    cfg = make_config(source, *FAST, "cv.folds=2", "cv.inner_val_fraction=0.3", "cv.bootstrap=100", "train.epochs=1",
                      "train.max_steps_per_epoch=2", "predict.heatmaps=false", "cv.baseline=false",
                      "cv.grid={train.lr: [0.0001, 0.01], tiles.stride: [32]}", "run.name=grid")
    report = run_cv(cfg)
    assert report["n_images"] == 12
    for fold in (0, 1):
        fold_dir = cfg.dir / "repeat-0" / f"fold-{fold}"
        chosen = json.loads((fold_dir / "grid.json").read_text())
        scores = [(p["balanced_accuracy"], -p["val_loss"]) for p in chosen["points"]]
        assert len(scores) == 2 and chosen["chosen"] == max(range(2), key=lambda i: (scores[i], -i))
        assert (fold_dir / "train").resolve() == (fold_dir / f"grid-{chosen['chosen']}" / "train").resolve()
        assert (fold_dir / "grid-0" / "tiles" / "manifest.json").is_file()  # tiles.stride in the grid: own tiles
    from jobs.cv import plan_folds
    from jobs.fold import fold_trainings

    inputs = cfg.inputs()  # the epoch bar reads each grid point's history where it trained
    trainings = [t for task in plan_folds(cfg, inputs.records, inputs.classes) for t in fold_trainings(task)]
    assert len(trainings) == 4 and all(t.epochs_done(t.entries()) == 1 for t in trainings)
    assert {t.history.parent.parent.name for t in trainings} == {"grid-0", "grid-1"}
    with pytest.raises(ConfigError, match="'train.nope' is not a setting"):
        run_cv(make_config(source, *FAST, "cv.folds=2", "cv.grid={train.nope: [1]}", "run.name=grid-bad"))


def test_inner_val_can_train_too_when_it_chooses_nothing(make_dataset, make_config):
    from jobs.config import ConfigError

    source = make_dataset(cases_per_class=4, images_per_case=1)
    common = [*FAST, "cv.folds=2", "cv.inner_val_fraction=0.3", "cv.bootstrap=100", "train.epochs=1",
              "train.max_steps_per_epoch=2", "predict.heatmaps=false", "cv.baseline=false", "cv.inner_val_trains=true"]
    for bad in (["train.select=balanced_accuracy"], ["cv.grid={train.lr: [0.001]}"]):
        with pytest.raises(ConfigError, match="cv.inner_val_trains=true trains on the inner val's cases"):
            run_cv(make_config(source, *common, *bad, "run.name=trains-bad"))
    cfg = make_config(source, *common, "train.select=last", "run.name=trains")
    report = run_cv(cfg)
    assert report["n_images"] == 12 and report["failed_folds"] == []
    with (cfg.dir / "folds.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for fold in (0, 1):
        cases = {phase: {r["case"] for r in rows if r["fold"] == str(fold) and r["phase"] == phase}
                 for phase in ("train", "val", "test")}
        assert all(cases.values()) and not cases["test"] & (cases["train"] | cases["val"])
        tiles = cfg.dir / "repeat-0" / f"fold-{fold}" / "tiles"
        # the inner val's cases are tiled into the training phase as well as their own; the test cases nowhere
        assert _shard_cases(sorted(tiles.glob("train/*.h5"))) == cases["train"] | cases["val"]
        assert _shard_cases(sorted(tiles.glob("val/*.h5"))) == cases["val"]


def test_baseline_fits_on_one_blas_thread_with_the_same_predictions(records, monkeypatch):
    """The baseline's small fits run on one BLAS thread (two ran 24x slower beside two busy processes) and predict
    what they predict with every thread; the thread setting is restored after."""
    from threadpoolctl import threadpool_info, threadpool_limits

    import lymphoma.baseline as baseline

    cohort, folds = _small_cohort(records, [2] * 9)
    seen: list[int] = []
    real = baseline._classifier
    monkeypatch.setattr(baseline, "_classifier",
                        lambda c: seen.append(max(i["num_threads"] for i in threadpool_info())) or real(c))
    with threadpool_limits(2):
        one = baseline.cv_records(cohort, folds, seed=0)
        assert seen and set(seen) == {1}
        assert {i["num_threads"] for i in threadpool_info()} == {2}
        with monkeypatch.context() as patch:
            patch.setattr("threadpoolctl.threadpool_limits", lambda *_: threadpool_limits(2))
            every = baseline.cv_records(cohort, folds, seed=0)
    assert [[r["majority_class"] for r in fold] for fold in one] == [[r["majority_class"] for r in fold] for fold in every]


def _small_cohort(records: list[ImageRecord], images_per_case: list[int]):
    """A baseline cohort of 3 real cases per class (``images_per_case[i]`` images of the i-th, CLL's first) and
    3 folds that each hold one case of every class."""
    import numpy as np

    import lymphoma.baseline as baseline

    by_case: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in records:
        by_case[record.case].append(record)
    cases = [c for label in ("CLL", "FL", "MCL") for c in sorted(c for c in by_case if by_case[c][0].label == label)[:3]]
    chosen = [r for c, n in zip(cases, images_per_case) for r in by_case[c][:n]]
    classes = ["CLL", "FL", "MCL"]
    cohort = baseline.Cohort([Path(r.path).stem for r in chosen], [r.path for r in chosen],
                             baseline.cohort_features([r.path for r in chosen]),
                             np.asarray([classes.index(r.label) for r in chosen]), np.asarray([r.case for r in chosen]),
                             classes)
    return cohort, [cases[i::3] for i in range(3)]


def test_baseline_balanced_by_case_weighs_every_case_alike(records):
    """``balance="cases"``: every case of a class carries the same total weight however many images it has, every
    class the same total, mean weight 1; its CV predicts every test image once, with probabilities that differ from
    balance by image count; any other balance is an error naming the allowed ones."""
    import numpy as np

    import lymphoma.baseline as baseline

    cohort, folds = _small_cohort(records, [1, 2, 4, 3, 1, 2, 4, 2, 1])
    weights = baseline.case_weights(cohort.labels, cohort.cases)
    assert weights.mean() == pytest.approx(1.0)
    case_totals = {c: weights[cohort.cases == c].sum() for c in np.unique(cohort.cases)}
    for k in range(3):
        in_class = {c: t for c, t in case_totals.items() if cohort.labels[cohort.cases == c][0] == k}
        assert len(in_class) == 3 and max(in_class.values()) == pytest.approx(min(in_class.values()))
        assert weights[cohort.labels == k].sum() == pytest.approx(len(weights) / 3)
    by_case = baseline.cv_records(cohort, folds, seed=0, balance="cases")
    by_image = baseline.cv_records(cohort, folds, seed=0)
    assert sorted(r["path"] for fold in by_case for r in fold) == sorted(cohort.paths)
    probs = [[r["mean_probs"][c] for c in cohort.classes] for fold in by_case for r in fold]
    assert np.allclose(np.sum(probs, axis=1), 1.0)
    assert not np.allclose(probs, [[r["mean_probs"][c] for c in cohort.classes] for fold in by_image for r in fold])
    with pytest.raises(ValueError, match="use one of images, cases"):
        baseline.cv_records(cohort, folds, seed=0, balance="slides")
