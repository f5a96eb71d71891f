"""`lymphoma validate`: the tutorial's step 3 on a checkpoint and a phase of the run's tiles."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from jobs.run_folder import Run

log = logging.getLogger(__name__)


def command(args: argparse.Namespace, run: Run) -> int:
    """Per-tile outputs, confusion, augmentation, kernels and activations into ``--out`` (``<run>/validate``)."""
    from lymphoma.validation import validate

    out = Path(args.out) if args.out else run.dir / "validate"
    summary = validate(Path(args.checkpoint), run.tiles, args.phase, out, args.layer,
                       intervals=(run.config.cv.bootstrap, run.config.cv.confidence))
    (low, high), (balanced_low, balanced_high) = (summary["interval"][k] for k in ("accuracy", "balanced_accuracy"))
    log.info(f"{args.phase}: {summary['tiles']} tiles of {summary['cases']} cases, tile accuracy {summary['accuracy']:.3f} "
             f"[{low:.3f}, {high:.3f}], balanced {summary['balanced_accuracy']:.3f} [{balanced_low:.3f}, "
             f"{balanced_high:.3f}] ({summary['confidence']:.0%} intervals from {summary['bootstrap']} resamples of the "
             f"cases); files in {out}")
    return 0
