"""`lymphoma predict`: batched tile-vote inference over a cohort as an array job, then the cohort report."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from hpc import ArrayJobError, make_executor, run_array
from jobs.config import Config, save_resolved, to_object
from lymphoma.checkpoint import load_checkpoint
from lymphoma.cohort import expand_inputs, write_report
from lymphoma.errors import InputError
from lymphoma.inputs import compile_case_pattern
from lymphoma.prediction import SlideInput, checkpoint_fingerprint, outputs_complete, read_record

MARKER = ".lymphoma-predict"
TILE_KEYS = ("size", "stride", "resize", "pad", "target_mpp", "target_power")


@dataclass(frozen=True)
class PredictTask:
    """One array task: a chunk of slides and the model to run over them."""

    checkpoint: str
    slides: tuple[SlideInput, ...]
    out_dir: str
    batch_size: int
    prefetch: int
    heatmaps: bool
    threads: int
    tta: bool = False


def run_predict_task(task: PredictTask) -> list[dict[str, Any]]:
    """Load the model once, then predict each slide of the chunk that is not complete yet."""
    import torch

    from lymphoma.prediction import Predictor, predict_slides

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK") or task.threads))
    predictor = Predictor.from_checkpoint(Path(task.checkpoint), device, task.batch_size, task.tta)
    return predict_slides(predictor, task.slides, Path(task.out_dir), task.prefetch, task.heatmaps)


@dataclass
class PredictResult:
    out_dir: Path
    records: list[dict[str, Any]]
    metrics: dict[str, Any]
    n_predicted: int
    n_resumed: int
    task_failures: Optional[ArrayJobError] = None


def prepare_out_dir(out_dir: Path) -> Path:
    """An empty folder or one an earlier prediction made (it holds the marker); never someone else's files."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MARKER).exists():
        raise InputError(f"output folder {out_dir} exists and holds other files; give an empty or new folder "
                         "(or the folder of an earlier prediction, to resume it)")
    try:
        (out_dir / "slides").mkdir(parents=True, exist_ok=True)
        (out_dir / MARKER).touch()
    except OSError as err:
        raise InputError(f"cannot write to {out_dir} ({err.strerror}); choose a writable --out") from None
    return out_dir


def check_tiling(cfg: Config, checkpoint_tiles: dict[str, Any], checkpoint: Path) -> None:
    """The user's tile settings must be the ones the model was trained on."""
    differ = {k: (getattr(cfg.tiles, k), checkpoint_tiles.get(k)) for k in TILE_KEYS
              if getattr(cfg.tiles, k) != checkpoint_tiles.get(k)}
    if differ:
        detail = ", ".join(f"tiles.{k}={mine} but the model was trained with {theirs}" for k, (mine, theirs) in differ.items())
        raise InputError(f"{checkpoint}: {detail}; drop those settings (the checkpoint's are used) or pass --force")


def run_predict(raw_cfg: DictConfig, checkpoint: Path, patterns: list[str], list_file: Optional[Path] = None,
                basepath: Optional[Path] = None, out: Optional[Path] = None, force: bool = False,
                explicit_tiles: bool = False, slides: Optional[list[SlideInput]] = None) -> PredictResult:
    """Predict every slide (resuming complete ones) and write the cohort report."""
    cfg: Config = to_object(raw_cfg)
    state = load_checkpoint(checkpoint)
    classes = list(state["classes"])
    if explicit_tiles and not force:
        check_tiling(cfg, state["tiles"], checkpoint)
    if slides is None:
        slides = expand_inputs(patterns, list_file, basepath, classes, compile_case_pattern(cfg.data.case_pattern))
    out_dir = prepare_out_dir((Path(out) if out else Path(cfg.run.root) / cfg.run.name / "predict").absolute())
    save_resolved(raw_cfg, out_dir / "config.yaml")
    slide_dir = out_dir / "slides"
    fingerprint = checkpoint_fingerprint(Path(checkpoint).resolve(), state, cfg.predict.tta)
    resumed = {s.key for s in slides if outputs_complete(slide_dir, s, fingerprint) is not None}
    per_task = max(1, cfg.predict.slides_per_task)
    chunks = [tuple(slides[i:i + per_task]) for i in range(0, len(slides), per_task)]
    threads = max(1, (os.cpu_count() or 1) // max(1, min(cfg.cluster.parallelism, len(chunks))))
    tasks = [PredictTask(str(Path(checkpoint).resolve()), chunk, str(slide_dir), cfg.predict.batch_size,
                         cfg.predict.prefetch, cfg.predict.heatmaps, threads, cfg.predict.tta) for chunk in chunks]
    executor = make_executor(cfg.cluster, out_dir / "logs" / "%j", name=f"predict-{cfg.run.name}")
    failure = None
    try:
        run_array(executor, run_predict_task, tasks, parallelism=cfg.cluster.parallelism, poll_s=cfg.cluster.poll_s)
    except ArrayJobError as err:
        failure = err
    records = []
    for task_index, chunk in enumerate(chunks):
        for slide in chunk:
            record = read_record(slide_dir, slide)
            if record is None:
                logs = next((f"{f.stderr}" for f in (failure.failures if failure else []) if f.index == task_index), "?")
                record = {"key": slide.key, "path": slide.path, "status": "failed", "label": slide.label,
                          "case": slide.case, "error": f"its task {task_index} died before writing it; log: {logs}"}
            records.append(record)
    metrics = write_report(records, classes, out_dir, cfg.predict.aggregate)
    n_ok = sum(r["status"] == "ok" for r in records)
    return PredictResult(out_dir, records, metrics, n_ok - len(resumed & {r["key"] for r in records if r["status"] == "ok"}),
                         len(resumed), failure)


def format_report(result: PredictResult) -> str:
    m = result.metrics
    lines = [f"{m['predicted']} of {m['slides']} slide(s) predicted ({result.n_predicted} now, {result.n_resumed} "
             f"already complete), {m['failed']} failed"]
    for level in ("image", "case"):
        if level in m:
            lines.append(f"{level}-level accuracy {m[level]['accuracy']:.3f}, balanced {m[level]['balanced_accuracy']:.3f}"
                         f" (n={m[level]['n']})")
    failed = [r for r in result.records if r["status"] != "ok"]
    lines += [f"  failed: {r['path']}: {r['error']}" for r in failed[:10]]
    lines += [f"summary:  {result.out_dir / 'summary.csv'}", f"metrics:  {result.out_dir / 'metrics.json'}",
              f"per slide: {result.out_dir / 'slides'}/<name>.{{json,npz,png}}"]
    return "\n".join(lines)
