"""The reference baseline of `lymphoma cv`: a strongly regularised logistic regression on colour and texture
features of whole images after Reinhard normalisation, run in the same case-grouped folds as the CNN, with a
case-level label-permutation null. A deep model that does not beat it has learnt stain statistics, not
sub-types.

Features per image (scikit-image): RGB percentiles, haematoxylin and eosin optical-density statistics,
uniform LBP histograms of the grey and haematoxylin images, GLCM contrast, dissimilarity, homogeneity,
energy and correlation at three distances on both. The regularisation strength is chosen by an inner
case-grouped CV on the training cases of each fold only. Classes are balanced by their image counts; ``balance=
"cases"`` weighs every case of a class alike instead (measured in bench/cv_baseline_levers.py: no better here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lymphoma.cohort_report import probability_record
from lymphoma.images import read_rgb
from lymphoma.levels import confusions
from lymphoma.metrics import accuracy
from lymphoma.settings import StainSettings
from lymphoma.stain import StainNormalizer, fit_target

C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")
GLCM_DISTANCES = (1, 2, 4)


def _lbp_histogram(channel: np.ndarray, points: int, radius: int) -> np.ndarray:
    from skimage.feature import local_binary_pattern

    codes = local_binary_pattern(channel, points, radius, method="uniform")
    return np.bincount(codes.astype(np.int64).ravel(), minlength=points + 2) / codes.size


def _stretch(channel: np.ndarray, top: int) -> np.ndarray:
    """A float channel stretched between its 1st and 99th percentiles to the integers 0..top."""
    lo, hi = np.percentile(channel, [1, 99])
    return np.clip((channel - lo) / max(hi - lo, 1e-6) * top, 0, top).astype(np.uint8)


def _glcm(channel: np.ndarray, levels: int = 32) -> np.ndarray:
    from skimage.feature import graycomatrix, graycoprops

    quantised = _stretch(channel, levels - 1)
    matrix = graycomatrix(quantised, GLCM_DISTANCES, [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=levels,
                          symmetric=True, normed=True)
    return np.concatenate([graycoprops(matrix, prop).mean(axis=1) for prop in GLCM_PROPS])


def image_features(rgb: np.ndarray) -> np.ndarray:
    """The feature vector of one uint8 ``[H, W, 3]`` image (already stain-normalised)."""
    from skimage.color import rgb2gray, rgb2hed

    grey = rgb2gray(rgb)
    hed = rgb2hed(rgb)
    h, e = hed[..., 0], hed[..., 1]
    colour = np.percentile(rgb.reshape(-1, 3), [5, 25, 50, 75, 95], axis=0).ravel() / 255
    stains = np.concatenate([[c.mean(), c.std(), *np.percentile(c, [10, 50, 90])] for c in (h, e)])
    grey8 = (grey * 255).astype(np.uint8)
    texture = [_lbp_histogram(grey8, 8, 1), _lbp_histogram(grey8, 16, 2), _lbp_histogram(_stretch(h, 255), 8, 1),
               _glcm(grey), _glcm(h)]
    return np.concatenate([colour, stains, *texture]).astype(np.float64)


def _features_of_files(paths: Sequence[str], stain: StainSettings,
                       describe: Callable[[np.ndarray], Any] = image_features) -> np.ndarray:
    target = fit_target(stain)
    normalizer = StainNormalizer(target) if target is not None else None
    rows = []
    for path in paths:
        rgb = read_rgb(path)
        rows.append(np.asarray(describe(normalizer(rgb) if normalizer is not None else rgb), np.float64))
    return np.stack(rows)


def cohort_features(paths: Sequence[str], stain: StainSettings = StainSettings("reinhard"), workers: int = 1,
                    describe: Callable[[np.ndarray], Any] = image_features) -> np.ndarray:
    """``[N, D]`` features of the images at ``paths``, each normalised whole to the stain target first, in
    ``workers`` processes; ``describe`` (a module-level function, for the processes) makes one image's vector."""
    if workers <= 1 or len(paths) < 2 * workers:
        return _features_of_files(paths, stain, describe)
    from concurrent.futures import ProcessPoolExecutor

    chunks = [list(paths[i::workers]) for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_features_of_files, chunks, [stain] * workers, [describe] * workers))
    out = np.empty((len(paths), parts[0].shape[1]))
    for i, part in enumerate(parts):
        out[i::workers] = part
    return out


@dataclass(frozen=True)
class Cohort:
    """Features and truth of every image: ``labels`` are class indices, ``cases`` the patient of each image."""

    keys: list[str]
    paths: list[str]
    features: np.ndarray
    labels: np.ndarray
    cases: np.ndarray
    classes: list[str]


BALANCES = ("images", "cases")


def _classifier(c: float) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=5000))


