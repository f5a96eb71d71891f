"""Seed ensembles, a lever of the science issue: `lymphoma cv` runs of one config on the same fold assignments that
differ only in ``train.seed`` (initial weights, tile order, augmentation), each test image's tile probabilities
averaged over the runs' fold models before the vote. It measures how much of the CNN's error is the noise of one
training (an ensemble removes it) and how much is what every training learns alike (it does not).

Scores as the CV report counts them (`cv_aggregates.scores`: pooled image and case accuracy of the majority vote per
fold assignment); each run alone, the ensemble, and the ensemble less the mean of its members, paired by
assignment; and over all assignments, how many images the first two runs vote alike and how many both get wrong.

    .venv/bin/python bench/cv_seed_ensemble.py runs/<cv run> runs/<cv run, train.seed=1> [...] [--out F]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from cv_aggregates import fold_images, scores, summary

from common import emit
from lymphoma.voting import vote


def check_same_folds(runs: list[Path]) -> list[int]:
    """The repeats the runs share; refuses runs whose folds differ (an ensemble across folds would leak)."""
    first = (runs[0] / "folds.csv").read_text()
    for run in runs[1:]:
        if (run / "folds.csv").read_text() != first:
            raise SystemExit(f"{run}/folds.csv differs from {runs[0]}/folds.csv: the runs must share cv.seed, "
                             "cv.folds and cv.repeats")
    return sorted(int(p.name.split("-")[1]) for p in runs[0].glob("repeat-*"))


def averaged(members: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each image of the first member with its tile probabilities averaged over all members."""
    by_path = [{image["path"]: image for image in images} for images in members]
    out = []
    for image in members[0]:
        stack = [m[image["path"]]["probs"] for m in by_path]
        if any(s.shape != stack[0].shape for s in stack):
            raise SystemExit(f"{image['path']}: the runs cut it into different tiles")
        out.append({**image, "probs": np.mean(stack, axis=0)})
    return out


def agreement(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> tuple[int, int, int, int]:
    """The images, those the two runs vote alike, those each run gets wrong, and those both get wrong."""
    other = {image["path"]: image for image in second}
    same = wrong_a = wrong_b = both = 0
    for image in first:
        classes, label = image["classes"], image["label"]
        a = classes[vote(image["probs"]).majority]
        b = classes[vote(other[image["path"]]["probs"]).majority]
        same += a == b
        wrong_a, wrong_b, both = wrong_a + (a != label), wrong_b + (b != label), both + (a != label and b != label)
    return len(first), same, wrong_a, wrong_b, both


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="`lymphoma cv` run folders of the same folds")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if len(args.runs) < 2:
        raise SystemExit("an ensemble needs two runs or more")
    repeats = check_same_folds(args.runs)
    per_run, ensemble, agree = [], [], np.zeros(5, int)
    for repeat in repeats:
        members = [fold_images(run, repeat) for run in args.runs]
        if len({len(m) for m in members}) != 1:
            raise SystemExit(f"repeat {repeat}: the runs predicted different numbers of images")
        per_run.append([scores(m, "vote") for m in members])
        ensemble.append(scores(averaged(members), "vote"))
        agree += agreement(members[0], members[1])
    runs, joint = np.array(per_run), np.array(ensemble)  # [repeat, run, level], [repeat, level]
    results: dict[str, Any] = {"runs": [str(r) for r in args.runs],
                               "first_two_runs_pooled": dict(zip(("images", "same_vote", "wrong_first", "wrong_second",
                                                                  "wrong_both"), agree.tolist()))}
    for i, level in enumerate(("image", "case")):
        results[level] = {"members": [summary(runs[:, k, i]) for k in range(len(args.runs))],
                          "ensemble": summary(joint[:, i]),
                          "ensemble_less_members_mean": summary(joint[:, i] - runs[:, :, i].mean(1)),
                          "second_less_first": summary(runs[:, 1, i] - runs[:, 0, i])}
    emit(results, args.out)


if __name__ == "__main__":
    main()
