"""Training throughput on real tiles: the real loader (tiles cached as `lymphoma train` caches them, and read
by loader processes) against the model alone, DALI against torch augmentation, this loader against a
tutorial-style one, and a training step of `lymphoma train` against the tutorial's whole training loop (its
loader, float32 NCHW), as ratios measured in one run.

    .venv/bin/python bench/bench_training.py [--images 48] [--steps 20] [--out bench/results/training.json]

On a GPU machine it runs on the GPU (DALI on the GPU, bf16 autocast, channels_last) and adds a
float32-vs-bf16 comparison; on a CPU machine everything runs on the CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tables
import torch

from common import emit
from hpc.memory import keep_freed_memory
from jobs.config import default_data_root
from lymphoma.augment import build_augmenter, choose_backend, dali_available
from lymphoma.batch_augment import BatchAugmenter
from lymphoma.epochs import StepOptions, train_one_epoch
from lymphoma.inputs import discover
from lymphoma.loaders import cacheable, make_loader
from lymphoma.model import build_model
from lymphoma.phase_tiles import PhaseTiles
from lymphoma.settings import AugmentSettings, ModelSettings, TileSettings
from lymphoma.store import write_shard
from lymphoma.tile_cache import choose_cache

CLASSES = ["CLL", "FL", "MCL"]


class TutorialStyleDataset(torch.utils.data.Dataset):
    """The tutorial's loader: opens the HDF5 file on every item, PIL-based per-sample transforms."""

    def __init__(self, path: Path, crop: int) -> None:
        from torchvision import transforms

        self.path = path
        with tables.open_file(path) as h5:
            self.n = h5.root.imgs.nrows
        self.transform = transforms.Compose([
            transforms.ToPILImage(), transforms.RandomVerticalFlip(), transforms.RandomHorizontalFlip(),
            transforms.RandomRotation(180), transforms.RandomCrop(crop), transforms.ColorJitter(hue=0.5),
            transforms.RandomGrayscale(), transforms.ToTensor()])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with tables.open_file(self.path) as h5:
            tile, label = h5.root.imgs[index], int(h5.root.labels[index])
        return self.transform(tile), label


def tutorial_loop(loader: torch.utils.data.DataLoader, preset: str, device: torch.device, steps: int) -> float:
    """Images/s of the tutorial's training loop: its loader, the same model and crop in float32 NCHW, Adam and
    cross-entropy, one optimiser step per batch (the second pass is measured)."""
    torch.manual_seed(0)
    model = build_model(ModelSettings(preset=preset).architecture(3)).to(device)
    optimizer, criterion = torch.optim.Adam(model.parameters(), lr=1e-4), torch.nn.CrossEntropyLoss()
    speed = 0.0
    for _ in range(2):
        seen, start = 0, time.perf_counter()
        for i, (x, y) in enumerate(loader):
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            seen += len(x)
            if i + 1 >= steps:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        speed = seen / (time.perf_counter() - start)
    return speed


def rate(fn, images_per_call: int, calls: int) -> float:
    """Images/s of ``calls`` calls of ``fn`` after one to warm up, the GPU's work finished within the time."""
    fn()
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize()
    return images_per_call * calls / (time.perf_counter() - start)


