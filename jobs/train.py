"""`lymphoma train`: a DistributedDataParallel job over the run's tile shards, resumable and requeueable."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import submitit

from hpc import submit, wait_for
from hpc.task import job_deadline, task_setup
from jobs.progress import EpochProgress, WatchedTraining
from jobs.run_folder import Run
from lymphoma.checkpoint import load_checkpoint
from lymphoma.errors import InputError
from lymphoma.mid_epoch import DEADLINE_MARGIN_S, PARTIAL
from lymphoma.settings import FitSettings
from lymphoma.training import Rank, fit, preflight

log = logging.getLogger(__name__)


def fit_settings(run: Run, eval_phase: str | None = None) -> FitSettings:
    """The training bundle of a run's config (``eval_phase`` replaces train.eval_phase when given)."""
    cfg = run.config
    train = cfg.train if eval_phase is None else replace(cfg.train, eval_phase=eval_phase)
    return FitSettings(train, cfg.model, cfg.augment, cfg.stain, cfg.tiles.size, run.as_dict())


MAX_TIMEOUTS = 100  # time limits a training job is requeued at, each after a checkpoint (TrainJob.checkpoint)


def fit_here(run: Run, tiles_dir: Path, out_dir: Path, settings: FitSettings, device: Any,
             rank: Rank = Rank(), deadline: float | None = None) -> dict[str, Any]:
    """Train in this process (one rank), writing the resolved config beside the outputs on rank 0; a mid-epoch
    checkpoint before ``deadline`` (the job's time limit, else this SLURM task's, ``hpc.task.job_deadline``)."""
    if rank.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        run.save_config(out_dir / "config.yaml")
    if deadline is None:
        deadline = job_deadline(run.config.cluster.time_limit_min())
    return fit(settings, tiles_dir, out_dir, rank, device, deadline)


class TrainJob(submitit.helpers.Checkpointable):
    """Runs in every task. On a SLURM time-out or preemption submitit calls ``checkpoint`` on rank 0, which (as
    Checkpointable does) resubmits this same call; the rerun resumes from ``last.pt``, or from inside the epoch
    (``partial.pt``, ``lymphoma.mid_epoch``)."""

    def __call__(self, run: Run) -> dict[str, Any]:
        self.found, self.deadline = _checkpoint_files(run), job_deadline(run.config.cluster.time_limit_min())
        with task_setup() as task:
            rank = Rank(task.env.rank, task.env.local_rank, task.env.world_size, task.env.local_world)
            return fit_here(run, run.tiles, run.train, fit_settings(run), task.device, rank, self.deadline)

    def checkpoint(self, run: Run) -> submitit.helpers.DelayedSubmission:
        """Requeued after a preemption, or at the time limit when this job wrote a checkpoint; at its time limit
        without one a requeued job would only do the same again: an error saying what to set, not a requeue."""
        limit, every = run.config.cluster.time_limit_min(), run.config.train.checkpoint_every_min
        found = getattr(self, "found", None)  # None: the signal came before the training began
        saved = found is not None and _checkpoint_files(run) != found  # each is written anew: another inode
        deadline = getattr(self, "deadline", None) or job_deadline(limit)
        if not saved and deadline is not None and time.time() >= deadline - DEADLINE_MARGIN_S:
            raise TimeoutError(f"training reached its time limit of {limit} min without writing a checkpoint since "
                               f"this job started (train.checkpoint_every_min={every}), so it is not requeued: it "
                               "would do the same again; set train.checkpoint_every_min (e.g. 30: checkpoints "
                               "inside epochs and one before the limit) or raise cluster.timeout_min, then rerun")
        return submitit.helpers.DelayedSubmission(TrainJob(), run)  # not this one's files and time limit


def _checkpoint_files(run: Run) -> list[tuple[int, int] | None]:
    """Which ``last.pt`` and ``partial.pt`` there are (inode and modification time; None: none)."""
    stats = [path.stat() if path.is_file() else None for path in (run.checkpoints / "last.pt", run.checkpoints / PARTIAL)]
    return [(st.st_ino, st.st_mtime_ns) if st is not None else None for st in stats]


