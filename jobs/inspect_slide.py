"""`lymphoma inspect`: what a slide file holds, its tissue, and the tile grid the settings would cut."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from jobs.run_folder import Run
from lymphoma.errors import InputError
from lymphoma.settings import TileSettings
from lymphoma.slides import open_slide
from lymphoma.wsi import plan_grid, save_grid_overview, target_mpp

log = logging.getLogger(__name__)


PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def picture_path(out: Path | None, slide: Path) -> Path:
    """Where the QC picture goes: ``--out`` (a folder, or a new name without a suffix, such as ``qc/``, gets
    ``<slide name>-grid.png``, made where missing), else ``<slide name>-grid.png`` here; an InputError for a name
    that is no picture format."""
    if out is not None and not out.suffix and not out.exists():
        out.mkdir(parents=True)
    if out is None or out.is_dir():
        return (out or Path()) / f"{slide.stem}-grid.png"
    if out.suffix.lower() not in PICTURE_SUFFIXES:
        raise InputError(f"--out {out}: a picture is written there, so its name ends in one of "
                         f"{', '.join(PICTURE_SUFFIXES)} (or give a folder)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def inspect_slide(t: TileSettings, path: Path, out: Path | None) -> str:
    """A report of the slide's levels, resolution and tissue; writes the QC picture to ``out``."""
    out = picture_path(out, Path(path))
    with open_slide(path, t.default_mpp, t.max_pixels) as reader:
        info = reader.info
        lines = [f"file:       {info.path}", f"vendor:     {info.vendor}",
                 f"mpp:        {info.mpp if info.mpp is not None else 'unknown (set tiles.default_mpp)'}",
                 f"objective:  {info.objective_power or 'unknown'}", "levels:"]
        lines += [f"  {i}: {w} x {h} (downsample {d:.3f})"
                  for i, ((w, h), d) in enumerate(zip(info.level_dimensions, info.level_downsamples))]
        grid = None
        if info.mpp is not None:
            target = target_mpp(reader, t) if t.by_resolution else info.mpp
            grid = plan_grid(reader, t.size, t.stride, target, t.min_tissue)
            lines += [f"tissue:     {grid.tissue.fraction:.1%} of the slide",
                      f"tile grid:  {len(grid.coords)} tiles of {t.size} px at {target} mpp kept (>= "
                      f"{t.min_tissue:.0%} tissue), {grid.n_background} dropped; read at level {grid.level}, "
                      f"{grid.read_size} px each"]
        save_grid_overview(reader, grid, str(out))
        lines.append(f"picture:    {out}")
    return "\n".join(lines)


def command(args: argparse.Namespace, run: Run) -> int:
    """``lymphoma inspect``: each slide in turn; one that cannot be read is named and the others still shown (exit
    status 1 if any failed)."""
    if not args.inputs:
        raise InputError("lymphoma inspect takes one or more slides (paths), and overrides that look like "
                         "section.key=value, e.g. tiles.target_mpp=1.0")
    slides = [Path(p) for p in args.inputs]
    out = args.out
    if out is not None and not out.is_dir():  # a wrong --out is refused before any slide is read
        if len(slides) == 1:
            picture_path(out, slides[0])
        elif out.suffix.lower() in PICTURE_SUFFIXES:
            raise InputError(f"--out {out}: {len(slides)} slides have a picture each; give a folder for them")
        else:
            out.mkdir(parents=True, exist_ok=True)
    failed = []
    for i, slide in enumerate(slides):
        try:
            log.info(("\n" if i else "") + inspect_slide(run.config.tiles, slide, out))
        except (InputError, OSError) as err:
            failed.append(slide)
            log.error(f"error: {err}")  # the error names the file
    if failed:
        log.error(f"lymphoma inspect: {len(failed)} of {len(slides)} slide(s) could not be inspected (named above)")
        return 1
    return 0
