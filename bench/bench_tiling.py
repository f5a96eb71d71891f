"""Tiling throughput on the real data: this project against a tutorial-style loop, in one run.

    .venv/bin/python bench/bench_tiling.py [--images 96] [--out bench/results/tiling.json]

Measures, on the same real images and tile settings (128 px, stride 64):
  1. tiles/s image -> compressed shard, one process: write_shard (defaults) vs the tutorial's way
     (decode, pad, cut, append tile by tile to a zlib:6 EArray);
  2. the default compression against the tutorial's zlib:6: write tiles/s, file size, random-read tiles/s;
  3. `lymphoma tile` with 1 against 2 local array tasks (real subprocesses, start-up included).
Ratios are what to compare: absolute figures depend on the machine.
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
from PIL import Image

from common import emit
from jobs.config import default_data_root
from jobs.run_folder import open_run
from jobs.tile import run_tile
from lymphoma.inputs import ImageRecord, discover
from lymphoma.settings import TileSettings
from lymphoma.store import write_shard

CLASSES = ["CLL", "FL", "MCL"]


def tutorial_style(records: list[ImageRecord], path: Path, size: int, stride: int) -> int:
    """The tutorial's make-database loop: per image decode, pad, cut, then append tile by tile."""
    with tables.open_file(path, mode="w") as h5:
        imgs = h5.create_earray(h5.root, "imgs", tables.UInt8Atom(), shape=(0, size, size, 3),
                                chunkshape=(1, size, size, 3), filters=tables.Filters(complevel=6, complib="zlib"))
        labels = h5.create_earray(h5.root, "labels", tables.UInt8Atom(), shape=(0,))
        names = h5.create_earray(h5.root, "filenames", tables.StringAtom(itemsize=255), shape=(0,))
        for record in records:
            image = np.array(Image.open(record.path).convert("RGB"))
            rows = (image.shape[0] - size) // stride + 1
            cols = (image.shape[1] - size) // stride + 1
            tiles = [image[r * stride:r * stride + size, c * stride:c * stride + size].copy()
                     for r in range(rows) for c in range(cols)]
            for tile in tiles:
                imgs.append(tile[None, ...])
                labels.append([CLASSES.index(record.label)])
            names.append([Path(record.path).name.encode()])
        return int(imgs.nrows)


def random_read_rate(path: Path, n: int = 1500) -> float:
    with tables.open_file(path) as h5:
        imgs = h5.root.imgs
        order = np.random.default_rng(0).integers(0, imgs.nrows, n)
        start = time.perf_counter()
        for i in order:
            imgs[i]
        return n / (time.perf_counter() - start)


def best_of(repeats: int, fn):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cfg = open_run().config
    records = discover(Path(default_data_root()) / "lowres", CLASSES).records
    records = records[:: max(1, len(records) // args.images)][: args.images]
    settings = TileSettings(size=128, stride=64)
    results: dict[str, object] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "images": len(records),
                                  "tile": "128 px, stride 64", "default_compression": cfg.tiles.compression}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        t_base, n_base = best_of(args.repeats, lambda: tutorial_style(records, tmp_dir / "tutorial.h5", 128, 64))
        t_ours, summary = best_of(args.repeats, lambda: write_shard(tmp_dir / "ours.h5", "train", records, CLASSES,
                                                                   settings, cfg.tiles.compression, "bench"))
        assert summary.n_tiles == n_base, (summary.n_tiles, n_base)
        t_zlib, _ = best_of(args.repeats, lambda: write_shard(tmp_dir / "zlib.h5", "train", records, CLASSES,
                                                             settings, "zlib:6", "bench"))
        results["one_process"] = {
            "tutorial_tiles_per_s": n_base / t_base, "ours_tiles_per_s": n_base / t_ours,
            "ratio_ours_vs_tutorial": t_base / t_ours}
        results["compression"] = {
            "default_write_tiles_per_s": n_base / t_ours, "zlib6_write_tiles_per_s": n_base / t_zlib,
            "default_MiB": (tmp_dir / "ours.h5").stat().st_size / 2**20,
            "zlib6_MiB": (tmp_dir / "zlib.h5").stat().st_size / 2**20,
            "raw_MiB": n_base * 128 * 128 * 3 / 2**20,
            "default_read_tiles_per_s": random_read_rate(tmp_dir / "ours.h5"),
            "zlib6_read_tiles_per_s": random_read_rate(tmp_dir / "zlib.h5")}
        c = results["compression"]
        c["write_ratio"] = c["default_write_tiles_per_s"] / c["zlib6_write_tiles_per_s"]
        c["read_ratio"] = c["default_read_tiles_per_s"] / c["zlib6_read_tiles_per_s"]
        c["size_ratio"] = c["default_MiB"] / c["zlib6_MiB"]

        source = tmp_dir / "images"
        for record in records:
            (source / record.label).mkdir(parents=True, exist_ok=True)
            os.symlink(record.path, source / record.label / Path(record.path).name)
        rates = {}
        for workers in (1, 2):
            def tile_all(workers: int = workers) -> object:
                run = open_run(None, [f"data.source={source}", f"run.root={tmp_dir / 'runs'}",
                                         f"run.name=w{workers}-{time.monotonic_ns()}", "tiles.size=128",
                                         "tiles.stride=64", f"tiles.images_per_shard={max(1, len(records) // 8)}",
                                         f"cluster.parallelism={workers}", "cluster.poll_s=0.05"])
                return run_tile(run, progress=False)
            seconds, run = best_of(args.repeats, tile_all)
            rates[workers] = sum(s.n_tiles for s in run.summaries) / seconds
        results["local_array"] = {"tiles_per_s_1_task": rates[1], "tiles_per_s_2_tasks": rates[2],
                                  "ratio_2_vs_1": rates[2] / rates[1], "shards": 8}
    emit(results, args.out)


if __name__ == "__main__":
    main()
