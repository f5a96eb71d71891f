"""`lymphoma predict`: batched tile-vote inference over a cohort as an array job, then the cohort report."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Optional

from hpc import ArrayJobError, ExecutorSettings, run_array
from hpc.task import task_setup, thread_share
from jobs import openvino_first_in_tasks
from jobs.config import keys_set
from jobs.progress import SlideProgress
from jobs.run_folder import Run, folder_lock, prepare_out_dir, set_aside_out_dir
from lymphoma.checkpoint import load_checkpoint
from lymphoma.cohort_report import metrics_lines, seen_cases_notes, write_report
from lymphoma.errors import DiskFullError, InputError, is_disk_full
from lymphoma.files import PinnedFile, file_stamp, remove_pinned
from lymphoma.image_scale import scale_notes, training_scale
from lymphoma.inputs import compile_case_pattern
from lymphoma.prediction import (
    SlideInput,
    adopt_moved,
    changed_since,
    checkpoint_fingerprint,
    identity_differences,
    moved_notes,
    outputs_complete,
    prediction_identity,
    read_record,
    with_tiles,
)
from lymphoma.prediction_inputs import PREDICT_MARKER, expand_inputs
from lymphoma.settings import PredictSettings, TileSettings

log = logging.getLogger(__name__)

MARKER = PREDICT_MARKER  # what marks a folder of `lymphoma predict`
SLIDE_KEYS = ("default_mpp", "max_pixels")  # tile settings that describe the slides: the user's, not the checkpoint's


@dataclass(frozen=True)
class PredictRequest:
    """What to predict and with what: the checkpoint; the slides, or the patterns and list that name them;
    the output folder (default ``<run>/predict``); whether tile settings given by the user may differ from the
    checkpoint's (``force``) and which the user set (``explicit_tiles``: key names, from -c and overrides);
    ``replace``: the folder's earlier predictions may be replaced or left out (`lymphoma run`'s own folder, which
    follows its model), where otherwise they are refused (``refuse_replacing``)."""

    checkpoint: Path
    patterns: tuple[str, ...] = ()
    list_file: Optional[Path] = None
    basepath: Optional[Path] = None
    out: Optional[Path] = None
    force: bool = False
    explicit_tiles: tuple[str, ...] = ()
    slides: Optional[tuple[SlideInput, ...]] = None
    replace: bool = False


@dataclass(frozen=True)
class PredictTask:
    """One array task: a chunk of slides and the model to run over them; picklable."""

    checkpoint: PinnedFile  # the job's copy of the checkpoint: every task predicts with the file the command read
    slides: tuple[SlideInput, ...]
    out_dir: str
    settings: PredictSettings
    threads: int
    tiles: Optional[dict[str, Any]] = None  # tile settings used instead of the checkpoint's (--force)


def predict_chunk(checkpoint: Path, slides: Sequence[SlideInput], out_dir: Path, settings: PredictSettings,
                  device: Any, tiles: Optional[dict[str, Any]] = None,
                  pinned: Optional[PinnedFile] = None) -> list[dict[str, Any]]:
    """Load the model once (from ``pinned``, the job's copy of the checkpoint, where given), then predict each slide
    that is not complete yet into ``out_dir``."""
    from lymphoma.prediction import Pictures, Predictor, predict_slides

    if settings.engine == "openvino" and str(device) != "cpu":
        log.warning(f"predict.engine=openvino runs the model on the CPU: this task's {device} stays idle (on GPU nodes, "
                    "predict.engine=torch or compile)")
    predictor = Predictor.from_checkpoint(checkpoint, device, settings.batch_size, settings.tta, tiles, settings.engine,
                                          settings.precision, Path(out_dir).parent / "engine", settings.scale, pinned)
    return predict_slides(predictor, slides, out_dir, settings.prefetch, Pictures.of(settings), readers=settings.readers,
                          read_timeout_min=settings.read_timeout_min)


def run_predict_task(task: PredictTask) -> list[dict[str, Any]]:
    """The array task's entry point."""
    with task_setup(task.threads) as setup:
        return predict_chunk(Path(task.checkpoint.path), task.slides, Path(task.out_dir), task.settings, setup.device,
                             task.tiles, task.checkpoint)


@dataclass
class PredictResult:
    out_dir: Path
    records: list[dict[str, Any]]
    metrics: dict[str, Any]
    n_predicted: int
    n_resumed: int
    task_failures: Optional[ArrayJobError] = None
    notes: tuple[str, ...] = ()  # images resized to or off the training scale, cases the model learnt from


def forced_tiles(run: Run, checkpoint: Path, state: dict[str, Any], explicit: Sequence[str],
                 force: bool) -> dict[str, Any]:
    """The user's tile settings (``explicit``: the keys they set) that replace the checkpoint's: those that differ,
    only with ``force`` (without it they are an error that says what --force means); ``tiles.default_mpp`` (the
    resolution of files that record none) and ``tiles.max_pixels`` (the largest plain image read) always."""
    mine = run.config.tiles
    differ = {key: values for key, values in mine.model_input_differences(state["tiles"]).items()
              if key in explicit}  # the defaults the user did not touch are not theirs
    if differ and not force:
        detail = ", ".join(f"tiles.{k}={new} but the model was trained with {old}" for k, (new, old) in differ.items())
        pixel_model = "target_mpp" in differ and state["tiles"].get("target_mpp") is None and \
            state["tiles"].get("target_power") is None
        why = (" (on pixel tiles of images whose resolution it does not know)" if pixel_model else "")
        raise InputError(f"{checkpoint}: {detail}{why}; drop those settings to tile as the model was "
                         "trained, or pass --force to tile with yours: the model then sees tiles unlike its "
                         "training tiles, which is right only where they match them in size and resolution")
    forced = {key: new for key, (new, _) in differ.items()}
    for key in SLIDE_KEYS:  # they describe the slides, not the model: the user's, when set
        if getattr(mine, key) != getattr(TileSettings(), key):
            forced[key] = getattr(mine, key)
    return forced


def request_slides(run: Run, request: PredictRequest, state: dict[str, Any], out_dir: Path) -> list[SlideInput]:
    """The slides to predict (the user's tile settings are checked by ``forced_tiles``); none of the output
    folder's own pictures, which a wildcard over a cohort holding it would match."""
    if request.slides is not None:
        return list(request.slides)
    return expand_inputs(list(request.patterns), request.list_file, request.basepath, list(state["classes"]),
                         compile_case_pattern(run.config.data.case_pattern), run.config.predict.regions,
                         run.config.data.columns, out_dir)


def slide_chunks(slides: Sequence[SlideInput], per_task: int, parallelism: int = 1) -> list[tuple[SlideInput, ...]]:
    """The slides in chunks of at most ``per_task``, one array task each, of equal sizes (within one slide: no task
    left alone with a short remainder), and at least ``parallelism`` of them where there are enough slides: given
    the local executor's processes at once, a job of fewer slides than ``per_task`` then runs as tasks of one
    thread each, not as one task of every thread whose threads wait for each other (README, Benchmarks)."""
    if not slides:
        return []
    count = min(len(slides), max(-(-len(slides) // max(1, per_task)), max(1, parallelism)))
    size, longer = divmod(len(slides), count)
    bounds = [i * size + min(i, longer) for i in range(count + 1)]
    return [tuple(slides[a:b]) for a, b in zip(bounds, bounds[1:])]


def local_processes(cluster: ExecutorSettings) -> int:
    """The tasks that share this machine's cores at once: ``cluster.parallelism`` on the local executor; 1 on
    SLURM, where each task has its own ``cpus_per_task``."""
    return cluster.parallelism if cluster.kind == "local" else 1


def task_chunks(slides: Sequence[SlideInput], predict: PredictSettings,
                cluster: ExecutorSettings) -> tuple[list[tuple[SlideInput, ...]], int]:
    """The chunks of slides of an array job (``slide_chunks``) and the threads of each of its tasks: the
    machine's cores shared among the tasks that run at once."""
    chunks = slide_chunks(slides, predict.slides_per_task, local_processes(cluster))
    return chunks, thread_share(min(cluster.parallelism, len(chunks)))


def predict_out(run: Run, out: Optional[Path]) -> Path:
    """The output folder of `lymphoma predict`: ``--out``, else ``<run>/predict``, absolute."""
    return Path(out).absolute() if out else run.predict


def run_predict(run: Run, request: PredictRequest, progress: bool = False) -> PredictResult:
    """Predict every slide (resuming complete ones) as an array job and write the cohort report; ``progress``: a
    bar of the slides done on a terminal."""
    cfg = run.config
    checkpoint = Path(request.checkpoint).resolve()
    stamp = file_stamp(checkpoint)  # before it is read: the job's copy must be this file (PinnedFile)
    saved = load_checkpoint(checkpoint)
    tiles = forced_tiles(run, request.checkpoint, saved, request.explicit_tiles, request.force)
    state = with_tiles(saved, tiles)
    out = predict_out(run, request.out)
    slides = request_slides(run, request, state, out)
    out_dir = prepare_out_dir(out, MARKER, "prediction")
    with folder_lock(out_dir, "predict"):  # a second prediction into this folder is refused, not run beside
        identity = prediction_identity(checkpoint, state, cfg.predict.tta, cfg.predict.engine, cfg.predict.precision,
                                       training_scale(saved, cfg.predict.scale, tiles), stamp)
        fingerprint = checkpoint_fingerprint(identity)
        moved = moved_notes(adopt_moved(out_dir / "slides", slides), "predictions")  # a cohort now elsewhere
        if not request.replace:
            refuse_replacing(out_dir, slides, identity)  # before anything of the earlier one is written over
        run.save_config(out_dir / "config.yaml")
        pinned = PinnedFile.pin(checkpoint, out_dir / "engine", stamp or [-1, -1])  # the file as it was read
        slide_dir = out_dir / "slides"
        slide_dir.mkdir(exist_ok=True)
        changed = changed_notes(changed_since(slide_dir, slides), "predicted")
        resumed = {s.key for s in slides if outputs_complete(slide_dir, s, fingerprint) is not None}
        chunks, threads = task_chunks(slides, cfg.predict, cfg.cluster)
        tasks = [PredictTask(pinned, chunk, str(slide_dir), cfg.predict, threads, tiles) for chunk in chunks]
        openvino_first_in_tasks(cfg.predict.engine)
        failure = None
        bar = SlideProgress(slide_dir, [s.key for s in slides if s.key not in resumed], len(resumed), "predict", progress)
        try:  # on SLURM: never a second array beside one still running; a task requeued at its time limit resumes
            run_array(run.executor("predict", out_dir / "logs" / "%j"), run_predict_task, tasks,
                      parallelism=cfg.cluster.parallelism, poll_s=cfg.cluster.poll_s, on_poll=bar.poll,
                      ledger=out_dir / "slurm-job.json", resumable=True)
        except ArrayJobError as err:
            failure = err
        finally:
            bar.close()
        remove_pinned(out_dir / "engine")  # every task of the job has ended
        records = gather_records(slide_dir, chunks, failure)
        notes = moved + changed + scale_notes(records, saved, tiles) + seen_cases_notes(records, saved.get("cases_seen"))
        metrics = write_report(records, list(state["classes"]), out_dir, cfg.predict.aggregate, notes,
                               intervals=(cfg.cv.bootstrap, cfg.cv.confidence))
        n_ok = sum(r["status"] == "ok" for r in records)
        return PredictResult(out_dir, records, metrics, n_ok - len(resumed & {r["key"] for r in records if r["status"] == "ok"}),
                             len(resumed), failure, tuple(notes))


def changed_notes(changed: Sequence[SlideInput], verb: str) -> list[str]:
    """One note naming the slides whose file changed (size or modification time) since the folder's outputs of them
    were made, which are therefore made again; nothing where none did."""
    if not changed:
        return []
    paths = ", ".join(s.path for s in changed[:3]) + (" ..." if len(changed) > 3 else "")
    return [f"{len(changed)} slide file(s) changed since this folder {verb} them (size or modification time): "
            f"{verb} again from the file as it is now: {paths}"]


def refuse_replacing(out_dir: Path, slides: Sequence[SlideInput], identity: dict[str, Any]) -> None:
    """An InputError where ``out_dir`` holds finished predictions that this one (``identity``: prediction_identity)
    would replace (made by another checkpoint, or other settings: named where their records say) or leave out of its
    summary (slides it does not name): the folder is one prediction's, resumed or extended by more slides, never
    silently another's."""
    records = finished_records(out_dir / "slides")
    named, fingerprint = {s.key: s.path for s in slides}, checkpoint_fingerprint(identity)
    other_model = [r for r in records if named.get(r.get("key")) == r.get("path") and r.get("fingerprint") != fingerprint]
    if other_model:
        differ = identity_differences(other_model[0]["identity"], identity) if "identity" in other_model[0] else []
        files = sorted({r["checkpoint"] for r in other_model if r.get("checkpoint")})
        why = (f"they differ in: {'; '.join(differ)}" if differ else
               f"{'checkpoint ' + ', '.join(files[:2]) + ': ' if files else ''}another file, the same file since "
               "rewritten, or other predict.tta, engine, precision or scale")
        raise InputError(f"{out_dir} holds the predictions of {len(other_model)} of these slides made by another model "
                         f"or other settings ({why}); this prediction would replace them: {replace_advice(out_dir)}")
    refuse_leaving_out(out_dir, records, slides, "predictions", "summary.csv and metrics.json")


def finished_records(folder: Path) -> list[dict[str, Any]]:
    """The records of the slides that succeeded in ``folder`` (a damaged one is made again by any rerun)."""
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and record.get("status") == "ok":
            records.append(record)
    return records


def refuse_leaving_out(out_dir: Path, records: Sequence[dict[str, Any]], slides: Sequence[SlideInput], outputs: str,
                       summary: str) -> None:
    """An InputError where finished ``records`` of ``out_dir`` are of slides this run does not name, which its
    ``summary`` files would leave out."""
    named = {s.key: s.path for s in slides}
    not_named = [str(r.get("path")) for r in records if named.get(r.get("key")) != r.get("path")]
    if not_named:
        raise InputError(f"{out_dir} holds the {outputs} of {len(not_named)} slide(s) this request does not name "
                         f"({', '.join(not_named[:3])}{' ...' if len(not_named) > 3 else ''}); its {summary} would "
                         f"leave them out: name them too (to add slides to it), or {replace_advice(out_dir)}")


def replace_advice(out_dir: Path) -> str:
    return f"give another --out, or --restart (which keeps {out_dir} as {out_dir.name}.before-<date-time>)"


def gather_records(slide_dir: Path, chunks: list[tuple[SlideInput, ...]],
                   failure: Optional[ArrayJobError]) -> list[dict[str, Any]]:
    """Every slide's record; a slide whose task died before writing it is a failed row naming the task's log."""
    records = []
    for task_index, chunk in enumerate(chunks):
        for slide in chunk:
            record = read_record(slide_dir, slide)
            if record is None:
                logs = next((f"{f.stderr}" for f in (failure.failures if failure else []) if f.index == task_index), "?")
                record = {"key": slide.key, "path": slide.path, "status": "failed", "label": slide.label,
                          "case": slide.case, "error": f"its task {task_index} died before writing it; log: {logs}"}
            records.append(record)
    return records


def format_report(result: PredictResult) -> str:
    m = result.metrics
    lines = [f"{m['predicted']} of {m['slides']} slide(s) predicted ({result.n_predicted} now, {result.n_resumed} "
             f"already complete), {m['failed']} failed"]
    lines += metrics_lines(m)
    failed = [r for r in result.records if r["status"] != "ok"]
    lines += [f"  failed: {r['path']}: {r['error']}" for r in failed[:10]]
    lines += [f"summary:  {result.out_dir / 'summary.csv'}", f"cases:    {result.out_dir / 'cases.csv'}",
              f"metrics:  {result.out_dir / 'metrics.json'}",
              f"per slide: {result.out_dir / 'slides'}/<name>.{{json,npz,png}}"]
    return "\n".join(lines)


def raise_task_failures(failure: ArrayJobError, out_dir: Path, out_given: bool) -> NoReturn:
    """The failed tasks' error; where every one of them met a full disk, one DiskFullError naming the output folder
    and where else to write (the tasks' own errors name no folder)."""
    if all(is_disk_full(f.error) for f in failure.failures):
        elsewhere = "give --out a folder on a disk with room" if out_given else "set run.root to a disk with room"
        raise DiskFullError(out_dir, None, shutil.disk_usage(out_dir).free, elsewhere=elsewhere) from failure
    raise failure


def command(args: argparse.Namespace, run: Run) -> int:
    """``lymphoma predict``: tile settings given in a config or override are checked against the checkpoint's."""
    explicit = tuple(keys_set(args.config, args.overrides, "tiles"))
    request = PredictRequest(Path(args.checkpoint), tuple(args.inputs), args.list, args.basepath, args.out,
                             args.force, explicit)
    if args.restart:
        set_aside_out_dir(run, predict_out(run, args.out), MARKER, "`lymphoma predict`", "predict")
    result = run_predict(run, request, progress=not args.no_progress)
    log.info(format_report(result))
    for note in result.notes:
        log.warning(f"lymphoma predict: {note}")
    if result.task_failures is not None:
        raise_task_failures(result.task_failures, result.out_dir, args.out is not None)
    failed = result.metrics["failed"]
    if failed:
        rest = "the others' outputs are written" if failed < result.metrics["slides"] else "none was predicted"
        log.error(f"lymphoma predict: {failed} of {result.metrics['slides']} slide(s) failed (listed above and in "
                  f"{result.out_dir / 'summary.csv'}); {rest}")
        return 1
    return 0
