"""`lymphoma tile`: images -> case-level split -> one HDF5 shard per array task -> manifest."""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from hpc import ArrayJobError, end_with_command, run_array
from jobs.run_folder import Run
from lymphoma.errors import DiskFullError, is_disk_full
from lymphoma.inputs import ImageRecord, Inputs, Skipped, reasons_by_count
from lymphoma.settings import TileSettings
from lymphoma.sharding import ShardPlan, fingerprint, plan_shards, write_manifest
from lymphoma.split import assign_phases, split_cases, write_split_csv
from lymphoma.stain import tiling_stain
from lymphoma.store import ShardSummary, parse_compression, read_complete_shard, write_shard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTask:
    """Everything one array task needs to write one shard; picklable."""

    path: str
    phase: str
    records: tuple[ImageRecord, ...]
    classes: tuple[str, ...]
    settings: TileSettings
    fingerprint: str
    stain: Optional[dict[str, Any]] = None  # the target tiling normalises to (stain.scope image), else None


def run_shard_task(task: ShardTask) -> ShardSummary:
    """The array task's entry point: write one shard (stopping if its command is killed outright)."""
    end_with_command()
    return write_shard(Path(task.path), task.phase, task.records, task.classes, task.settings,
                       task.settings.compression, task.fingerprint, task.settings.strict, task.stain)


@dataclass
class TileResult:
    run_dir: Path
    manifest: Path
    classes: list[str]
    summaries: list[ShardSummary]
    n_written: int
    n_skipped: int
    seconds: float
    skipped_reasons: str = ""  # each distinct reason once, with its count and a file


def run_tile(run: Run, progress: bool = True) -> TileResult:
    """Tile the configured data set into the run folder; a rerun writes only missing or stale shards."""
    start = time.perf_counter()
    cfg = run.config
    parse_compression(cfg.tiles.compression)  # a bad spec is one error now, not one per array task
    misfit = cfg.crop_misfit()
    if misfit:
        log.warning(f"{misfit}; these tiles cannot train with this config")
    with run.session("tile"), run.tiles_in_use(writing=True):
        inputs = run.inputs()
        _warn_empty_classes(inputs, cfg.data.source)
        phase_of = split_cases(inputs.records, cfg.split.val_fraction, cfg.split.test_fraction, cfg.split.seed)
        by_phase = assign_phases(inputs.records, phase_of)
        write_split_csv(run.split_csv, by_phase)
        plans = plan_shards(by_phase, cfg.tiles.images_per_shard)
        stain = tiling_stain(cfg.stain)
        tasks = [shard_task(plan, run.tiles, inputs.classes, cfg.tiles, stain) for plan in plans]
        summaries: list[ShardSummary | None] = [read_complete_shard(Path(t.path), t.fingerprint) for t in tasks]
        todo = [i for i, s in enumerate(summaries) if s is None]
        for phase in by_phase:
            (run.tiles / phase).mkdir(parents=True, exist_ok=True)
        _report_stale(run.tiles, plans)

        bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), unit="shard", desc="tile",
                   disable=not progress or None)
        try:
            written = run_array(run.executor("tile"), run_shard_task, [tasks[i] for i in todo],
                                parallelism=cfg.cluster.parallelism, poll_s=cfg.cluster.poll_s,
                                on_done=lambda *_: bar.update(), ledger=run.tiles / "slurm-job.json", resumable=True)
        except (ArrayJobError, OSError) as err:
            raise _disk_full(run, err, tasks) or err from None
        bar.close()
        for i, summary in zip(todo, written):
            summaries[i] = summary
        done = [s for s in summaries if s is not None]
        manifest = write_manifest(run.tiles, inputs.classes, cfg.tiles, cfg.tiles.compression, done, inputs.skipped,
                                  stain)
    skipped = [*inputs.skipped, *(Skipped(item["path"], item["reason"]) for s in done for item in s.skipped)]
    return TileResult(run.dir, manifest, inputs.classes, done, len(todo), len(skipped), time.perf_counter() - start,
                      reasons_by_count(skipped, shown=3))


