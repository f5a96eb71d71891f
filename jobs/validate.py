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
    summary = validate(Path(args.checkpoint), run.tiles, args.phase, out, args.layer)
    log.info(f"{args.phase}: {summary['tiles']} tiles, accuracy {summary['accuracy']:.3f}, balanced accuracy "
             f"{summary['balanced_accuracy']:.3f}; files in {out}")
    return 0
