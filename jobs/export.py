"""`lymphoma export`: a checkpoint as ONNX and TorchScript, with its preprocessing recorded."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from jobs.run_folder import Run, make_out_folder
from lymphoma.errors import InputError

log = logging.getLogger(__name__)


def command(args: argparse.Namespace, run: Run) -> int:
    """Write the exports and ``preprocessing.json`` into ``--out`` and say how close each is to PyTorch."""
    from lymphoma.checkpoint import load_checkpoint
    from lymphoma.engines import write_export

    state = load_checkpoint(args.checkpoint)  # a checkpoint that cannot be exported is refused before any folder is made
    out = make_out_folder(Path(args.out) if args.out else Path(args.checkpoint).with_suffix(""))
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    refuse_others_files(out, formats)
    report = write_export(Path(args.checkpoint), out, formats, state=state)
    for name, entry in report["files"].items():  # type: ignore[union-attr]
        log.info(f"{name}: {out / entry['path']}: tile classes equal to PyTorch's on {entry['same_class']:.0%} of "
                 f"{report['check_tiles']} check tiles, largest logit difference {entry['max_abs_logit_difference']:.1e}")
    log.info(f"preprocessing: {out / 'preprocessing.json'}")
    return 0


def refuse_others_files(out: Path, formats: list[str]) -> None:
    """An InputError where ``out`` holds a file this export would replace that no export wrote there (no
    ``export.json`` records one): someone's own model is never overwritten."""
    from lymphoma.engines import EXPORT_FILES

    names = [EXPORT_FILES[f] for f in formats if f in EXPORT_FILES] + ["preprocessing.json"]
    clash = [name for name in names if (out / name).exists()]
    if clash and not (out / "export.json").is_file():
        raise InputError(f"{out} holds {', '.join(clash)}, which no `lymphoma export` wrote (no export.json beside "
                         "it) and this export would replace; give another --out")
