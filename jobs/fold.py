"""One cross-validation fold as an array task: tile its training cases, train (for every point of the
hyper-parameter grid, if any, choosing on the inner val alone), predict its test cases."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from hpc.task import task_setup
from jobs.config import ConfigError
from jobs.predict import predict_chunk
from jobs.progress import WatchedTraining
from jobs.run_folder import Run
from jobs.tile import tile_in_process
from jobs.train import fit_here, fit_settings
from lymphoma.cohort_report import write_report
from lymphoma.files import write_text_atomic
from lymphoma.inputs import ImageRecord
from lymphoma.prediction import SlideInput
from lymphoma.split import check_no_leakage
from lymphoma.stain import tiling_stain

GRID_SECTIONS = ("train", "model", "augment", "stain", "tiles")


@dataclass(frozen=True)
class FoldTask:
    """One fold: its run (the config, working in ``repeat-<r>/fold-<k>``), the images it may learn from (train,
    and the inner val that picks the checkpoint and the grid point) and the test images it predicts; picklable."""

    run: Run
    fold: int
    repeat: int
    train: tuple[ImageRecord, ...]
    val: tuple[ImageRecord, ...]
    test: tuple[ImageRecord, ...]
    classes: tuple[str, ...]
    threads: int

    @property
    def fold_dir(self) -> Path:
        return self.run.dir

    @property
    def checkpoint(self) -> str:
        return self.run.config.cv.checkpoint

    @property
    def predict_dir(self) -> Path:
        return self.run.dir / f"predict{variant_suffix(self.checkpoint, self.run.config.predict.tta)}"

    def slides(self) -> list[SlideInput]:
        return [SlideInput(r.path, r.key, r.label, r.case, r.regions) for r in self.test]


def variant_suffix(checkpoint: str, tta: bool) -> str:
    """How the folders of a prediction variant are told apart: ``-last`` for the last epoch, ``-tta``."""
    return ("-last" if checkpoint == "last" else "") + ("-tta" if tta else "")


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values (``{"train.lr": [1e-3, 3e-3], ...}``); ``[{}]`` without a grid."""
    for key, values in grid.items():
        if key.split(".")[0] not in GRID_SECTIONS or "." not in key:
            raise ConfigError(f"cv.grid key {key!r} must be a setting of {', '.join(GRID_SECTIONS)} "
                              "(e.g. train.lr)")
        if not values:
            raise ConfigError(f"cv.grid.{key} has no values; give a list such as [0.001, 0.003]")
    keys = sorted(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


class FoldJob(submitit.helpers.Checkpointable):
    """A fold's array task. Every stage resumes (complete shards, last.pt, complete slides), so a requeued
    or rerun fold continues where it stopped."""

    def __call__(self, task: FoldTask) -> dict[str, Any]:
        check_no_leakage({"train": task.train, "val": task.val, "test": task.test})
        predict = task.run.config.predict
        with task_setup(task.threads) as setup:
            seconds = {"tile": 0.0, "train": 0.0, "predict": 0.0}
            summary = train_fold(task, setup.device, seconds)
            start = time.perf_counter()
            records = predict_chunk(task.fold_dir / "train" / "checkpoints" / f"{task.checkpoint}.pt", task.slides(),
                                    task.predict_dir / "slides", predict, setup.device)
        write_report(records, list(task.classes), task.predict_dir, predict.aggregate)
        seconds["predict"] = time.perf_counter() - start
        write_text_atomic(task.predict_dir / "seconds.json", json.dumps(seconds) + "\n")
        return {"fold": task.fold, "train": summary, "seconds": seconds}


def _fit(task: FoldTask, run: Run, tiles_dir: Path, device: Any, seconds: dict[str, float]) -> dict[str, Any]:
    """Tile (complete shards are kept) and train (resuming) one configuration into ``run.train``, on the inner
    val's cases too with ``cv.inner_val_trains``; adds each stage's seconds."""
    start = time.perf_counter()
    trains = list(task.train) + (list(task.val) if run.config.cv.inner_val_trains else [])
    tile_in_process({"train": trains, "val": list(task.val)}, tiles_dir, list(task.classes),
                    run.config.tiles, tiling_stain(run.config.stain))
    seconds["tile"] += time.perf_counter() - start
    start = time.perf_counter()
    summary = fit_here(run, tiles_dir, run.train, fit_settings(run, eval_phase="val"), device)
    seconds["train"] += time.perf_counter() - start
    return summary


def point_runs(task: FoldTask) -> list[tuple[dict[str, Any], Run]]:
    """Each point of the fold's grid with its run, working in ``<fold>/grid-<i>``; without a grid, the fold's own
    run alone (``[({}, run)]``)."""
    points = grid_points(dict(task.run.config.cv.grid))
    if points == [{}]:
        return [({}, task.run)]
    return [(point, task.run.with_values(point).at(task.fold_dir / f"grid-{i}")) for i, point in enumerate(points)]


def fold_trainings(task: FoldTask) -> list[WatchedTraining]:
    """The trainings a fold runs (one, or one per grid point), where each writes its history: for the epoch bar."""
    return [WatchedTraining(run.train / "history.json", run.config.train) for _, run in point_runs(task)]


def train_fold(task: FoldTask, device: Any, seconds: dict[str, float]) -> dict[str, Any]:
    """Train the fold into ``<fold>/train``. With a grid, train every point into ``<fold>/grid-<i>`` (its own
    tiles when the point changes tiling), keep the point whose kept epoch scored the best inner-val balanced
    accuracy (lower val loss breaks ties), link ``<fold>/train`` to it and write ``<fold>/grid.json``."""
    fold_dir = task.fold_dir
    runs = point_runs(task)
    if not runs[0][0]:  # no grid: the fold's own run
        return _fit(task, task.run, task.run.tiles, device, seconds)
    results = []
    for point, run in runs:
        own_tiles = any(key.startswith("tiles.") for key in point)
        summary = _fit(task, run, run.tiles if own_tiles else task.run.tiles, device, seconds)
        results.append({"point": point, "balanced_accuracy": summary["best_val_balanced_accuracy"],
                        "val_loss": summary["best_val_loss"], "epoch": summary["best_epoch"]})
    best = max(range(len(results)), key=lambda i: (results[i]["balanced_accuracy"], -results[i]["val_loss"], -i))
    link = fold_dir / "train"
    tmp = fold_dir / ".train-link"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(Path(f"grid-{best}") / "train", target_is_directory=True)
    tmp.replace(link)
    write_text_atomic(fold_dir / "grid.json", json.dumps({"chosen": best, "points": results}, indent=1) + "\n")
    return {**results[best], "grid_point": best}
