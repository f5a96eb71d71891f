"""`lymphoma features`: tile embeddings of every slide as an array job (one task per chunk of slides), one
HDF5 file per slide in the CLAM/TRIDENT layout, resumable per slide, failed slides as failed rows."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hpc import ArrayJobError, run_array
from hpc.task import task_setup
from jobs import openvino_first_in_tasks
from jobs.config import keys_set
from jobs.predict import (
    changed_notes,
    finished_records,
    forced_tiles,
    gather_records,
    raise_task_failures,
    refuse_leaving_out,
    replace_advice,
    task_chunks,
)
from jobs.progress import SlideProgress
from jobs.run_folder import Run, folder_lock, prepare_out_dir, set_aside_out_dir
from lymphoma.backbones import require_model
from lymphoma.checkpoint import load_checkpoint
from lymphoma.errors import InputError
from lymphoma.features import ENCODER_FILE
from lymphoma.files import PinnedFile, file_stamp, remove_pinned, write_csv_atomic, write_text_atomic
from lymphoma.image_scale import scale_notes
from lymphoma.inputs import compile_case_pattern
from lymphoma.prediction import SlideInput, adopt_moved, changed_since, moved_notes, read_record
from lymphoma.prediction_inputs import FEATURES_MARKER, expand_inputs
from lymphoma.settings import EXPORTED_ENGINES

log = logging.getLogger(__name__)
FEATURES_BEFORE_MARKERS = ("records", "h5_files")  # what marked one before the marker


@dataclass(frozen=True)
class FeaturesTask:
    """One array task: a chunk of slides, the encoder (a checkpoint, or the run's model settings) and where the
    files go; picklable."""

    run: Run
    checkpoint: Optional[str]
    slides: tuple[SlideInput, ...]
    out_dir: str
    threads: int
    tiles: Optional[dict[str, Any]] = None  # tile settings used instead of the checkpoint's (as in prediction)
    pinned: Optional[PinnedFile] = None  # the job's copy of the checkpoint or model.weights, which every task reads


def run_features_task(task: FeaturesTask) -> list[dict[str, Any]]:
    """Build the encoder once, then embed each slide that has no complete file yet."""
    from lymphoma.features import Engine, FeatureWriter, encoder_from_checkpoint, encoder_from_settings
    from lymphoma.prediction import predict_slides

    cfg = task.run.config
    out = Path(task.out_dir)
    engine = Engine(cfg.predict.engine if cfg.predict.engine in EXPORTED_ENGINES else "torch", cfg.predict.precision,
                    out / "engine")
    with task_setup(task.threads) as setup:
        if task.checkpoint:
            encoder, meta = encoder_from_checkpoint(Path(task.checkpoint), setup.device, cfg.predict.batch_size, engine,
                                                    cfg.predict.scale, task.tiles, task.pinned)
        else:
            encoder, meta = encoder_from_settings(cfg.model, cfg.tiles, cfg.augment, cfg.stain, setup.device,
                                                  cfg.predict.batch_size, engine, task.pinned)
        return predict_slides(encoder, task.slides, out, cfg.predict.prefetch, writer=FeatureWriter(out, meta),
                              readers=cfg.predict.readers, read_timeout_min=cfg.predict.read_timeout_min)


def features_slides(run: Run, patterns: list[str], list_file: Optional[Path], basepath: Optional[Path]) -> list[SlideInput]:
    """The slides named on the command line or in a list (TSV or CSV); without any, every image of the run's data."""
    if patterns or list_file:
        return expand_inputs(patterns, list_file, basepath, list(run.config.data.classes or []),
                             compile_case_pattern(run.config.data.case_pattern), run.config.data.regions,
                             run.config.data.columns)
    return [SlideInput(r.path, r.key, r.label, r.case, r.regions) for r in run.inputs().records]


@dataclass(frozen=True)
class EncoderSource:
    """Where the encoder comes from, checked before any task: a trained model's ``checkpoint`` (its ``state``, and
    the tile settings the user gave in place of its own, ``tiles``: prediction's rules), or, without one, the run's
    ``model.backbone``. Each task builds the encoder itself from it (``lymphoma.features``)."""

    checkpoint: Optional[Path] = None
    state: Optional[dict[str, Any]] = None
    tiles: Optional[dict[str, Any]] = None

    def scale_notes(self, records: list[dict[str, Any]]) -> list[str]:
        """Prediction's notes on images resized to, or left off, the checkpoint's training scale."""
        if self.state is None:
            return []
        return scale_notes(records, self.state, self.tiles, "embed")

    def cases_seen(self) -> Optional[list[str]]:
        """The cases the encoder learnt from or chose its epoch on (its checkpoint's record; None where an older
        checkpoint kept none); none for a backbone, whose weights (model.weights) come from outside this cohort."""
        return [] if self.checkpoint is None else (self.state or {}).get("cases_seen")


def check_encoder(run: Run, checkpoint: Optional[Path], explicit: Sequence[str] = (), force: bool = False) -> EncoderSource:
    """Before anything is submitted: a readable checkpoint and the user's tile settings checked against its own
    (``explicit`` keys; differences need ``force``), or a backbone whose weight file exists."""
    model = run.config.model
    if checkpoint is not None:
        checkpoint = Path(checkpoint).resolve()
        state = load_checkpoint(checkpoint)
        return EncoderSource(checkpoint, state, forced_tiles(run, checkpoint, state, explicit, force))
    if model.backbone is None:
        raise InputError("lymphoma features needs an encoder: --checkpoint of a trained model, or model.backbone "
                         "(with model.weights) for a pretrained one")
    require_model(model)
    return EncoderSource()


def features_out(run: Run, out: Optional[Path]) -> Path:
    """The output folder of `lymphoma features`: ``--out``, else ``<run>/features``, absolute."""
    return (Path(out) if out else run.dir / "features").absolute()


def run_features(run: Run, source: Optional[EncoderSource], slides: list[SlideInput], out: Optional[Path] = None,
                 progress: bool = False) -> tuple[Path, list[dict[str, Any]], Optional[ArrayJobError]]:
    """Embed every slide as an array job with the encoder from ``source`` (``check_encoder``'s; None: the run's
    model.backbone); ``features.csv`` lists each slide's file or error. ``progress``: a bar of the slides done on
    a terminal."""
    cfg = run.config
    source = source or check_encoder(run, None)
    if cfg.predict.engine == "compile":
        log.info("predict.engine=compile is for `lymphoma predict`; embeddings run on torch "
                 f"(predict.precision={cfg.predict.precision} applies)")
    out_dir = prepare_out_dir(features_out(run, out), FEATURES_MARKER, "`lymphoma features`",
                              before_markers=FEATURES_BEFORE_MARKERS)
    with folder_lock(out_dir, "features"):  # a second `lymphoma features` into this folder is refused, not run beside
        records, failure = embed_into(out_dir, run, source, slides, progress)
    return out_dir, records, failure


def embed_into(out_dir: Path, run: Run, source: EncoderSource, slides: list[SlideInput],
               progress: bool) -> tuple[list[dict[str, Any]], Optional[ArrayJobError]]:
    """``run_features`` in its output folder, held: the array job, then ``features.csv``."""
    cfg = run.config
    identity = encoder_identity(run, source)
    for note in moved_notes(adopt_moved(out_dir / "records", slides), "embeddings"):  # a cohort now elsewhere
        log.warning(f"lymphoma features: {note}")
    refuse_replacing(out_dir, slides, identity)  # before anything of the earlier embeddings is written over
    for note in changed_notes(changed_since(out_dir / "records", slides), "embedded"):
        log.warning(f"lymphoma features: {note}")
    run.save_config(out_dir / "config.yaml")
    encoder = {"encoder": identity["encoder"], "identity": identity,
               "cases_seen": source.cases_seen()}  # for `lymphoma mil`: which test cases the encoder has seen
    write_text_atomic(out_dir / ENCODER_FILE, json.dumps(encoder, indent=1) + "\n")
    chunks, threads = task_chunks(slides, cfg.predict, cfg.cluster)
    checkpoint = str(source.checkpoint) if source.checkpoint else None
    file = source.checkpoint or cfg.model.weights
    pinned = PinnedFile.pin(file, out_dir / "engine", identity["encoder file"] or [-1, -1]) if file else None
    tasks = [FeaturesTask(run, checkpoint, chunk, str(out_dir), threads, source.tiles or None, pinned)
             for chunk in chunks]
    openvino_first_in_tasks(cfg.predict.engine)
    failure, results = None, []
    embedded = embedded_before(out_dir / "records", slides) if progress else set()  # read for the bar alone
    bar = SlideProgress(out_dir / "records", [s.key for s in slides if s.key not in embedded], len(embedded),
                        "features", progress)
    try:
        results = run_array(run.executor("features", out_dir / "logs" / "%j"), run_features_task, tasks,
                            parallelism=cfg.cluster.parallelism, poll_s=cfg.cluster.poll_s, on_poll=bar.poll,
                            ledger=out_dir / "slurm-job.json", resumable=True)
    except ArrayJobError as err:
        failure, results = err, err.results
    finally:
        bar.close()
    remove_pinned(out_dir / "engine")  # every task of the job has ended
    resumed = {r["key"] for chunk in results if chunk for r in chunk if r.get("resumed")}
    records = [{**r, "resumed": r["key"] in resumed} for r in gather_records(out_dir / "records", chunks, failure)]
    write_csv_atomic(out_dir / "features.csv", ["key", "path", "label", "case", "status", "n_tiles", "feature_dim",
                                                 "file", "error"],
                     ([r["key"], r["path"], r.get("label") or "", r.get("case") or "", r["status"], r.get("n_tiles", ""),
                       r.get("feature_dim", ""), r.get("file", ""), r.get("error", "")] for r in records))
    return records, failure


def encoder_identity(run: Run, source: EncoderSource) -> dict[str, Any]:
    """What a folder's embeddings depend on that is known before any task: the encoder's file (its size and time:
    a file rewritten is another encoder), the backbone, tiling and how the encoder runs."""
    cfg = run.config
    file = source.checkpoint or cfg.model.weights
    identity = {"encoder": str(file or "random initialisation"),
                "encoder file": file_stamp(file) if file and Path(file).is_file() else None,
                "model.backbone": None if source.checkpoint else cfg.model.backbone,
                "tiles": source.tiles if source.checkpoint else cfg.tiles.as_dict(), "predict.engine": cfg.predict.engine,
                "predict.precision": cfg.predict.precision, "predict.scale": cfg.predict.scale}
    return json.loads(json.dumps(identity, default=str))  # as it reads back from encoder.json


def refuse_replacing(out_dir: Path, slides: Sequence[SlideInput], identity: dict[str, Any]) -> None:
    """An InputError where ``out_dir`` holds finished embeddings that this run would replace (another encoder or
    other settings, by its ``encoder.json``) or leave out of its ``features.csv`` (slides it does not name)."""
    records = finished_records(out_dir / "records")
    try:
        earlier = json.loads((out_dir / ENCODER_FILE).read_text()).get("identity")
    except (OSError, ValueError, AttributeError):
        earlier = None  # a folder of an older version, which kept no identity: its records' fingerprints decide
    if records and earlier is not None and earlier != identity:
        changed = ", ".join(key for key in identity if identity[key] != earlier.get(key))
        raise InputError(f"{out_dir} holds the embeddings of {len(records)} slide(s) by another encoder or other "
                         f"settings ({earlier.get('encoder')}; this run differs in: {changed}); embedding here would "
                         f"replace them: {replace_advice(out_dir)}")
    refuse_leaving_out(out_dir, records, slides, "embeddings", "features.csv")


def embedded_before(records: Path, slides: list[SlideInput]) -> set[str]:
    """The slides with a file from an earlier run, which the progress bar counts as done from the start (a task
    skips them unless another encoder or other settings made them; the bar counts those redone as done already)."""
    return {s.key for s in slides if (r := read_record(records, s)) and r.get("status") == "ok"
            and Path(r.get("file", "")).is_file()}


def command(args: argparse.Namespace, run: Run) -> int:
    """``lymphoma features``."""
    explicit = tuple(keys_set(args.config, args.overrides, "tiles"))
    source = check_encoder(run, Path(args.checkpoint) if args.checkpoint else None, explicit, args.force)
    slides = features_slides(run, args.inputs, args.list, args.basepath)
    if args.restart:
        set_aside_out_dir(run, features_out(run, args.out), FEATURES_MARKER, "`lymphoma features`", "features",
                          FEATURES_BEFORE_MARKERS)
    out_dir, records, failure = run_features(run, source, slides, args.out, progress=not args.no_progress)
    ok = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] != "ok"]
    dims = sorted({r.get("feature_dim") for r in ok})
    n_resumed = sum(bool(r["resumed"]) for r in ok)
    log.info(f"{len(ok)} of {len(records)} slide(s) embedded ({len(ok) - n_resumed} now, {n_resumed} already complete; "
             f"{sum(r.get('n_tiles', 0) for r in ok)} tiles, {dims[0] if len(dims) == 1 else dims} dimensions), "
             f"{len(failed)} failed")
    for note in source.scale_notes(records):
        log.warning(f"lymphoma features: {note} (each file's tiles attribute holds the resize it was cut at)")
    for r in failed[:10]:
        log.info(f"  failed: {r['path']}: {r['error']}")
    log.info(f"files:   {out_dir / 'h5_files'}/<slide>.h5 (features, coords)\nsummary: {out_dir / 'features.csv'}")
    if failure is not None:
        raise_task_failures(failure, out_dir, args.out is not None)
    if failed:
        rest = "the others' files are written" if len(failed) < len(records) else "none was embedded"
        log.error(f"lymphoma features: {len(failed)} of {len(records)} slide(s) failed (listed above and in "
                  f"{out_dir / 'features.csv'}); {rest}")
    return 1 if failed else 0
