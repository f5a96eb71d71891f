"""Embedding throughput of `lymphoma features` on real images: the whole per-slide path (read, tile, stain,
crop, encoder without its head, HDF5 file per slide) against the encoder's bare forward on the same tiles
already in memory, in one run, for the reduced DenseNet and a ViT-S (timm, input resized to 224).

    .venv/bin/python bench/bench_features.py [--images 40] [--tasks 1] [--precision fp32] [--engine torch]
        [--encoders ...] [--out F]

``--tasks 2``: both sides timed as 2 processes of half the cores at once, each on half the images, as `lymphoma
features` runs on a CPU node (its array tasks, cluster.parallelism at once, the cores shared among them).

Encoders are randomly initialised (speed does not depend on the weights). Target: the whole path at 0.9 of
the bare forward or better. Each row also gives the CPU time a tile of both sides and of reading alone, and
the ratio that reading's CPU time leaves when every core is busy (``ratio_ceiling_cpu_bound``).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common import emit, timed, timed_in_tasks
from hpc.memory import keep_freed_memory
from hpc.task import thread_share
from jobs.config import default_data_root
from lymphoma.features import Engine, FeatureWriter, _encoder
from lymphoma.images import read_rgb
from lymphoma.inputs import discover
from lymphoma.model import build_model
from lymphoma.prediction import SlideInput, predict_slides
from lymphoma.settings import AugmentSettings, ModelSettings, StainSettings, TileSettings
from lymphoma.stain import StainNormalizer, fit_target
from lymphoma.tile_sources import open_normalized_tiles
from lymphoma.tiling import cut_tiles

CLASSES = ["CLL", "FL", "MCL"]


def stain_normalizer(stain: str, scope: str) -> StainNormalizer | None:
    """The normaliser of a model trained with ``stain.normalize`` and ``stain.scope`` (None: none)."""
    target = fit_target(StainSettings(stain, scope=scope))
    return StainNormalizer(target) if target is not None else None


def prepare(settings: ModelSettings, paths: list[str], stain: str, batch: int, device: torch.device,
            readers: int, scope: str, mode: str, out: Path, engine: Engine = Engine()) -> Callable[[], None]:
    """The timed part of one measurement, prepared (encoder built, tiles read, one warm-up run): the bare forward
    on the tiles already read and normalised (``mode`` bare), or the whole path (``mode`` whole) into ``out``."""
    tiles, augment = TileSettings(), AugmentSettings()
    normalizer = stain_normalizer(stain, scope)
    torch.manual_seed(0)
    about = {"backbone": settings.backbone or "densenet-reduced", "encoder": "random", "tiles": tiles.as_dict(),
             "stain": stain}
    encoder, meta = _encoder(build_model(settings.architecture(1)), tiles, augment, normalizer, device, batch, about,
                             engine)
    if mode == "whole":
        slides = [SlideInput(p, Path(p).stem) for p in paths]

        def whole() -> None:
            if out.exists():  # every slide written again, none resumed; moved aside into a folder of its own
                # (unique across the processes of repeated timings), as deleting 120 files took 3% of a pass
                out.rename(Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{out.name}-done-")) / out.name)
            records = predict_slides(encoder, slides, out, 4, writer=FeatureWriter(out, meta), readers=readers)
            assert all(r["status"] == "ok" for r in records)
        whole()
        return whole
    normalized = np.concatenate([pixels for p in paths  # as the reader gives them to the encoder
                                 for pixels in open_normalized_tiles(p, tiles, normalizer).batches])

    def bare() -> None:  # the encoder's forward as the pipeline calls it (crop, precision), nothing else
        for i in range(0, len(normalized), batch):
            encoder.logits(normalized[i:i + batch], stain_normalized=True)
    bare()
    return bare


def measure(settings: ModelSettings, paths: list[str], stain: str, batch: int, device: torch.device,
            readers: int = 1, scope: str = "tile", tasks: int = 1, engine: Engine = Engine()) -> dict[str, float]:
    """Tiles per second of the bare forward and of the whole path, best of two each; with ``tasks`` > 1, both in
    that many processes at once, each on its share of the images and of the cores (as the job's array tasks).
    Also the CPU time of each per tile, that of reading alone (decode, tile, stain; one thread), and the ratio
    a CPU-bound node cannot pass: the forward's CPU time over the forward's and the reading's."""
    n_tiles = sum(len(cut_tiles(read_rgb(p), TileSettings()).pixels) for p in paths)
    rates, cpu = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("bare", "whole"):
            per_task = [(settings, paths[i::tasks], stain, batch, device, readers, scope, mode, Path(tmp) / f"{i}",
                         engine) for i in range(tasks)]
            if tasks > 1:
                timings = [timed_in_tasks(prepare, per_task, thread_share(tasks)) for _ in range(2)]
            else:
                run = prepare(*per_task[0])
                timings = [timed(run) for _ in range(2)]
            wall, seconds = min(timings)
            rates[mode], cpu[mode] = n_tiles / wall, 1e3 * seconds / n_tiles
    reading = reading_cpu_ms(paths, stain, scope) / n_tiles
    return {"tiles": n_tiles, "bare_tiles_per_s": rates["bare"], "features_tiles_per_s": rates["whole"],
            "ratio_features_vs_bare": rates["whole"] / rates["bare"], "bare_cpu_ms_per_tile": cpu["bare"],
            "features_cpu_ms_per_tile": cpu["whole"], "reading_cpu_ms_per_tile": reading,
            "ratio_ceiling_cpu_bound": cpu["bare"] / (cpu["bare"] + reading)}


def reading_cpu_ms(paths: list[str], stain: str, scope: str) -> float:
    """CPU milliseconds of reading every image as the reader thread does (decode, tile, stain normalisation)."""
    normalizer = stain_normalizer(stain, scope)
    start = time.process_time()
    for path in paths:
        for _ in open_normalized_tiles(path, TileSettings(), normalizer).batches:
            pass
    return 1e3 * (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--vit-images", type=int, default=12, help="images for the ViT-S (about 5 tiles/s on 2 cores)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--readers", type=int, default=1, help="reader threads (predict.readers)")
    parser.add_argument("--tasks", type=int, default=1,
                        help="processes at once, each on its share of the images and cores, as `lymphoma features` "
                             "runs its array tasks on a CPU node (cluster.parallelism, default 2)")
    parser.add_argument("--encoders", default="densenet-reduced,vit_small_patch16_224",
                        help="which of densenet-reduced, vit_small_patch16_224 to measure")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="predict.precision of both sides (bf16: autocast, on CPUs too)")
    parser.add_argument("--engine", choices=("torch", "onnxruntime", "openvino"), default="torch",
                        help="predict.engine of both sides (onnxruntime, openvino: the encoder's ONNX export)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    keep_freed_memory()  # as every job's task does (hpc.task.task_setup); HPC_KEEP_FREED_MEMORY=0: malloc as it is
    if args.tasks > 1 and args.device != "cpu":
        raise SystemExit("--tasks measures CPU nodes: use it with --device cpu")
    device = torch.device(args.device)
    records = discover(Path(default_data_root()) / "lowres", CLASSES).records
    paths = [r.path for r in records[:: max(1, len(records) // args.images)][: args.images]]
    results: dict[str, object] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                                             f"{torch.get_num_threads()} torch threads", "device": str(device),
                                  "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                                  "images": len(paths), "readers": args.readers, "tasks": args.tasks,
                                  "threads_per_task": thread_share(args.tasks),
                                  "tile": "128 px, stride 64, centre crop 112", "batch": args.batch,
                                  "precision": args.precision, "engine": args.engine}
    encoders = {"densenet-reduced": ModelSettings(), "vit_small_patch16_224": ModelSettings(
        backbone="timm:vit_small_patch16_224")}
    unknown = set(args.encoders.split(",")) - set(encoders)
    if unknown:
        raise SystemExit(f"--encoders: {', '.join(sorted(unknown))} unknown; allowed: {', '.join(encoders)}")
    encoders = {name: encoders[name] for name in args.encoders.split(",")}
    for name, settings in encoders.items():
        chosen = paths if settings.backbone is None else paths[:: max(1, len(paths) // args.vit_images)][:args.vit_images]
        for stain, scope in (("none", "tile"), ("reinhard", "tile"), ("reinhard", "image")):
            row = f"{name}, stain {stain}" + (f" by {scope}" if stain != "none" else "")
            results[row] = {"images": len(chosen), **measure(settings, chosen, stain, args.batch, device,
                                                             args.readers, scope, args.tasks,
                                                             Engine(args.engine, args.precision))}
    emit(results, args.out)


if __name__ == "__main__":
    main()
