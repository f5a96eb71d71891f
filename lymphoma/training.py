"""The training loop: data, model, loss and optimiser from settings; resume, log, checkpoint.

It runs in every process of a (possibly distributed) job; only rank 0 writes. The caller sets up the
process group; nothing here knows how the processes were started.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from lymphoma.adversary import CaseAdversary, encode
from lymphoma.augment import build_augmenter, choose_backend
from lymphoma.batch_augment import BatchAugmenter
from lymphoma.checkpoint import (
    load_checkpoint,
    load_model_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lymphoma.distill import make_distiller
from lymphoma.epochs import AfterStep, EpochStart, EpochStats, StepOptions, bf16_training, evaluate, train_one_epoch
from lymphoma.errors import InputError
from lymphoma.files import write_text_atomic
from lymphoma.image_scale import training_image_size
from lymphoma.loaders import make_loader
from lymphoma.metrics import class_weights
from lymphoma.mid_epoch import PARTIAL, CheckpointClock, epoch_order, gather, resume_point, start_of
from lymphoma.mixing import batch_mix
from lymphoma.model import build_model
from lymphoma.phase_tiles import PhaseTiles
from lymphoma.precision import BF16_UNITS, emulated_bf16
from lymphoma.selection import best_index, explain, stop_early
from lymphoma.settings import AugmentSettings, FitSettings, StainSettings, TrainSettings
from lymphoma.sharding import load_manifest, phase_shards, tiles_fingerprint
from lymphoma.stain import StainNormalizer, StainTarget, fit_target, stored_stain, tiling_stain
from lymphoma.store import verify_shard
from lymphoma.tile_cache import CachedLoader, agreed_cache, choose_cache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rank:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    local_world: int = 1  # processes of the job on this node

    @property
    def main(self) -> bool:
        return self.rank == 0


CACHE_WORDS = {"none": "by loader processes", "memory": "from memory", "device": "from GPU memory"}


def loader_workers(device: torch.device) -> int:
    """The default loader processes: 1 beside a CPU training (more steal the model's cores), else this
    process's share of the node's cores (one process per visible GPU), at most 8."""
    if device.type != "cuda":
        return 1
    local = max(1, torch.cuda.device_count())
    return max(1, min(8, (os.cpu_count() or 2) // local - 1))


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def open_phase(tiles_dir: Path, phase: str, expected_size: Optional[int], crop: int,
               expected_by: Optional[str] = None) -> PhaseTiles:
    """The phase's shards as one dataset, checked against the settings that will use it (``expected_by``: what
    else than the config's tiles.size expects ``expected_size``, and what to do, for the message)."""
    dataset = PhaseTiles(phase_shards(tiles_dir, phase))
    if len(dataset) == 0:
        raise InputError(f"{tiles_dir}: the {phase!r} phase has no tiles; check the split and the skipped images")
    if expected_size is not None and dataset.tile_size != expected_size:
        raise InputError(f"{tiles_dir}: stores hold {dataset.tile_size}-px tiles but " + (
            expected_by or f"tiles.size is {expected_size}; rerun `lymphoma tile` with these settings or set "
                           f"tiles.size={dataset.tile_size}"))
    if crop > (dataset.tile_size or 0):
        raise InputError(f"augment.crop={crop} is larger than the stored {dataset.tile_size}-px tiles; "
                         "lower augment.crop or tile with a larger tiles.size")
    return dataset


def preflight(settings: FitSettings, tiles_dir: Path, out_dir: Path) -> None:
    """Check, before any process starts, what would make training fail: stores that do not match the
    settings, an empty phase, a class without training tiles, a last.pt of another architecture."""
    tiles = [open_phase(tiles_dir, phase, settings.tile_size, settings.augment.crop)
             for phase in ("train", settings.train.eval_phase)]
    class_weights(tiles[0].class_counts(), tiles[0].classes or [])
    for path in (p for dataset in tiles for p in dataset.paths):
        problem = verify_shard(path)
        if problem is not None:
            raise InputError(f"{path} is damaged: {problem}; rerun `lymphoma tile` with the same config, which "
                             "rewrites it")
    _check_backbone(settings, tiles_dir)
    check_tiles_stain(load_manifest(tiles_dir), settings.stain, tiles_dir, tiling_stain(settings.stain))
    for path in (out_dir / "checkpoints" / name for name in ("last.pt", PARTIAL)):
        try:
            state = load_checkpoint(path) if path.is_file() else None
        except InputError:
            if path.name == PARTIAL:  # passed over, and said, when the training starts (mid_epoch.resume_point)
                continue
            raise
        if state is not None:
            check_same_tiles(state, path, tiles_dir)
            wanted = settings.model.architecture(len(tiles[0].classes or []))
            if state["architecture"] != wanted:
                raise InputError(f"{path} holds another architecture ({state['architecture']}) than model settings "
                                 f"({wanted}); training would resume from it: restore the model settings, or use "
                                 "another run.name to start afresh")
    for dataset in tiles:
        dataset.close()


def check_tiles_stain(manifest: dict[str, Any], stain: StainSettings, tiles_dir: Path,
                      wanted: Optional[dict[str, Any]]) -> None:
    """Train only on tiles stored as the stain settings need them (``wanted``, their ``stain.tiling_stain``): as
    read (stain.scope tile: each tile is normalised as it is used), or normalised by their images to the same
    target (stain.scope image)."""
    made = manifest.get("stain")
    if made != wanted:
        def told(target: Optional[dict[str, Any]]) -> str:
            return (f"normalised by image ({target['method']}, reference {target['reference'] or 'standard'})"
                    if target else "stored as read (stain.scope tile)")

        raise InputError(f"the tiles in {tiles_dir} were {told(made)}, and the stain settings (normalize="
                         f"{stain.normalize}, scope={stain.scope}, reference={stain.reference}) need them "
                         f"{told(wanted)}: tile again with these settings (`lymphoma tile`, or `lymphoma run`), "
                         "or train with the settings they were tiled with")


def check_same_tiles(state: dict[str, Any], last: Path, tiles_dir: Path) -> None:
    """Resume only on the shards the checkpoint was trained on (checkpoints before this check record none)."""
    saved = state.get("tiles_fingerprint")
    if saved and saved != tiles_fingerprint(tiles_dir):
        raise InputError(f"{last} was trained on other tiles than {tiles_dir} holds now (tiled again since, with "
                         "other images, split or settings); resuming would go on training it on tiles it never "
                         "saw: train afresh with `lymphoma train --restart` (`lymphoma run --restart`, `lymphoma cv "
                         "--restart` alike; the old train/ folder or folds are kept, renamed), or tile into another "
                         "run.name")


def _check_backbone(settings: FitSettings, tiles_dir: Path) -> None:
    """A backbone builds (its architecture, model.freeze) and its weight file exists; a note when the tiles' resolution
    is not the one it was pretrained at."""
    from lymphoma.backbones import require_model

    model = settings.model
    require_model(model)
    tiled_at = load_manifest(tiles_dir)["tiles"].get("target_mpp")
    if model.mpp is not None and tiled_at != model.mpp:
        where = f"tiles.target_mpp={tiled_at}" if tiled_at else "the images' own pixels (tiles.target_mpp=null)"
        log.warning(f"model.mpp={model.mpp} (the backbone's pretraining resolution) but the tiles were cut at "
                    f"{where}; features transfer best at the pretraining resolution")


def make_optimizer(model: torch.nn.Module, s: TrainSettings, head: Optional[torch.nn.Module] = None
                   ) -> torch.optim.Optimizer:
    """The optimiser over the parameters that train (frozen ones are left out); ``head`` (the case adversary's)
    in a second group at ``train.lr * train.case_adversary_lr``, under the same schedule."""
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if head is not None:
        groups.append({"params": list(head.parameters()), "lr": s.lr * s.case_adversary_lr})
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    kind = torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=s.lr, weight_decay=s.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, s: TrainSettings) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning rate per epoch: a linear warm-up over ``warmup_epochs``, then constant, cosine decay to
    zero over the remaining epochs, or steps of ``gamma`` every ``step_size`` epochs."""

    def factor(epoch: int) -> float:
        if epoch < s.warmup:
            return (epoch + 1) / (s.warmup + 1)
        if s.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (epoch - s.warmup) / (s.epochs - s.warmup)))
        if s.scheduler == "step":
            return s.gamma ** ((epoch - s.warmup) // s.step_size)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_averaged(model: torch.nn.Module, decay: Optional[float]) -> Optional[torch.optim.swa_utils.AveragedModel]:
    """An exponential moving average of the weights and of the batch-norm statistics, or None."""
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@dataclass
class Parts:
    """What one training run is made of; ``kept`` is the model that is evaluated and saved (the weight
    average when there is one)."""

    model: torch.nn.Module
    ddp: torch.nn.Module
    averaged: Optional[torch.nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    init_weights: Optional[dict[str, Any]] = None  # the pretrained file the model started from, and its digest
    adversary: Optional[CaseAdversary] = None  # train.case_adversary's head: trained and saved for resuming only

    @property
    def kept(self) -> torch.nn.Module:
        return self.averaged.module if self.averaged is not None else self.model  # type: ignore[return-value]

    def state(self) -> dict[str, Any]:
        state = {"model": self.kept.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict()}
        if self.averaged is not None:
            state["train_model"] = self.model.state_dict()
            state["averaged"] = self.averaged.state_dict()
        if self.adversary is not None:
            state["adversary"] = self.adversary.state_dict()
        return state

    def sync_buffers(self) -> None:
        """Give every rank rank 0's batch-norm statistics (each rank's last batches moved its own), in the
        model and in the weight average, as DDP does at the start of a forward pass."""
        modules = [self.model] + ([self.averaged] if self.averaged is not None else [])
        for module in modules:
            for buffer in module.buffers():
                dist.broadcast(buffer, 0)

    def resume(self, state: dict[str, Any], path: Path) -> None:
        load_model_weights(self.model, {**state, "model": state.get("train_model", state["model"])}, path)
        if self.averaged is not None:
            if "averaged" not in state:
                raise InputError(f"{path} was trained without train.ema; resume with train.ema=null or start "
                                 "afresh with another run.name")
            self.averaged.load_state_dict(state["averaged"])
        if (self.adversary is not None) != ("adversary" in state):
            raise InputError(f"{path} was trained {'without' if self.adversary is not None else 'with'} "
                             "train.case_adversary; resume with the setting it had, or start afresh with another "
                             "run.name")
        if self.adversary is not None:
            self.adversary.load_state_dict(state["adversary"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def build_parts(architecture: dict[str, object], train: TrainSettings, rank: Rank, device: torch.device,
                weights: Optional[str] = None, case_class: Optional[np.ndarray] = None) -> Parts:
    """Model (from the pretrained ``weights`` file if given), its DDP wrapper, weight average, case adversary
    (with train.case_adversary: ``case_class`` holds each training case's class), optimiser and schedule."""
    model = build_model(architecture)
    init = None
    if weights is not None:
        from lymphoma.backbones import load_pretrained

        loaded = load_pretrained(model, weights)  # before the average copies it
        init = {"path": loaded.path, "sha256": loaded.sha256, "tensors": loaded.loaded, "head": loaded.head_skipped}
    model = model.to(device)
    if train.channels_last:  # faster on GPUs and on CPUs (oneDNN): 1.6x for a CPU training step here
        model = model.to(memory_format=torch.channels_last)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if rank.world > 1 else model
    averaged = make_averaged(model, train.ema)
    adversary = None
    if train.case_adversary is not None and case_class is not None:  # after the average, which must not copy its hook
        adversary = CaseAdversary(model, case_class, int(architecture["num_classes"]), train.case_adversary,
                                  train.epochs).to(device)
    optimizer = make_optimizer(model, train, adversary)
    return Parts(model, ddp, averaged, optimizer, make_scheduler(optimizer, train), init, adversary)


@dataclass
class Pipelines:
    """The augmenters and loaders of one run, with the backend and stain target they use."""

    backend: str
    target: Any
    train_aug: Any
    eval_aug: Any
    train_loader: Any
    eval_loader: Any

    @property
    def cache(self) -> str:
        """Where the training loader holds the tiles: none (read by loader processes), memory or device."""
        return self.train_loader.mode if isinstance(self.train_loader, CachedLoader) else "none"


def build_pipelines(train_tiles: PhaseTiles, eval_tiles: PhaseTiles, settings: FitSettings, rank: Rank,
                    device: torch.device, target: Optional[StainTarget]) -> Pipelines:
    """The train and eval augmenters and their loaders, normalising to the stain ``target`` (fitted from the
    settings) where it applies tile by tile."""
    train, augment = settings.train, settings.augment
    backend = choose_backend(augment, device)
    normalizer = StainNormalizer(target) if target is not None and target.scope == "tile" else None
    train_aug = build_augmenter(augment, True, device, seed=train.seed * 1000 + rank.rank, normalizer=normalizer)
    eval_aug = build_augmenter(augment, False, device, normalizer=normalizer)
    workers = train.num_workers if train.num_workers is not None else loader_workers(device)
    cache = agreed_cache(choose_cache(train.cache, train_tiles.nbytes + eval_tiles.nbytes, device,
                                      isinstance(train_aug, BatchAugmenter), rank.local_world), device)
    train_loader = make_loader(train_tiles, train_aug.sample, train.batch_size, rank.rank, rank.world, True,
                               train.seed, workers, train.sampling == "cases", train.samples_per_epoch, cache, device)
    eval_loader = make_loader(eval_tiles, eval_aug.sample, train.eval_batch_size, rank.rank, rank.world, False,
                              train.seed, workers, cache=cache, device=device)
    return Pipelines(backend, target, train_aug, eval_aug, train_loader, eval_loader)


@dataclass
class Training:
    """One training as built: its tiles, criterion, model parts and pipelines, where it resumes, its history."""

    settings: FitSettings
    out_dir: Path
    rank: Rank
    device: torch.device
    train_tiles: PhaseTiles
    eval_tiles: PhaseTiles
    criterion: torch.nn.Module
    parts: Parts
    pipes: Pipelines
    options: StepOptions
    tiles: dict[str, Any]  # the tile settings the stores were written with (their manifest's)
    tiles_fingerprint: str  # which shards it trains on (sharding.tiles_fingerprint)
    cases_seen: list[str]  # the cases its weights learn from or are chosen on (``cases_seen``), taken once
    start_epoch: int = 0
    start_at: EpochStart = EpochStart()  # where in start_epoch this process starts (lymphoma.mid_epoch)
    history: list[dict[str, Any]] = field(default_factory=list)
    writer: Any = None
    clock: Optional[CheckpointClock] = None  # when it writes a mid-epoch checkpoint

    @property
    def classes(self) -> list[str]:
        return list(self.train_tiles.classes or [])

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.train_tiles.close()
        self.eval_tiles.close()


def build_training(settings: FitSettings, tiles_dir: Path, out_dir: Path, rank: Rank, device: torch.device,
                   deadline: Optional[float] = None) -> Training:
    """Open the phases, build model, optimiser and pipelines, and resume from ``checkpoints/last.pt`` or from
    inside the epoch after it (``partial.pt``, ``lymphoma.mid_epoch``) if there; ``deadline``: the job's time
    limit (``time.time()``), before which a mid-epoch checkpoint is written."""
    train, augment = settings.train, settings.augment
    seed_everything(train.seed, train.deterministic)
    train_tiles = open_phase(tiles_dir, "train", settings.tile_size, augment.crop)
    eval_tiles = open_phase(tiles_dir, train.eval_phase, settings.tile_size, augment.crop)
    state, path = resume_point(out_dir / "checkpoints", rank.world, _order(train))
    manifest, target = load_manifest(tiles_dir), fit_target(settings.stain)  # the target, fitted once
    check_tiles_stain(manifest, settings.stain, tiles_dir, stored_stain(target))
    case_class = None
    if train.case_adversary is not None:  # the loaders then carry each tile's case with its class
        train_tiles.targets, _, case_class = encode(train_tiles.labels, train_tiles.cases, len(train_tiles.classes or []))
    distiller = None
    if train.distill is not None:  # the loaders then carry each tile's index with its class
        distiller = make_distiller(train_tiles, train.distill, train.seed,
                                   StainNormalizer(target) if target is not None and target.scope == "tile" else None
                                   ).to(device)  # the teacher on the device once, not copied every step
    parts = build_parts(settings.model.architecture(len(train_tiles.classes or [])), train, rank, device,
                        None if state is not None else settings.model.weights, case_class)
    options = StepOptions(bf16_training(train.amp, device), train.channels_last, train.max_steps_per_epoch,
                          train.clip_grad_norm, batch_mix(train.mix, train.mix_alpha), parts.adversary, distiller)
    run = Training(settings, out_dir, rank, device, train_tiles, eval_tiles, make_criterion(train_tiles, train, device),
                   parts, build_pipelines(train_tiles, eval_tiles, settings, rank, device, target), options,
                   manifest["tiles"], tiles_fingerprint(tiles_dir), cases_seen(train_tiles, eval_tiles, train))
    torch.manual_seed(train.seed + rank.rank)  # augmentation differs per rank; the model came from one seed
    if state is not None and path is not None:
        _resume(run, state, path, tiles_dir)
    run.clock = CheckpointClock(train.checkpoint_every_min, deadline, rank.world, device)
    if rank.main:
        log.info(_start_line(run))
        if options.amp and emulated_bf16(device):
            log.warning(f"train.amp=true: this CPU has no bf16 units ({BF16_UNITS}), where PyTorch emulates "
                        "bf16, a step several times slower than float32 (8.2x for the reduced DenseNet on an AVX2 "
                        "CPU); set train.amp=auto, which trains in bf16 only where the CPU has them")
        run.writer = _open_writer(out_dir, run.start_epoch, train_tiles, run.pipes.train_aug, augment)
    return run


def _resume(run: Training, state: dict[str, Any], path: Path, tiles_dir: Path) -> None:
    """Go on from ``state`` (read from ``path``): weights, optimiser, history and random states, and inside an
    epoch this process's place in it, its sums so far and its augmentation draws."""
    check_same_tiles(state, path, tiles_dir)
    run.parts.resume(state, path)
    run.parts.init_weights = state.get("init_weights")
    run.start_epoch, run.history = state["epoch"] + 1, state["history"]
    if len(state["rng"]) == run.rank.world:
        set_rng_state(state["rng"][run.rank.rank])
    run.start_at = start_of(state, run.rank.rank)
    if "mid_epoch" in state:
        mine = state["mid_epoch"]["ranks"][run.rank.rank]
        if mine["augment"] is not None:
            run.pipes.train_aug.restore(mine["augment"])
        if run.parts.adversary is not None and mine["adversary"] is not None:
            run.parts.adversary.total = mine["adversary"].to(run.device)


def _start_line(run: Training) -> str:
    """What a training runs on and with, as its log's first line."""
    train, options = run.settings.train, run.options
    where = (f"from epoch {run.start_epoch + 1} of {train.epochs}" if run.start_epoch < train.epochs
             else f"all {train.epochs} epochs trained already (last.pt)")
    if run.start_at.step:
        where += f", step {run.start_at.step + 1} ({PARTIAL}{_dali_words(run)})"
    threads = f" of {torch.get_num_threads()} thread(s)" if run.device.type == "cpu" else ""
    precision = f"{'bf16 autocast' if options.amp else 'float32'} (train.amp={train.amp})"
    adversary = (f", a case adversary among {len(options.adversary.case_class)} cases (train.case_adversary="
                 f"{train.case_adversary})" if options.adversary is not None else "")
    adversary += f", distilled from the reference (train.distill={train.distill})" if options.distiller is not None else ""
    return (f"training on {run.device} x {run.rank.world} process(es){threads}, {precision}{adversary}, "
            f"{run.pipes.backend} augmentation, tiles read {CACHE_WORDS[run.pipes.cache]}, {len(run.train_tiles)} "
            f"train and {len(run.eval_tiles)} {train.eval_phase} tiles, {where}")


def run_epoch(run: Training, epoch: int) -> None:
    """Train one epoch (from the step of a mid-epoch checkpoint, and writing them), evaluate the kept model, step
    the schedule; rank 0 logs and checkpoints."""
    parts, pipes, train = run.parts, run.pipes, run.settings.train
    start_at = run.start_at if epoch == run.start_epoch else EpochStart()
    pipes.train_loader.sampler.set_epoch(epoch, start_at.skip)  # type: ignore[attr-defined]
    stats = train_one_epoch(parts.ddp, pipes.train_loader, pipes.train_aug, run.criterion, parts.optimizer,
                            run.device, epoch, run.options, parts.averaged, start_at, _mid_epoch_saver(run, epoch))
    if run.rank.world > 1:
        parts.sync_buffers()
    val = evaluate(parts.kept if parts.averaged is not None else parts.ddp, pipes.eval_loader, pipes.eval_aug,
                   run.criterion, run.device, len(run.classes), run.options.amp, train.channels_last)
    lr = parts.optimizer.param_groups[0]["lr"]
    parts.scheduler.step()
    run.history.append({"epoch": epoch, "train_loss": stats.loss, "val_loss": val.loss, "val_accuracy": val.accuracy,
                        "val_balanced_accuracy": val.balanced_accuracy, "lr": lr, "images_per_s": stats.images_per_s,
                        **(parts.adversary.epoch_stats() if parts.adversary is not None else {})})
    kept = best_index(run.history, train.select, train.first_candidate) == len(run.history) - 1
    rngs = gather(rng_state(), run.rank.world)
    if run.rank.main:
        _log_epoch(run.writer, epoch, stats, val, lr, run.classes, run.history[-1])
        _save_epoch({**_training_state(run, epoch, rngs), "val_loss": val.loss, "val_accuracy": val.accuracy},
                    run.ckpt_dir, kept)
        (run.ckpt_dir / PARTIAL).unlink(missing_ok=True)  # its epoch is in last.pt now
        write_text_atomic(run.out_dir / "history.json", json.dumps(run.history, indent=2) + "\n")
        log.info(f"epoch {epoch + 1}/{train.epochs}: train loss {stats.loss:.4f}, val loss {val.loss:.4f}, "
                 f"val accuracy {val.accuracy:.3f} (balanced {val.balanced_accuracy:.3f}), "
                 f"{stats.images_per_s:.0f} images/s" + _adversary_words(run.history[-1]) + (" (kept)" if kept else ""))
    if run.rank.world > 1:
        dist.barrier()
    if run.clock is not None:
        run.clock.restart()  # the next mid-epoch checkpoint is due every_min from this one


def _mid_epoch_saver(run: Training, epoch: int) -> Optional[AfterStep]:
    """What training calls after each step of ``epoch``: writes ``partial.pt`` when the clock says so."""
    clock = run.clock
    if clock is None or not clock.enabled:
        return None

    def after_step(steps: int, total: torch.Tensor, seconds: float) -> None:
        if clock.due():
            began = time.monotonic()
            _save_mid_epoch(run, epoch, steps, total, seconds)
            clock.saved(time.monotonic() - began)
    return after_step


def _save_mid_epoch(run: Training, epoch: int, steps: int, total: torch.Tensor, seconds: float) -> None:
    """Write ``partial.pt``: the state after ``steps`` steps of ``epoch``, with each process's random states,
    augmentation draws and sums so far (gathered to rank 0, which writes)."""
    adversary = run.parts.adversary
    ranks = gather({"rng": rng_state(), "total": total.cpu(), "augment": run.pipes.train_aug.state(),
                    "adversary": adversary.total.cpu() if adversary is not None and adversary.total is not None
                    else None}, run.rank.world)
    if run.rank.main:
        mid = {"epoch": epoch, "steps": steps, "tiles": steps * run.settings.train.batch_size,  # each process's
               "seconds": seconds, "ranks": ranks, "order": _order(run.settings.train)}
        save_checkpoint({**_training_state(run, epoch - 1, [r["rng"] for r in ranks]), "mid_epoch": mid},
                        run.ckpt_dir / PARTIAL)
        log.info(f"epoch {epoch + 1}: {steps} step(s) done, saved to {PARTIAL} (train.checkpoint_every_min="
                 f"{run.settings.train.checkpoint_every_min})")


def _order(train: TrainSettings) -> dict[str, Any]:
    """The settings that draw an epoch's order of tiles (``mid_epoch.epoch_order``)."""
    return epoch_order(train.seed, train.sampling, train.samples_per_epoch)


def _training_state(run: Training, epoch: int, rngs: list[dict[str, Any]]) -> dict[str, Any]:
    """What a checkpoint holds after ``epoch`` (the last complete one): how to rebuild the model, its weights and
    training state, the history, and every process's random states ``rngs``."""
    return {**checkpoint_fields(run), **run.parts.state(), "epoch": epoch, "history": run.history, "rng": rngs}


def _dali_words(run: Training) -> str:
    if run.pipes.train_aug.state() is not None:
        return ""
    return "; DALI draws the rest of this epoch's augmentation afresh, unlike the run it continues"


def _adversary_words(entry: dict[str, Any]) -> str:
    if "case_adversary_loss" not in entry:
        return ""
    return (f", case adversary loss {entry['case_adversary_loss']:.4f} "
            f"(it names the case of {entry['case_adversary_accuracy']:.3f} of the tiles)")


def checkpoint_fields(run: Training) -> dict[str, Any]:
    """What every checkpoint of a training records besides weights and state: how to rebuild and feed the model."""
    s = run.settings
    return {"architecture": s.model.architecture(len(run.classes)), "classes": run.classes,
            "tiles": run.tiles, "augment": asdict(s.augment), "config": s.config,
            "backend": run.pipes.backend, "stain": run.pipes.target.as_dict() if run.pipes.target is not None else None,
            "init_weights": run.parts.init_weights, "tiles_fingerprint": run.tiles_fingerprint,
            "image_size": training_image_size(run.train_tiles.image_shapes),
            "training_precision": "bf16" if run.options.amp else "fp32", "cases_seen": run.cases_seen}


def cases_seen(train_tiles: PhaseTiles, eval_tiles: PhaseTiles, train: TrainSettings) -> list[str]:
    """The cases whose tiles the weights learn from, and those of the eval phase where it chooses the epoch kept or
    when to stop (train.select other than last, or train.patience): figures on any of them are not held out."""
    chose = train.select != "last" or train.patience is not None
    phases = [train_tiles, eval_tiles] if chose else [train_tiles]
    return sorted({case for tiles in phases for case in np.unique(tiles.cases).tolist()})


def fit(settings: FitSettings, tiles_dir: Path, out_dir: Path, rank: Rank = Rank(),
        device: torch.device = torch.device("cpu"), deadline: Optional[float] = None) -> dict[str, Any]:
    """Train (resuming from ``out_dir/checkpoints``: ``last.pt``, or ``partial.pt`` inside the epoch after it) and
    return the summary; ``deadline``: the job's time limit (``time.time()``), before which it saves mid-epoch."""
    run = build_training(settings, tiles_dir, out_dir, rank, device, deadline)
    train = settings.train
    try:
        for epoch in range(run.start_epoch, train.epochs):
            if stop_early(run.history, train.patience, train.select, train.first_candidate):
                break
            run_epoch(run, epoch)
    finally:  # a failed epoch (a full disk, ...) closes its shards too: no page of HDF5 warnings over the error
        run.close()
    adversary = run.parts.adversary  # each rank's, to check that the ranks' heads agree
    return {**_summary(run.history, train, rank, device, run.pipes.backend, run.ckpt_dir, run.parts.kept),
            "classes": run.classes, **({"adversary_sha1": weights_digest(adversary)} if adversary is not None else {})}


def make_criterion(train_tiles: PhaseTiles, train: TrainSettings, device: torch.device) -> torch.nn.Module:
    """Cross-entropy with label smoothing, weighted by 1 - class share (the tutorial's) unless the sampling
    balances the classes already."""
    weights = class_weights(train_tiles.class_counts(), list(train_tiles.classes or []))
    weighted = train.class_weighted and train.sampling == "tiles"
    return torch.nn.CrossEntropyLoss(weight=weights.to(device) if weighted else None,
                                     label_smoothing=train.label_smoothing)


def _open_writer(out_dir: Path, start_epoch: int, tiles: PhaseTiles, augmenter: Any, augment: AugmentSettings) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_epoch)
    if start_epoch == 0:
        _log_augmentation(writer, tiles, augmenter, augment)
    return writer