def case_weights(y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Sample weights that give every case the same total weight, then every class the same total (mean 1):
    class balance counted by case, so that a patient with many images does not outweigh one with few."""
    weights = np.zeros(len(y))
    for case in np.unique(groups):
        weights[groups == case] = 1.0 / np.sum(groups == case)
    for k in np.unique(y):
        weights[y == k] /= weights[y == k].sum()
    return weights * len(y) / weights.sum()


def fit_reference(c: float, x: np.ndarray, y: np.ndarray, groups: np.ndarray, balance: str) -> Any:
    """The classifier at ``c`` fitted with classes balanced by image count (``images``) or by case (``cases``)."""
    if balance == "images":
        return _classifier(c).fit(x, y)
    if balance == "cases":
        model = _classifier(c).set_params(logisticregression__class_weight=None)
        return model.fit(x, y, logisticregression__sample_weight=case_weights(y, groups))
    raise ValueError(f"baseline balance {balance!r}: use one of {', '.join(BALANCES)}")


def fewest_cases(y: np.ndarray, groups: np.ndarray) -> int:
    """The number of cases of the class with the fewest (bounds the folds of a class-stratified grouped split)."""
    return min(len(np.unique(groups[y == k])) for k in np.unique(y))


def choose_c(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int, balance: str = "images") -> float:
    """The C of ``C_GRID`` with the best balanced accuracy over an inner case-grouped CV (3 folds, fewer when
    a class has fewer cases); ties go to the stronger regularisation."""
    from sklearn.model_selection import StratifiedGroupKFold

    splits = min(3, fewest_cases(y, groups))
    if splits < 2:
        return C_GRID[len(C_GRID) // 2]
    folds = list(StratifiedGroupKFold(splits, shuffle=True, random_state=seed).split(x, y, groups))
    scores = []
    for c in C_GRID:
        per_fold = []
        for train, test in folds:
            predicted = fit_reference(c, x[train], y[train], groups[train], balance).predict(x[test])
            recalls = [np.mean(predicted[y[test] == k] == k) for k in np.unique(y[test])]
            per_fold.append(np.mean(recalls))
        scores.append(np.mean(per_fold))
    return C_GRID[int(np.argmax(scores))]


def fold_records(cohort: Cohort, labels: np.ndarray, test_cases: Sequence[str], seed: int,
                 balance: str = "images") -> list[dict[str, Any]]:
    """Fit on every case outside ``test_cases`` (C chosen inside them) and predict the test images, as
    records shaped like prediction records (one image = one unit, so vote and mean agree)."""
    test = np.isin(cohort.cases, list(test_cases))
    x, y, groups = cohort.features[~test], labels[~test], cohort.cases[~test]
    c = choose_c(x, y, groups, seed, balance)
    model = fit_reference(c, x, y, groups, balance)
    probs = np.zeros((int(test.sum()), len(cohort.classes)))
    probs[:, model.classes_] = model.predict_proba(cohort.features[test])
    return [probability_record(p, cohort.classes, key=cohort.keys[i], path=cohort.paths[i],
                               label=cohort.classes[labels[i]], case=str(cohort.cases[i]), c=c)
            for i, p in zip(np.flatnonzero(test), probs)]


def cv_records(cohort: Cohort, folds: Sequence[Sequence[str]], seed: int, labels: np.ndarray | None = None,
               balance: str = "images") -> list[list[dict[str, Any]]]:
    """Every fold's test records (``labels`` replaces the truth, for the permutation null; ``balance``: classes
    weighted by their ``images`` or their ``cases``). BLAS runs on one thread: these fits are too small to share
    (with two, 24x slower beside a CV run's two processes on 2 cores)."""
    import sklearn.linear_model  # noqa: F401  (its BLAS and OpenMP libraries loaded first, so the limit holds them)
    from threadpoolctl import threadpool_limits

    labels = cohort.labels if labels is None else labels
    with threadpool_limits(1):
        return [fold_records(cohort, labels, test_cases, seed, balance) for test_cases in folds]


def permuted_labels(cohort: Cohort, rng: np.random.Generator) -> np.ndarray:
    """The truth with the cases' classes shuffled among the cases: every image of a case keeps one class."""
    cases = np.unique(cohort.cases)
    case_label = {case: cohort.labels[cohort.cases == case][0] for case in cases}
    shuffled = dict(zip(cases, rng.permutation([case_label[c] for c in cases])))
    return np.asarray([shuffled[c] for c in cohort.cases])


def pooled_accuracy(records_by_fold: Sequence[Sequence[dict[str, Any]]], classes: Sequence[str]) -> tuple[float, float]:
    """Image- and case-level accuracy of all folds' records together."""
    image, case = confusions([r for fold in records_by_fold for r in fold], classes)
    return accuracy(image), accuracy(case)


def permutation_null(cohort: Cohort, folds: Sequence[Sequence[str]], seed: int, permutations: int,
                     observed: tuple[float, float], balance: str = "images") -> dict[str, Any]:
    """The whole baseline CV (C chosen inside each fold) rerun on case-permuted labels: the accuracies a
    model reaches when features say nothing of the class, and the p-value of the observed ones."""
    if permutations == 0:
        return {"permutations": 0}
    rng = np.random.default_rng(seed)
    draws = np.asarray([pooled_accuracy(cv_records(cohort, folds, seed, permuted_labels(cohort, rng), balance),
                                        cohort.classes) for _ in range(permutations)]).reshape(-1, 2)
    out: dict[str, Any] = {"permutations": permutations}
    for j, level in enumerate(("image", "case")):
        values = draws[:, j]
        out[level] = {"mean": float(values.mean()), "sd": float(values.std()),
                      "p95": float(np.percentile(values, 95)) if len(values) else float("nan"),
                      "p_value": float((1 + np.sum(values >= observed[j])) / (1 + len(values)))}
    return out
