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
from pathlib import Path

import numpy as np
import tables
import torch

from common import emit
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


def main() -> None:
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
    args = parser.parse_args()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gpu = device.type == "cuda"
    records = discover(Path(default_data_root()) / "lowres", CLASSES).records
    records = records[:: max(1, len(records) // args.images)][: args.images] * args.repeat
    results: dict[str, object] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                  "device": torch.cuda.get_device_name() if gpu else "cpu", "model": args.preset,
                                  "batch": args.batch, "workers": args.workers,
                                  "images": len(records) // args.repeat, "repeat": args.repeat}
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "shard.h5"
        write_shard(shard, "train", records, CLASSES, TileSettings(size=128, stride=64), "blosc:zstd:1", "bench")
        tiles = PhaseTiles([shard])
        results["tiles"] = len(tiles)
        model = build_model(ModelSettings(preset=args.preset).architecture(3)).to(device)
        model = model.to(memory_format=torch.channels_last)  # as training does, on GPUs and CPUs
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        criterion = torch.nn.CrossEntropyLoss()
        raw, labels = tiles.read_batch(list(range(args.batch)))
        x = (torch.from_numpy(raw[:, 8:120, 8:120]).permute(0, 3, 1, 2).float() / 255).to(device)
        y = torch.from_numpy(labels).to(device)

        def model_step(amp: bool = gpu) -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = criterion(model(x.contiguous(memory_format=torch.channels_last)), y)
            loss.backward()
            optimizer.step()

        model_alone = rate(model_step, args.batch, args.steps)
        results["model_alone_images_per_s"] = model_alone
        if gpu:
            results["model_alone_fp32_images_per_s"] = rate(lambda: model_step(False), args.batch, args.steps)
            results["bf16_vs_fp32"] = model_alone / results["model_alone_fp32_images_per_s"]
        else:  # train.amp=true on a CPU with bf16 units
            results["model_alone_bf16_images_per_s"] = rate(lambda: model_step(True), args.batch, args.steps)
            results["bf16_vs_fp32"] = results["model_alone_bf16_images_per_s"] / model_alone

        n_batches = args.steps
        backends = [b for b in args.backends.split(",") if b != "dali" or dali_available()]
        default = choose_backend(AugmentSettings(), device)  # what `lymphoma train` uses here
        for backend in backends:
            settings = AugmentSettings(backend=backend)
            augmenter = build_augmenter(settings, True, device, seed=0)
            cache = choose_cache("auto", tiles.nbytes, device, isinstance(augmenter, BatchAugmenter))
            for mode in ("none", cache) if cacheable(augmenter.sample) and cache != "none" else ("none",):
                loader = make_loader(tiles, augmenter.sample, args.batch, 0, 1, True, 0, args.workers, cache=mode,
                                     device=device)
                for _ in range(2):  # the second pass is measured: workers and pipelines are warm
                    stats = train_one_epoch(model, loader, augmenter, criterion, optimizer, device, 0,
                                            StepOptions(amp=gpu, channels_last=True, max_steps=n_batches))
                if mode != "none":  # what `lymphoma train` does (train.cache=auto)
                    results[f"real_loader_{backend}_uncached_images_per_s"] = results[
                        f"real_loader_{backend}_images_per_s"]
                    results[f"real_loader_{backend}_cache"] = mode
                results[f"real_loader_{backend}_images_per_s"] = stats.images_per_s
            if backend == default and not gpu:  # the same with train.amp=true
                stats = train_one_epoch(model, loader, augmenter, criterion, optimizer, device, 0,
                                        StepOptions(amp=True, channels_last=True, max_steps=n_batches))
                results[f"real_loader_{backend}_bf16_images_per_s"] = stats.images_per_s
            for key in ("", "_uncached"):
                if f"real_loader_{backend}{key}_images_per_s" in results:
                    results[f"real_loader_{backend}{key}_vs_model_alone"] = (
                        results[f"real_loader_{backend}{key}_images_per_s"] / model_alone)
            batch = torch.stack([augmenter.sample(t) for t in raw]) if augmenter.sample else torch.from_numpy(raw)
            results[f"augment_{backend}_images_per_s"] = rate(
                lambda: augmenter.batch(batch if augmenter.sample is None else
                                        torch.stack([augmenter.sample(t) for t in raw]), 1), args.batch, 5)
        for backend in (b for b in backends if b != "torch" and "torch" in backends):
            results[f"augment_{backend}_vs_torch"] = (results[f"augment_{backend}_images_per_s"]
                                                      / results["augment_torch_images_per_s"])

        if args.pairs:  # the default backend's cached loader against loader processes, alternating (a noisy machine)
            augmenter = build_augmenter(AugmentSettings(backend=default), True, device, seed=0)
            cache = choose_cache("auto", tiles.nbytes, device, isinstance(augmenter, BatchAugmenter))
            pair = {mode: make_loader(tiles, augmenter.sample, args.batch, 0, 1, True, 0, args.workers, cache=mode,
                                      device=device) for mode in ("none", cache)}
            speeds: dict[str, list[float]] = {mode: [] for mode in pair}
            for _ in range(args.pairs):
                for mode, loader in pair.items():
                    speeds[mode].append(train_one_epoch(model, loader, augmenter, criterion, optimizer, device, 0, StepOptions(
                        amp=gpu, channels_last=True, max_steps=n_batches)).images_per_s)
            results[f"{cache}_cache_vs_loader_processes_pairs"] = [c / n for c, n in zip(speeds[cache], speeds["none"])]

        def drain(loader: torch.utils.data.DataLoader, limit: int) -> int:
            seen = 0
            for i, (batch, _) in enumerate(loader):
                seen += len(batch)
                if i + 1 >= limit:
                    break
            return seen

        ours = make_loader(tiles, build_augmenter(AugmentSettings(backend="torch"), True, device).sample, args.batch,
                           0, 1, True, 0, args.workers)
        tutorial = torch.utils.data.DataLoader(TutorialStyleDataset(shard, 112), batch_size=args.batch, shuffle=True,
                                               num_workers=args.workers)
        for name, loader in (("ours", ours), ("tutorial", tutorial)):
            drain(loader, 2)
            start = time.perf_counter()
            seen = drain(loader, n_batches)
            results[f"loader_{name}_images_per_s"] = seen / (time.perf_counter() - start)
        results["loader_ours_vs_tutorial"] = results["loader_ours_images_per_s"] / results["loader_tutorial_images_per_s"]
        results["tutorial_loop_images_per_s"] = tutorial_loop(tutorial, args.preset, device, n_batches)
        if f"real_loader_{default}_images_per_s" in results:
            results["training_default_backend"] = default
            for suffix in ("", "_bf16"):
                if f"real_loader_{default}{suffix}_images_per_s" in results:
                    results[f"training{suffix}_vs_tutorial_loop"] = (
                        results[f"real_loader_{default}{suffix}_images_per_s"] / results["tutorial_loop_images_per_s"])
        tiles.close()
    emit(results, args.out)


if __name__ == "__main__":
    np.random.seed(0)
    main()
