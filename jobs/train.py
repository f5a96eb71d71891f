"""`lymphoma train`: a DistributedDataParallel job over the run's tile shards, resumable and requeueable."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import submitit
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from hpc import make_executor, wait_for
from hpc.distributed import resolve
from jobs.config import Config, from_yaml_text, save_resolved, to_object
from jobs.rundir import exclusive, make_run_dir
from lymphoma.checkpoint import load_checkpoint
from lymphoma.errors import InputError
from lymphoma.sharding import MANIFEST_NAME
from lymphoma.training import Rank, fit, preflight


class TrainJob(submitit.helpers.Checkpointable):
    """Runs in every task. On a SLURM time-out or preemption submitit calls ``checkpoint``, which (as
    Checkpointable does) resubmits this same call; the rerun resumes from ``last.pt``."""

    def __call__(self, config_yaml: str) -> dict[str, Any]:
        raw = from_yaml_text(config_yaml)
        cfg = to_object(raw)
        env = resolve()
        device = torch.device(f"cuda:{env.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda" and env.local_rank >= torch.cuda.device_count():
            raise InputError(f"{env.local_world} processes on this node but {torch.cuda.device_count()} GPU(s) visible: "
                             "one process per GPU (set --gpus-per-node or cluster.tasks_per_node)")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            share = max(1, (os.cpu_count() or 1) // env.local_world)
            torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK") or share))
        if env.world_size > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=env.rank,
                                    world_size=env.world_size, init_method=f"tcp://{env.master_addr}:{env.master_port}")
        try:
            run_dir = Path(cfg.run.root) / cfg.run.name
            if env.rank == 0:
                (run_dir / "train").mkdir(parents=True, exist_ok=True)
                save_resolved(raw, run_dir / "train" / "config.yaml")
            return fit(run_dir / "tiles", run_dir / "train", cfg.train, cfg.model, cfg.augment,
                       OmegaConf.to_container(raw, resolve=True), Rank(env.rank, env.local_rank, env.world_size),
                       device, tile_size=cfg.tiles.size, stain=cfg.stain)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def _warn_if_resuming_other_settings(last: Path, raw_cfg: DictConfig) -> None:
    """Resuming keeps the run's history; say so when the settings it trains with have changed since."""
    if not last.is_file():
        return
    state = load_checkpoint(last)
    saved, now = state["config"], OmegaConf.to_container(raw_cfg, resolve=True)
    changed = [f"{section}.{key}" for section in ("train", "model", "augment") for key in now[section]
               if saved.get(section, {}).get(key) != now[section][key] and f"{section}.{key}" != "train.epochs"]
    if changed:  # more epochs is the ordinary way to continue, not worth a note
        print(f"note: resuming {last} (epoch {state['epoch'] + 1} done) with changed settings "
              f"{changed}; to train afresh with them, use another run.name", file=sys.stderr, flush=True)


def run_here(raw_cfg: DictConfig) -> dict[str, Any] | None:
    """Train in this process as one rank of a job started by torchrun, mpiexec or srun; rank 0's summary."""
    cfg: Config = to_object(raw_cfg)
    run_dir = Path(cfg.run.root) / cfg.run.name
    preflight(run_dir / "tiles", run_dir / "train", cfg.train, cfg.model, cfg.augment, cfg.tiles.size)
    summary = TrainJob()(OmegaConf.to_yaml(raw_cfg, resolve=True))
    return summary if summary["rank"] == 0 else None


def run_train(raw_cfg: DictConfig) -> list[dict[str, Any]]:
    """Submit the training job (one task per process) and wait for every rank's summary (rank 0 first)."""
    cfg: Config = to_object(raw_cfg)
    run_dir = make_run_dir(cfg.run.root, cfg.run.name)
    if not (run_dir / "tiles" / MANIFEST_NAME).is_file():
        raise InputError(f"{run_dir / 'tiles'} has no tile manifest; run `lymphoma tile` with the same config first")
    if cfg.cluster.kind == "debug" and cfg.cluster.tasks_per_node * cfg.cluster.nodes > 1:
        raise InputError("the debug executor runs one process; set cluster.tasks_per_node=1 or use --cluster local")
    out = run_dir / "train"
    preflight(run_dir / "tiles", out, cfg.train, cfg.model, cfg.augment, cfg.tiles.size)
    _warn_if_resuming_other_settings(out / "checkpoints" / "last.pt", raw_cfg)
    out.mkdir(exist_ok=True)
    with exclusive(run_dir, "train"):
        executor = make_executor(cfg.cluster, out / "logs" / "%j", name=f"train-{cfg.run.name}")
        job = executor.submit(TrainJob(), OmegaConf.to_yaml(raw_cfg, resolve=True))
        print(f"training job {job.job_id}: logs in {out / 'logs'}", flush=True)
        results = wait_for(job, f"train-{cfg.run.name}")
    return results
