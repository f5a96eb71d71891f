"""`lymphoma run`: tile -> train -> predict the held-out cases -> report, the whole pipeline in one command."""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path
from typing import Any

from jobs.predict import PredictRequest, PredictResult, format_report, run_predict
from jobs.run_folder import Run
from jobs.tile import format_summary, run_tile
from jobs.train import run_train
from lymphoma.errors import InputError
from lymphoma.inputs import image_keys
from lymphoma.prediction import SlideInput
from lymphoma.run_report import write_run_report
from lymphoma.selection import at_chance

log = logging.getLogger(__name__)


def held_out_slides(split_csv: Path, phase: str) -> list[SlideInput]:
    """The images of ``phase`` in the run's split, with their truth and case."""
    with split_csv.open(newline="") as handle:
        every = list(csv.DictReader(handle))
    keys = ([row["key"] for row in every] if every and "key" in every[0]
            else image_keys([Path(row["path"]) for row in every]))  # a split.csv written before its key column
    rows = [(row, key) for row, key in zip(every, keys) if row["phase"] == phase]
    if not rows:
        raise InputError(f"{split_csv}: no {phase!r} images to predict; set split.val_fraction (or "
                         "split.test_fraction and predict the test phase)")
    return [SlideInput(row["path"], key, row["label"], row["case"], row.get("regions") or "") for row, key in rows]


def run_pipeline(run: Run, progress: bool = True, restart: bool = False) -> dict[str, Any]:
    """Run every stage, printing where each output is; reruns resume every stage (``restart``: training afresh, the
    earlier ``train/`` kept aside)."""
    start = time.perf_counter()
    run.config.check_trainable()
    log.info("== 1/3 tile")
    tiled = run_tile(run, progress=progress)
    log.info(format_summary(tiled))
    log.info("== 2/3 train")
    summary = run_train(run, restart, progress=progress)[0]
    log.info(f"best epoch {summary['best_epoch'] + 1} of {summary['epochs']}: val loss {summary['best_val_loss']:.4f}, "
             f"val tile accuracy {summary['best_val_accuracy']:.3f}; kept {summary['selection']}; checkpoints in "
             f"{summary['checkpoints']}")
    if at_chance(summary["best_val_balanced_accuracy"], len(summary["classes"])):
        log.warning("the kept model predicts one class for every validation tile (balanced accuracy at chance): "
                    "it has not learnt the sub-types; train longer (train.epochs) and judge models with `lymphoma cv`")
    phase = "test" if run.config.split.test_fraction > 0 else "val"
    log.info(f"== 3/3 predict the held-out {phase} images")
    request = PredictRequest(run.checkpoints / "best.pt", slides=tuple(held_out_slides(run.split_csv, phase)),
                             replace=True)  # the run's predictions follow its model
    result: PredictResult = run_predict(run, request, progress)
    log.info(format_report(result))
    for note in result.notes:  # e.g. the val cases chose the epoch kept (train.select): no held-out figure
        log.warning(f"lymphoma run: {note}")
    minutes = (time.perf_counter() - start) / 60
    page = write_run_report(run.dir)
    log.info(f"== done in {minutes:.1f} min; run folder {run.dir}: config.yaml, split.csv, tiles/, train/ "
             f"(checkpoints/, tensorboard/, history.json), predict/; all of it on one page: {page}")
    return {"tile": tiled, "train": summary, "predict": result}


def command(args: argparse.Namespace, run: Run) -> int:
    """``lymphoma run``."""
    run_pipeline(run, progress=not args.no_progress, restart=args.restart)
    return 0
