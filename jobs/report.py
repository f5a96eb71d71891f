"""`lymphoma report`: the run folder on one self-contained HTML page (lymphoma.run_report)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from jobs.predict import MARKER as PREDICTION_MARKER
from jobs.run_folder import Run
from lymphoma.errors import InputError
from lymphoma.run_report import write_run_report

log = logging.getLogger(__name__)


def command(args: argparse.Namespace, run: Run) -> int:
    """Write ``<run folder>/report.html`` (prediction from ``--predict``, default ``<run>/predict``, or the folder
    itself where it is a `lymphoma predict` --out folder)."""
    if not run.dir.is_dir():
        raise InputError(f"run folder {run.dir} does not exist; give the path of a run folder made before "
                         "(`lymphoma report runs/<name>`), or its -c config or run.root and run.name")
    predict = Path(args.predict) if args.predict else None
    if predict is None and (run.dir / PREDICTION_MARKER).is_file():  # `lymphoma report preds/`: a prediction's folder
        predict = run.dir
    if predict is not None and not (predict / "metrics.json").is_file():
        raise InputError(f"--predict {predict}: no prediction there (its metrics.json is missing); give the --out "
                         "folder of a `lymphoma predict` that has finished")
    log.info(f"report: {write_run_report(run.dir, predict)}")
    return 0
