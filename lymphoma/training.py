"""The training loop: data, model, loss and optimiser from settings; resume, log, checkpoint.

It runs in every process of a (possibly distributed) job; only rank 0 writes. The caller sets up the
process group; nothing here knows how the processes were started.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from lymphoma.augment import AugmentSettings, build_augmenter, choose_backend
from lymphoma.checkpoint import (
    load_checkpoint,
    load_model_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lymphoma.data import make_loader
from lymphoma.dataset import TileDataset
from lymphoma.engine import EpochStats, evaluate, train_one_epoch
from lymphoma.errors import InputError
from lymphoma.files import write_text_atomic
from lymphoma.metrics import class_weights
from lymphoma.model import ModelSettings, build_model
from lymphoma.settings import TrainSettings
from lymphoma.sharding import load_manifest, phase_shards
from lymphoma.stain import StainNormalizer, StainSettings, fit_target


@dataclass(frozen=True)
class Rank:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def loader_workers(device: torch.device, rank: Rank) -> int:
    """The default loader processes: 1 beside a CPU training (more steal the model's cores), else this
    process's share of the node's cores, at most 8."""
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


def open_phase(tiles_dir: Path, phase: str, expected_size: Optional[int], crop: int) -> TileDataset:
    """The phase's shards as one dataset, checked against the settings that will use it."""
    dataset = TileDataset(phase_shards(tiles_dir, phase))
    if len(dataset) == 0:
        raise InputError(f"{tiles_dir}: the {phase!r} phase has no tiles; check the split and the skipped images")
    if expected_size is not None and dataset.tile_size != expected_size:
        raise InputError(f"{tiles_dir}: stores hold {dataset.tile_size}-px tiles but tiles.size is {expected_size}; "
                         f"rerun `lymphoma tile` with these settings or set tiles.size={dataset.tile_size}")
    if crop > (dataset.tile_size or 0):
        raise InputError(f"augment.crop={crop} is larger than the stored {dataset.tile_size}-px tiles; "
                         "lower augment.crop or tile with a larger tiles.size")
    return dataset


def preflight(tiles_dir: Path, out_dir: Path, train: TrainSettings, model_settings: ModelSettings,
              augment: AugmentSettings, tile_size: Optional[int]) -> None:
    """Check, before any process starts, what would make training fail: stores that do not match the
    settings, an empty phase, a class without training tiles, a last.pt of another architecture."""
    tiles = [open_phase(tiles_dir, phase, tile_size, augment.crop) for phase in ("train", train.eval_phase)]
    class_weights(tiles[0].class_counts(), tiles[0].classes or [])
    last = out_dir / "checkpoints" / "last.pt"
    if last.is_file():
        state = load_checkpoint(last)
        wanted = model_settings.architecture(len(tiles[0].classes or []))
        if state["architecture"] != wanted:
            raise InputError(f"{last} holds another architecture ({state['architecture']}) than model settings "
                             f"({wanted}); training would resume from it: restore the model settings, or use "
                             "another run.name to start afresh")
    for dataset in tiles:
        dataset.close()


def make_optimizer(model: torch.nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    kind = torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam
    return kind(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, s: TrainSettings) -> torch.optim.lr_scheduler.LRScheduler:
    if s.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s.epochs)
    if s.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_size, gamma=s.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _gather_rng(rank: Rank) -> list[dict[str, Any]]:
    state = rng_state()
    if rank.world == 1:
        return [state]
    states: list[Any] = [None] * rank.world
    dist.all_gather_object(states, state)
    return states


def fit(tiles_dir: Path, out_dir: Path, train: TrainSettings, model_settings: ModelSettings,
        augment: AugmentSettings, config: dict[str, Any], rank: Rank, device: torch.device,
        tile_size: Optional[int] = None, stain: StainSettings = StainSettings()) -> dict[str, Any]:
    """Train (resuming from ``out_dir/checkpoints/last.pt`` if there) and return the summary."""
    seed_everything(train.seed, train.deterministic)
    manifest = load_manifest(tiles_dir)
    train_tiles = open_phase(tiles_dir, "train", tile_size, augment.crop)
    eval_tiles = open_phase(tiles_dir, train.eval_phase, tile_size, augment.crop)
    classes = list(train_tiles.classes or [])
    weights = class_weights(train_tiles.class_counts(), classes)

    architecture = model_settings.architecture(len(classes))
    model = build_model(architecture).to(device)
    if train.channels_last:  # faster on GPUs and on CPUs (oneDNN): 1.6x for a CPU training step here
        model = model.to(memory_format=torch.channels_last)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if rank.world > 1 else model
    criterion = torch.nn.CrossEntropyLoss(weight=weights.to(device) if train.class_weighted else None,
                                          label_smoothing=train.label_smoothing)
    optimizer = make_optimizer(model, train)
    scheduler = make_scheduler(optimizer, train)
    scaler = torch.amp.GradScaler("cuda", enabled=False)  # bf16 autocast needs no loss scaling
    amp = train.amp and device.type == "cuda"

    ckpt_dir = out_dir / "checkpoints"
    start_epoch, best_loss, history = 0, float("inf"), []
    torch.manual_seed(train.seed + rank.rank)  # augmentation differs per rank; the model came from one seed
    if (ckpt_dir / "last.pt").is_file():
        state = load_checkpoint(ckpt_dir / "last.pt")
        load_model_weights(model, state, ckpt_dir / "last.pt")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best_loss, history = state["epoch"] + 1, state["best_val_loss"], state["history"]
        if len(state["rng"]) == rank.world:
            set_rng_state(state["rng"][rank.rank])

    backend = choose_backend(augment)
    target = fit_target(stain)
    normalizer = StainNormalizer(target) if target is not None else None
    train_aug = build_augmenter(augment, True, device, seed=train.seed * 1000 + rank.rank, normalizer=normalizer)
    eval_aug = build_augmenter(augment, False, device, normalizer=normalizer)
    workers = train.num_workers if train.num_workers is not None else loader_workers(device, rank)
    train_loader = make_loader(train_tiles, train_aug.sample, train.batch_size, rank.rank, rank.world, True,
                               train.seed, workers)
    eval_loader = make_loader(eval_tiles, eval_aug.sample, train.eval_batch_size, rank.rank, rank.world, False,
                              train.seed, workers)

    writer = None
    if rank.main:
        print(f"training on {device} x {rank.world} process(es), {backend} augmentation, {len(train_tiles)} train "
              f"and {len(eval_tiles)} {train.eval_phase} tiles, from epoch {start_epoch + 1} of {train.epochs}",
              flush=True)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_epoch)
        if start_epoch == 0:
            _log_augmentation(writer, train_tiles, train_aug, augment)

    base = {"architecture": architecture, "classes": classes, "tiles": manifest["tiles"],
            "augment": asdict(augment), "config": config, "backend": backend,
            "stain": target.as_dict() if target is not None else None}
    for epoch in range(start_epoch, train.epochs):
        if stop_early(history, train.patience):
            break
        train_loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        stats = train_one_epoch(ddp, train_loader, train_aug, criterion, optimizer, scaler, device, epoch, amp,
                                train.channels_last, train.max_steps_per_epoch)
        val = evaluate(ddp, eval_loader, eval_aug, criterion, device, len(classes), amp, train.channels_last)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        improved = val.loss < best_loss
        best_loss = min(best_loss, val.loss)
        history.append({"epoch": epoch, "train_loss": stats.loss, "val_loss": val.loss, "val_accuracy": val.accuracy,
                        "lr": lr, "images_per_s": stats.images_per_s})
        rngs = _gather_rng(rank)
        if rank.main:
            _log_epoch(writer, epoch, stats, val, lr, classes)
            state = {**base, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                     "best_val_loss": best_loss, "val_loss": val.loss, "val_accuracy": val.accuracy,
                     "history": history, "rng": rngs}
            save_checkpoint(state, ckpt_dir / "last.pt")
            if improved:
                save_checkpoint(state, ckpt_dir / "best.pt")
            write_text_atomic(out_dir / "history.json", json.dumps(history, indent=2) + "\n")
            print(f"epoch {epoch + 1}/{train.epochs}: train loss {stats.loss:.4f}, val loss {val.loss:.4f}, "
                  f"val accuracy {val.accuracy:.3f}, {stats.images_per_s:.0f} images/s"
                  + (" (best)" if improved else ""), flush=True)
        if rank.world > 1:
            dist.barrier()
    if writer is not None:
        writer.close()
    train_tiles.close()
    eval_tiles.close()
    best = min(history, key=lambda h: h["val_loss"]) if history else {}
    if rank.main and stop_early(history, train.patience) and len(history) < train.epochs:
        print(f"stopped early after epoch {len(history)}: no better val loss for {train.patience} epoch(s)", flush=True)
    return {"epochs": len(history), "stopped_early": len(history) < train.epochs,
            "best_epoch": best.get("epoch"), "best_val_loss": best.get("val_loss"),
            "best_val_accuracy": best.get("val_accuracy"), "checkpoints": str(ckpt_dir), "backend": backend,
            "world_size": rank.world, "rank": rank.rank, "device": str(device), "weights_sha1": weights_digest(model)}


