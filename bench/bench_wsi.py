"""Whole-slide tiling: tiles/s and peak memory against slide size (three sizes, the largest 576 MiB decoded),
and reading tiles through OpenSlide against the same pixels from a plain image, in one run.

    .venv/bin/python bench/bench_wsi.py [--out bench/results/wsi.json]

Slides are mosaics of the real lymphoma images written as tiled pyramidal TIFFs (tests/synthetic_slides.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import emit
from jobs.config import default_data_root
from lymphoma.slides import open_slide

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic_slides import write_mosaic_slide  # noqa: E402

TILE_ONE = """
import json, sys, time
from pathlib import Path
from lymphoma.inputs import ImageRecord
from lymphoma.store import write_shard
from lymphoma.settings import TileSettings
start = time.perf_counter()
s = write_shard(Path(sys.argv[2]), "train", [ImageRecord(sys.argv[1], "CLL", "c")], ["CLL", "FL", "MCL"],
                TileSettings(size=128, stride=128, target_mpp=0.5, min_tissue=0.5), "blosc:zstd:1", "x", strict=True)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"tiles": s.n_tiles, "seconds": time.perf_counter() - start, "peak_MiB": int(hwm.split()[1]) / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    images = sorted((Path(default_data_root()) / "lowres").rglob("*.png"))[::20]
    results: dict[str, object] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                  "tiling": "128-px tiles at the slide's own 0.5 mpp, tissue >= 50%, blosc:zstd:1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        sizes = []
        for width, height in ((2048, 1536), (8192, 6144), (16384, 12288)):
            slide = write_mosaic_slide(tmp_dir / f"s{width}.tiff", images, width, height)
            run = subprocess.run([sys.executable, "-c", TILE_ONE, str(slide), str(tmp_dir / f"s{width}.h5")],
                                 capture_output=True, text=True, check=True)
            figures = json.loads(run.stdout.strip().splitlines()[-1])
            sizes.append({"slide": f"{width}x{height}", "decoded_MiB": width * height * 3 / 2**20,
                          "tiles": figures["tiles"], "tiles_per_s": figures["tiles"] / figures["seconds"],
                          "peak_MiB": figures["peak_MiB"]})
        results["by_size"] = sizes

        slide = write_mosaic_slide(tmp_dir / "read.tiff", images, 4096, 3072)
        with open_slide(slide) as reader:
            plain = reader.read_region(0, 0, 0, 4096, 3072)
        png = tmp_dir / "read.png"
        Image.fromarray(plain).save(png, compress_level=1)
        coords = [(x, y) for y in range(0, 3072, 128) for x in range(0, 4096, 128)]
        start = time.perf_counter()
        with open_slide(slide) as reader:
            for x, y in coords:
                reader.read_region(x, y, 0, 128, 128)
        openslide_rate = len(coords) / (time.perf_counter() - start)
        start = time.perf_counter()
        image = np.asarray(Image.open(png).convert("RGB"))
        for x, y in coords:
            np.ascontiguousarray(image[y:y + 128, x:x + 128])
        plain_rate = len(coords) / (time.perf_counter() - start)
        results["read_4096x3072"] = {"openslide_tiles_per_s": openslide_rate, "plain_image_tiles_per_s": plain_rate,
                                     "openslide_vs_plain": openslide_rate / plain_rate}
    emit(results, args.out)


if __name__ == "__main__":
    main()