@dataclass
class Bench:
    """One run's shared state: the tiles of a real shard, the model and its optimiser, a batch in memory, and
    the figures measured so far (``results``)."""

    args: argparse.Namespace
    device: torch.device
    tiles: PhaseTiles
    results: dict[str, object]

    def __post_init__(self) -> None:
        self.gpu = self.device.type == "cuda"
        self.model = build_model(ModelSettings(preset=self.args.preset).architecture(3)).to(self.device)
        self.model = self.model.to(memory_format=torch.channels_last)  # as training does, on GPUs and CPUs
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.criterion = torch.nn.CrossEntropyLoss()
        self.raw, labels = self.tiles.read_batch(list(range(self.args.batch)))
        self.x = (torch.from_numpy(self.raw[:, 8:120, 8:120]).permute(0, 3, 1, 2).float() / 255).to(self.device)
        self.y = torch.from_numpy(labels).to(self.device)
        self.default = choose_backend(AugmentSettings(), self.device)  # what `lymphoma train` uses here

    def model_step(self, amp: bool) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = self.criterion(self.model(self.x.contiguous(memory_format=torch.channels_last)), self.y)
        loss.backward()
        self.optimizer.step()

    def epoch(self, loader: torch.utils.data.DataLoader, augmenter, amp: bool) -> float:
        """Images/s of ``--steps`` steps of `lymphoma train`'s epoch loop."""
        return train_one_epoch(self.model, loader, augmenter, self.criterion, self.optimizer, self.device, 0,
                               StepOptions(amp=amp, channels_last=True, max_steps=self.args.steps)).images_per_s

    def loader(self, augmenter, cache: str) -> torch.utils.data.DataLoader:
        return make_loader(self.tiles, augmenter.sample, self.args.batch, 0, 1, True, 0, self.args.workers,
                           cache=cache, device=self.device)

    def model_alone(self) -> None:
        """The model's step on the batch in memory (bf16 against fp32 as a ratio)."""
        r, steps = self.results, self.args.steps
        r["model_alone_images_per_s"] = rate(lambda: self.model_step(self.gpu), self.args.batch, steps)
        if self.gpu:
            r["model_alone_fp32_images_per_s"] = rate(lambda: self.model_step(False), self.args.batch, steps)
            r["bf16_vs_fp32"] = r["model_alone_images_per_s"] / r["model_alone_fp32_images_per_s"]
        else:  # train.amp=true on a CPU with bf16 units
            r["model_alone_bf16_images_per_s"] = rate(lambda: self.model_step(True), self.args.batch, steps)
            r["bf16_vs_fp32"] = r["model_alone_bf16_images_per_s"] / r["model_alone_images_per_s"]

    def backend(self, backend: str) -> None:
        """The real loader with one augmentation backend (cached as training caches, and uncached), against the
        model alone; the backend's augmentation throughput."""
        r = self.results
        augmenter = build_augmenter(AugmentSettings(backend=backend), True, self.device, seed=0)
        cache = choose_cache("auto", self.tiles.nbytes, self.device, isinstance(augmenter, BatchAugmenter))
        for mode in ("none", cache) if cacheable(augmenter.sample) and cache != "none" else ("none",):
            loader = self.loader(augmenter, mode)
            self.epoch(loader, augmenter, self.gpu)  # the second pass is measured: workers and pipelines are warm
            speed = self.epoch(loader, augmenter, self.gpu)
            if mode != "none":  # what `lymphoma train` does (train.cache=auto)
                r[f"real_loader_{backend}_uncached_images_per_s"] = r[f"real_loader_{backend}_images_per_s"]
                r[f"real_loader_{backend}_cache"] = mode
            r[f"real_loader_{backend}_images_per_s"] = speed
        if backend == self.default and not self.gpu:  # the same with train.amp=true
            r[f"real_loader_{backend}_bf16_images_per_s"] = self.epoch(loader, augmenter, True)
        for key in ("", "_uncached"):
            if f"real_loader_{backend}{key}_images_per_s" in r:
                r[f"real_loader_{backend}{key}_vs_model_alone"] = (r[f"real_loader_{backend}{key}_images_per_s"]
                                                                   / r["model_alone_images_per_s"])
        raw = self.raw
        batch = torch.stack([augmenter.sample(t) for t in raw]) if augmenter.sample else torch.from_numpy(raw)
        r[f"augment_{backend}_images_per_s"] = rate(
            lambda: augmenter.batch(batch if augmenter.sample is None else
                                    torch.stack([augmenter.sample(t) for t in raw]), 1), self.args.batch, 5)

    def pairs(self) -> None:
        """The default backend's cached loader against loader processes, alternating (a noisy machine)."""
        augmenter = build_augmenter(AugmentSettings(backend=self.default), True, self.device, seed=0)
        cache = choose_cache("auto", self.tiles.nbytes, self.device, isinstance(augmenter, BatchAugmenter))
        pair = {mode: self.loader(augmenter, mode) for mode in ("none", cache)}
        speeds: dict[str, list[float]] = {mode: [] for mode in pair}
        for _ in range(self.args.pairs):
            for mode, loader in pair.items():
                speeds[mode].append(self.epoch(loader, augmenter, self.gpu))
        self.results[f"{cache}_cache_vs_loader_processes_pairs"] = [c / n for c, n in zip(speeds[cache], speeds["none"])]

    def against_tutorial(self, shard: Path) -> None:
        """This project's loader against the tutorial-style one, and training against the tutorial's loop."""
        r, args = self.results, self.args
        ours = make_loader(self.tiles, build_augmenter(AugmentSettings(backend="torch"), True, self.device).sample,
                           args.batch, 0, 1, True, 0, args.workers)
        tutorial = torch.utils.data.DataLoader(TutorialStyleDataset(shard, 112), batch_size=args.batch, shuffle=True,
                                               num_workers=args.workers)
        for name, loader in (("ours", ours), ("tutorial", tutorial)):
            drain(loader, 2)
            start = time.perf_counter()
            seen = drain(loader, args.steps)
            r[f"loader_{name}_images_per_s"] = seen / (time.perf_counter() - start)
        r["loader_ours_vs_tutorial"] = r["loader_ours_images_per_s"] / r["loader_tutorial_images_per_s"]
        r["tutorial_loop_images_per_s"] = tutorial_loop(tutorial, args.preset, self.device, args.steps)
        if f"real_loader_{self.default}_images_per_s" in r:
            r["training_default_backend"] = self.default
            for suffix in ("", "_bf16"):
                if f"real_loader_{self.default}{suffix}_images_per_s" in r:
                    r[f"training{suffix}_vs_tutorial_loop"] = (r[f"real_loader_{self.default}{suffix}_images_per_s"]
                                                               / r["tutorial_loop_images_per_s"])