def _disk_full(run: Run, err: Exception, tasks: list[ShardTask]) -> DiskFullError | None:
    """One clear error when tasks failed because the run's disk is full (they may not even have been able to
    write their logs), with the space the missing shards need, estimated from the finished ones; else None."""
    free = shutil.disk_usage(run.dir).free
    written = [t for t in tasks if Path(t.path).is_file()]  # only complete shards take their final name
    missing = [t for t in tasks if not Path(t.path).is_file()]
    per_image = sum(Path(t.path).stat().st_size for t in written) / max(1, sum(len(t.records) for t in written))
    next_shard = per_image * max((len(t.records) for t in missing), default=0)
    if not (is_disk_full(err) or free < max(1 << 20, next_shard)):  # a failed task's partial shard is deleted
        return None
    needed = per_image * sum(len(t.records) for t in missing) if written else None
    return DiskFullError(run.tiles, needed, free, f"the {len(missing)} shard(s) still to write")


def tile_in_process(by_phase: dict[str, list[ImageRecord]], tiles_dir: Path, classes: list[str],
                    settings: TileSettings, stain: Optional[dict[str, Any]] = None) -> list[ShardSummary]:
    """Write the phases' shards one after the other in this process (a task that tiles its own share, such as
    a cross-validation fold), skipping complete ones, then the manifest."""
    summaries = []
    for plan in plan_shards(by_phase, settings.images_per_shard):
        task = shard_task(plan, tiles_dir, classes, settings, stain)
        (tiles_dir / plan.phase).mkdir(parents=True, exist_ok=True)
        summaries.append(read_complete_shard(Path(task.path), task.fingerprint) or run_shard_task(task))
    write_manifest(tiles_dir, classes, settings, settings.compression, summaries, [], stain)
    return summaries


def shard_task(plan: ShardPlan, tiles_dir: Path, classes: list[str], settings: TileSettings,
               stain: Optional[dict[str, Any]] = None) -> ShardTask:
    """The task that writes one planned shard, with the fingerprint that tells a rerun whether it is current."""
    return ShardTask(path=str(tiles_dir / plan.relpath), phase=plan.phase, records=plan.records,
                     classes=tuple(classes), settings=settings,
                     fingerprint=fingerprint(plan, classes, settings, settings.compression, stain), stain=stain)


def _warn_empty_classes(inputs: Inputs, source: str) -> None:
    """A class of data.classes without one image in the source: tiling goes on (the tiles may be for prediction
    only), but training would refuse it; said now rather than after the whole cohort is tiled."""
    empty = [c for c in inputs.classes if not any(r.label == c for r in inputs.records)]
    if empty:
        log.warning(f"class(es) {empty} of data.classes have no image in {source}: training would refuse them; add "
                    "their images, or drop them from data.classes")


def _report_stale(tiles_dir: Path, plans: list[ShardPlan]) -> None:
    planned = {tiles_dir / p.relpath for p in plans}
    stale = sorted(p for p in tiles_dir.glob("*/shard-*.h5") if p not in planned)
    if stale:
        log.warning(f"{len(stale)} shard(s) from an earlier layout are not in the manifest and are ignored: "
                    f"{', '.join(str(p) for p in stale[:3])}{' ...' if len(stale) > 3 else ''}")


def format_summary(result: TileResult) -> str:
    """The end-of-job table: shards, tiles per class and phase, bytes, tiles/s."""
    classes = result.classes
    lines = [f"run folder: {result.run_dir}", f"manifest:   {result.manifest}",
             f"{'phase':<6} {'shards':>6} {'images':>6} {'tiles':>7}  " + "  ".join(f"{c:>6}" for c in classes)
             + f" {'MiB':>8}"]
    phases = sorted({s.phase for s in result.summaries}, key=["train", "val", "test"].index)
    for phase in phases:
        ss = [s for s in result.summaries if s.phase == phase]
        per_class = [sum(s.tiles_per_class[c] for s in ss) for c in classes]
        lines.append(f"{phase:<6} {len(ss):>6} {sum(s.n_images for s in ss):>6} {sum(per_class):>7}  "
                     + "  ".join(f"{n:>6}" for n in per_class) + f" {sum(s.bytes for s in ss) / 2**20:>8.1f}")
    n_tiles = sum(s.n_tiles for s in result.summaries)
    lines.append(f"{result.n_written} shard(s) written, {len(result.summaries) - result.n_written} already complete; "
                 f"{n_tiles} tiles in {result.seconds:.1f} s ({n_tiles / max(result.seconds, 1e-9):.0f} tiles/s)"
                 + (f"; {result.n_skipped} image(s) skipped, listed in the manifest: {result.skipped_reasons}"
                    if result.n_skipped else ""))
    return "\n".join(lines)


def command(args: argparse.Namespace, run: Run) -> int:
    """``lymphoma tile``."""
    log.info(format_summary(run_tile(run, progress=not args.no_progress)))
    return 0