def _warn_if_resuming_other_settings(last: Path, run: Run) -> None:
    """Resuming keeps the run's history; say so when the settings it trains with have changed since."""
    if not last.is_file():
        return
    state = load_checkpoint(last)
    saved, now = state["config"], run.as_dict()
    changed = [f"{section}.{key}" for section in ("train", "model", "augment") for key in now[section]
               if saved.get(section, {}).get(key) != now[section][key]
               and f"{section}.{key}" not in ("train.epochs", "train.checkpoint_every_min")]
    if changed:  # more epochs is the ordinary way to continue, not worth a note, unless the schedule stretches
        log.warning(f"resuming {last} (epoch {state['epoch'] + 1} done) with changed settings "
                    f"{changed}; to train afresh with them, use another run.name")
    before, epochs, scheduler = saved.get("train", {}).get("epochs"), now["train"]["epochs"], now["train"]["scheduler"]
    if before is not None and before != epochs and scheduler != "none":
        log.warning(f"resuming {last} (epoch {state['epoch'] + 1} of {before} done) with train.epochs={epochs}: the "
                    f"{scheduler} learning-rate schedule is laid over {epochs} epochs from here on, so the rate "
                    f"jumps to where a {epochs}-epoch schedule is at epoch {state['epoch'] + 2}; this is not the "
                    f"training a fresh run of {epochs} epochs does (for that: `lymphoma train --restart`, or another "
                    "run.name)")


def run_here(run: Run) -> dict[str, Any] | None:
    """Train in this process as one rank of a job started by torchrun, mpiexec or srun; rank 0's summary."""
    preflight(fit_settings(run), run.tiles, run.train)
    summary = TrainJob()(run)
    return summary if summary["rank"] == 0 else None


def run_train(run: Run, restart: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Submit the training job (one task per process) and wait for every rank's summary (rank 0 first), with a
    bar over its epochs on a terminal if ``progress``; ``restart``: train afresh, the earlier ``train/`` folder
    renamed aside."""
    cfg = run.config
    cfg.check_trainable()
    run.create()
    if not run.manifest.is_file():
        raise InputError(f"{run.tiles} has no tile manifest; run `lymphoma tile` with the same config first")
    if cfg.cluster.kind == "debug" and cfg.cluster.tasks_per_node * cfg.cluster.nodes > 1:
        raise InputError("the debug executor runs one process; set cluster.tasks_per_node=1 or use --cluster local")
    with run.lock("train"), run.tiles_in_use(writing=False):  # no tiling rewrites the shards meanwhile
        if restart:
            run.set_aside(run.train, "training")
        preflight(fit_settings(run), run.tiles, run.train)
        _warn_if_resuming_other_settings(run.checkpoints / "last.pt", run)
        run.train.mkdir(exist_ok=True)
        job = submit(run.executor("train", max_timeouts=MAX_TIMEOUTS), TrainJob(), run,
                     ledger=run.train / "slurm-job.json")  # hpc.ledger
        log.info(f"training job {job.job_id}: logs in {run.train / 'logs'}")
        bar = EpochProgress([WatchedTraining(run.train / "history.json", cfg.train)], "train",
                            enabled=progress and cfg.cluster.kind != "debug")  # debug: it runs in this process
        try:
            results = wait_for(job, f"train-{cfg.run.name}", on_poll=bar.poll, poll_s=cfg.cluster.poll_s)
        finally:
            bar.close()
    return results


def command(args: argparse.Namespace, run: Run) -> int:
    """``lymphoma train`` (``--here``: as one rank of an outside launcher; only rank 0 prints)."""
    summary = run_here(run) if args.here else run_train(run, args.restart, progress=not args.no_progress)[0]
    if summary is not None:
        log.info(f"best epoch {summary['best_epoch'] + 1}: val loss {summary['best_val_loss']:.4f}, "
                 f"val accuracy {summary['best_val_accuracy']:.3f}; checkpoints in {summary['checkpoints']}")
    return 0
