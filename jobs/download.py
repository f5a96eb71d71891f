"""`lymphoma download`: the public data set into class folders; options override the ``download`` settings."""

from __future__ import annotations

import argparse
import logging

from jobs.run_folder import Run

log = logging.getLogger(__name__)


def command(args: argparse.Namespace, run: Run) -> int:
    """Download (resumable), check the SHA-1 unless it is ``none``, unpack; say how to use the data."""
    from lymphoma.download import download_dataset

    settings = run.config.download
    sha1 = args.sha1 if args.sha1 is not None else settings.sha1
    dest = download_dataset(args.dest or settings.dest, args.url or settings.urls, None if sha1 in (None, "none") else sha1)
    log.info(f"data set ready in {dest}; use it with data.source={dest}")
    return 0