def drain(loader: torch.utils.data.DataLoader, limit: int) -> int:
    """Images in the first ``limit`` batches of ``loader``."""
    seen = 0
    for i, (batch, _) in enumerate(loader):
        seen += len(batch)
        if i + 1 >= limit:
            break
    return seen


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=1, help="each image's tiles this many times (longer epochs "
                                                                 "from a small carried subset)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--preset", default="densenet-reduced")
    parser.add_argument("--backends", default="dali,torch,batch", help="augmentation backends to compare")
    parser.add_argument("--pairs", type=int, default=0, help="alternate the default backend's cached loader and "
                                                                 "loader processes this many times")
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    keep_freed_memory()  # as every job's task does (hpc.task.task_setup); HPC_KEEP_FREED_MEMORY=0: malloc as it is
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    records = discover(Path(default_data_root()) / "lowres", CLASSES).records
    records = records[:: max(1, len(records) // args.images)][: args.images] * args.repeat
    results: dict[str, object] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                  "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                  "model": args.preset, "batch": args.batch, "workers": args.workers,
                                  "images": len(records) // args.repeat, "repeat": args.repeat}
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "shard.h5"
        write_shard(shard, "train", records, CLASSES, TileSettings(size=128, stride=64), "blosc:zstd:1", "bench")
        tiles = PhaseTiles([shard])
        results["tiles"] = len(tiles)
        bench = Bench(args, device, tiles, results)
        bench.model_alone()
        backends = [b for b in args.backends.split(",") if b != "dali" or dali_available()]
        for backend in backends:
            bench.backend(backend)
        for backend in (b for b in backends if b != "torch" and "torch" in backends):
            results[f"augment_{backend}_vs_torch"] = (results[f"augment_{backend}_images_per_s"]
                                                      / results["augment_torch_images_per_s"])
        if args.pairs:
            bench.pairs()
        bench.against_tutorial(shard)
        tiles.close()
    emit(results, args.out)


if __name__ == "__main__":
    np.random.seed(0)
    main()
