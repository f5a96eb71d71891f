"""Do a trained fold model's features name the patient? A diagnostic for the case adversary (`train.case_adversary`)
on the fold models of a `lymphoma cv` run: the pooled features (the classifier's input) of every tile of the
fold's training cases (train and inner val), and a linear probe (standardised features, logistic regression) that
names each tile's case among the training cases of its class, scored on images it did not see (5 folds grouped by
image), against chance (one over the class's cases). Two inputs: the tiles as prediction sees them (``eval``), and
one training-augmented view of each (``augmented``: the `batch` backend, random crop, flips, rotations, HED and
HSV jitter as configured) as the adversary's head sees them in training.

    .venv/bin/python bench/case_probe.py runs/<cv run> [--repeat 0] [--out F]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cv_bn_adapt import eval_input, fold_predictor, read_tiles
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common import emit
from lymphoma.adversary import classifier_layer
from lymphoma.batch_augment import BatchAugmenter
from lymphoma.prediction import Predictor


def fold_features(predictor: Predictor, rows: list[dict[str, str]]) -> dict[str, Any]:
    """Pooled features of every tile of ``rows``' images, eval and augmented, with each tile's case, class and image."""
    captured: list[np.ndarray] = []
    hook = classifier_layer(predictor.model).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().float().numpy()))
    augmenter = BatchAugmenter(predictor.augment, True, predictor.device, 0, None)
    out: dict[str, Any] = {"eval": [], "augmented": [], "case": [], "label": [], "image": []}
    with torch.no_grad():
        for r in rows:
            tiles = read_tiles(predictor, r["path"])
            predictor.model(eval_input(predictor, tiles))
            out["eval"].append(captured.pop())
            view = augmenter.batch(torch.from_numpy(tiles)).contiguous(memory_format=torch.channels_last)
            predictor.model(view)
            out["augmented"].append(captured.pop())
            for key, value in (("case", r["case"]), ("label", r["label"]), ("image", r["path"])):
                out[key] += [value] * len(tiles)
    hook.remove()
    return {k: np.concatenate(v) if k in ("eval", "augmented") else np.asarray(v) for k, v in out.items()}


def probe(x: np.ndarray, cases: np.ndarray, images: np.ndarray) -> float:
    """Share of tiles whose case a linear probe names, on images held out (5 folds grouped by image)."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    right = 0
    for train, test in GroupKFold(5).split(x, cases, images):
        model.fit(x[train], cases[train])
        right += int((model.predict(x[test]) == cases[test]).sum())
    return right / len(cases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a `lymphoma cv` run folder")
    parser.add_argument("--repeat", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [r for r in csv.DictReader((args.run / "folds.csv").open())
            if int(r["repeat"]) == args.repeat and r["phase"] in ("train", "val")]
    results: dict[str, Any] = {"run": str(args.run), "repeat": args.repeat, "folds": {}}
    for fold in sorted({r["fold"] for r in rows}, key=int):
        predictor, _ = fold_predictor(args.run, args.repeat, fold)
        found = fold_features(predictor, [r for r in rows if r["fold"] == fold])
        per_class = {}
        for label in sorted(set(found["label"])):
            mine = found["label"] == label
            n = len(set(found["case"][mine]))
            if n > 1:
                per_class[label] = {"cases": n, "chance": round(1 / n, 3), **{
                    view: round(probe(found[view][mine], found["case"][mine], found["image"][mine]), 3)
                    for view in ("eval", "augmented")}}
        results["folds"][fold] = per_class
        print(fold, per_class, flush=True)
    emit(results, args.out)


if __name__ == "__main__":
    main()
