"""Test-time batch-norm adaptation, a lever of the science issue measured on the trained folds of a `lymphoma cv`
run: every test image predicted again by the fold model that never saw its patient, with the network's batch-norm
statistics taken from the test tiles themselves instead of the training's running averages (AdaBN, Li et al.
2016: a label-free answer to a shift of stain or scanner between the training cohort and a new patient).

Modes, all on exactly the same models and tiles: ``running`` (the checkpoint as `lymphoma predict` runs it; its
probabilities are checked against the fold's saved ones), ``case`` (statistics over all tiles of the test case's
images: what a site sees when it predicts one patient's slides together), ``image`` (over each image's own tiles).
Scores: pooled image and case accuracy by majority vote per fold assignment, as the CV report counts them
(`cv_aggregates.scores`), then mean +- sd over the assignments and each mode less ``running``, paired.

    .venv/bin/python bench/cv_bn_adapt.py runs/<cv run> [--out bench/results/cv-bn-adapt.json]
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from cv_aggregates import scores, summary

from common import emit
from jobs.fold import variant_suffix
from lymphoma.augment import eval_batch
from lymphoma.prediction import Predictor
from lymphoma.tile_sources import open_normalized_tiles
from lymphoma.voting import vote

MODES = ("running", "case", "image")


def read_tiles(predictor: Predictor, path: str) -> np.ndarray:
    """All tiles of one image ``[N, H, W, 3]`` uint8, stain-normalised as `lymphoma predict` does."""
    source = open_normalized_tiles(path, predictor.tiles, predictor.normalizer, scale=predictor.scale)
    return np.concatenate(list(source.batches))


def adapted(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """A copy of ``model`` whose batch-norm layers hold the statistics of the batch ``x`` (one pass, exact
    mean and unbiased variance over it); everything else in eval mode."""
    model = copy.deepcopy(model).eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative: after one batch, exactly that batch's statistics
        m.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def probabilities(predictor: Predictor, tiles: list[np.ndarray], mode: str) -> list[np.ndarray]:
    """Each image's tile probabilities under one mode; ``tiles`` are one case's images."""
    if mode == "running":
        return [predictor.logits(t, stain_normalized=True).softmax(1).numpy() for t in tiles]
    xs = [eval_input(predictor, t) for t in tiles]
    case_model = adapted(predictor.model, torch.cat(xs)) if mode == "case" else None
    with torch.no_grad():
        return [(case_model or adapted(predictor.model, x))(x).float().softmax(1).numpy() for x in xs]


def eval_input(predictor: Predictor, tiles: np.ndarray) -> torch.Tensor:
    """The model's input for uint8 tiles, as `Predictor.logits` makes it."""
    return eval_batch(tiles, predictor.augment, predictor.device).contiguous(memory_format=torch.channels_last)


def fold_predictor(run: Path, repeat: int, fold: str) -> tuple[Predictor, Path]:
    """A fold's model as the run predicted with it (its cv.checkpoint, on the CPU) and the folder of that
    prediction's per-slide outputs."""
    fold_dir = run / f"repeat-{repeat}" / f"fold-{fold}"
    checkpoint = yaml.safe_load((run / "config.yaml").read_text())["cv"]["checkpoint"]
    predictor = Predictor.from_checkpoint(fold_dir / "train" / "checkpoints" / f"{checkpoint}.pt", torch.device("cpu"))
    return predictor, fold_dir / f"predict{variant_suffix(checkpoint, False)}" / "slides"


def fold_images(run: Path, repeat: int, fold: str, rows: list[dict[str, str]]) -> dict[str, list[dict[str, Any]]]:
    """One fold's test images under every mode; checks ``running`` against the fold's saved probabilities."""
    predictor, saved_dir = fold_predictor(run, repeat, fold)
    by_case: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        if int(r["repeat"]) == repeat and r["fold"] == fold and r["phase"] == "test":
            by_case[r["case"]].append(r)
    out: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for case, items in sorted(by_case.items()):
        tiles = [read_tiles(predictor, r["path"]) for r in items]
        for mode in MODES:
            for r, probs in zip(items, probabilities(predictor, tiles, mode)):
                out[mode].append({"label": r["label"], "case": case, "path": r["path"], "probs": probs,
                                  "classes": predictor.classes})
    for image in out["running"]:
        with np.load(saved_dir / f"{Path(image['path']).stem}.npz") as saved:
            gap = float(np.abs(saved["probs"] - image["probs"]).max())
        if gap > 1e-4:
            raise SystemExit(f"{image['path']}: probabilities differ from the fold's saved ones by {gap}")
    return out


def recall(images: list[dict[str, Any]]) -> dict[str, float]:
    """Each class's share of its images that the majority vote names, over all assignments."""
    classes = images[0]["classes"]
    right, total = np.zeros(len(classes)), np.zeros(len(classes))
    for image in images:
        truth = classes.index(image["label"])
        total[truth] += 1
        right[truth] += vote(image["probs"]).majority == truth
    return {c: round(float(r / t), 3) for c, r, t in zip(classes, right, total) if t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a `lymphoma cv` run folder (predicted with the torch engine)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = list(csv.DictReader((args.run / "folds.csv").open()))
    per: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    pooled: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for repeat in sorted({int(r["repeat"]) for r in rows}):
        images: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
        for fold in sorted({r["fold"] for r in rows if int(r["repeat"]) == repeat}, key=int):
            for mode, items in fold_images(args.run, repeat, fold, rows).items():
                images[mode] += items
        for mode in MODES:
            per[mode].append(scores(images[mode], "vote"))
            pooled[mode] += images[mode]
        print(json.dumps({"repeat": repeat, **{m: per[m][-1] for m in MODES}}), flush=True)
    results: dict[str, Any] = {"run": str(args.run)}
    for mode in MODES:
        values = np.array(per[mode])
        gain = values - np.array(per["running"])
        results[mode] = {f"{level}_{key}": value for i, level in enumerate(("image", "case"))
                         for key, value in summary(values[:, i]).items()}
        results[mode].update({f"{level}_less_running": summary(gain[:, i]) for i, level in enumerate(("image", "case"))})
        results[mode]["image_recall_pooled"] = recall(pooled[mode])
    emit(results, args.out)


if __name__ == "__main__":
    main()