def stop_early(history: list[dict[str, Any]], patience: Optional[int]) -> bool:
    """Whether the last ``patience`` epochs all failed to improve on the best val loss before them."""
    if patience is None or not history:
        return False
    best = min(range(len(history)), key=lambda i: history[i]["val_loss"])
    return len(history) - 1 - best >= patience


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-1 of every parameter and buffer, to compare models across processes and runs."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _log_epoch(writer: Any, epoch: int, stats: EpochStats, val: EpochStats, lr: float, classes: list[str]) -> None:
    step = epoch + 1
    writer.add_scalar("train/loss", stats.loss, step)
    writer.add_scalar("train/images_per_s", stats.images_per_s, step)
    writer.add_scalar("val/loss", val.loss, step)
    writer.add_scalar("val/accuracy", val.accuracy, step)
    writer.add_scalar("lr", lr, step)
    for i in range(len(classes)):
        for j in range(len(classes)):
            writer.add_scalar(f"val/{i}{j}", int(val.confusion[i, j]), step)
    writer.flush()


def _log_augmentation(writer: Any, tiles: TileDataset, augmenter: Any, settings: AugmentSettings, n: int = 16) -> None:
    """A grid of the first tiles before and after the training augmentation."""
    from torchvision.utils import make_grid

    raw, _ = tiles.read_batch(list(range(min(n, len(tiles)))))
    before = torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255
    batch = torch.stack([augmenter.sample(t) for t in raw]) if augmenter.sample else torch.from_numpy(raw)
    after = augmenter.batch(batch, 0).float().cpu()
    after = after * torch.tensor(settings.std).view(1, 3, 1, 1) + torch.tensor(settings.mean).view(1, 3, 1, 1)
    writer.add_image("augment/before", make_grid(before, nrow=4), 0)
    writer.add_image("augment/after", make_grid(after.clamp(0, 1), nrow=4), 0)