def _save_epoch(state: dict[str, Any], ckpt_dir: Path, kept: bool) -> None:
    save_checkpoint(state, ckpt_dir / "last.pt")
    if kept:
        save_checkpoint(state, ckpt_dir / "best.pt")


def _summary(history: list[dict[str, Any]], train: TrainSettings, rank: Rank, device: torch.device, backend: str,
             ckpt_dir: Path, model: torch.nn.Module) -> dict[str, Any]:
    """What a training run reports: epochs run, the kept epoch and why, where the checkpoints are."""
    index = best_index(history, train.select, train.first_candidate)
    best = history[index] if index is not None else {}
    stopped = stop_early(history, train.patience, train.select, train.first_candidate) and len(history) < train.epochs
    if rank.main and stopped:
        log.info(f"stopped early after epoch {len(history)}: no better {train.select.replace('_', ' ')} for "
                 f"{train.patience} epoch(s)")
    return {"epochs": len(history), "stopped_early": stopped, "best_epoch": best.get("epoch"),
            "best_val_loss": best.get("val_loss"), "best_val_accuracy": best.get("val_accuracy"),
            "best_val_balanced_accuracy": best.get("val_balanced_accuracy"),
            "selection": explain(history, train.select, train.first_candidate), "checkpoints": str(ckpt_dir),
            "backend": backend, "world_size": rank.world, "rank": rank.rank, "device": str(device),
            "weights_sha1": weights_digest(model)}


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-1 of every parameter and buffer, to compare models across processes and runs."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _log_epoch(writer: Any, epoch: int, stats: EpochStats, val: EpochStats, lr: float, classes: list[str],
               entry: dict[str, Any]) -> None:
    step = epoch + 1
    writer.add_scalar("train/loss", stats.loss, step)
    writer.add_scalar("train/images_per_s", stats.images_per_s, step)
    writer.add_scalar("val/loss", val.loss, step)
    writer.add_scalar("val/accuracy", val.accuracy, step)
    writer.add_scalar("val/balanced_accuracy", val.balanced_accuracy, step)
    writer.add_scalar("lr", lr, step)
    for key in ("case_adversary_loss", "case_adversary_accuracy"):
        if key in entry:
            writer.add_scalar(f"train/{key}", entry[key], step)
    for i in range(len(classes)):
        for j in range(len(classes)):
            writer.add_scalar(f"val/{i}{j}", int(val.confusion[i, j]), step)
    writer.flush()


def _log_augmentation(writer: Any, tiles: PhaseTiles, augmenter: Any, settings: AugmentSettings, n: int = 16) -> None:
    """A grid of the first tiles before and after the training augmentation."""
    from torchvision.utils import make_grid

    raw, _ = tiles.read_batch(list(range(min(n, len(tiles)))))
    before = torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255
    batch = torch.stack([augmenter.sample(t) for t in raw]) if augmenter.sample else torch.from_numpy(raw)
    after = augmenter.batch(batch, 0).float().cpu()
    after = after * torch.tensor(settings.std).view(1, 3, 1, 1) + torch.tensor(settings.mean).view(1, 3, 1, 1)
    writer.add_image("augment/before", make_grid(before, nrow=4), 0)
    writer.add_image("augment/after", make_grid(after.clamp(0, 1), nrow=4), 0)
