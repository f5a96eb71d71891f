"""`lymphoma validate`: the tutorial's step 3 on a checkpoint and a phase of the run's tiles."""

from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path

from jobs.run_folder import Run

log = logging.getLogger(__name__)


def command(args: argparse.Namespace, run: Run) -> int:
    """Per-tile outputs, confusion, augmentation, kernels and activations into ``--out`` (default
    ``<run>/validate/<checkpoint>-<phase>``: validating another checkpoint or phase replaces nothing); with
    ``--cluster slurm`` as one SLURM job (a phase of a cohort is a GPU's work, not the login node's)."""
    from lymphoma.cohort_report import figure_text
    from lymphoma.validation import check_validation, validate

    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out else run.dir / "validate" / f"{checkpoint.stem}-{args.phase}"
    job = partial(validate, checkpoint, run.tiles, args.phase, out, args.layer,
                  intervals=(run.config.cv.bootstrap, run.config.cv.confidence))
    if run.config.cluster.kind == "slurm":
        check_validation(checkpoint, run.tiles, args.phase, args.layer)  # a wrong --phase: an error now, not a failed job
        summary = run.one_job("validate", out, job)
    else:
        summary = job()
    log.info(f"{args.phase}: {summary['tiles']} tiles of {summary['cases']} cases, tile accuracy "
             f"{figure_text(summary, 'accuracy')}, balanced {figure_text(summary, 'balanced_accuracy')} "
             f"({summary['confidence']:.0%} intervals from {summary['bootstrap']} resamples of the cases); files in {out}")
    return 0
