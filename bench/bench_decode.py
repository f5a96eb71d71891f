"""Decoding the data set's PNGs (417x312, 8-bit RGB): Wuffs (pywuffs, what ``lymphoma.images`` uses), libspng
(pyspng, its fallback) and PIL on the same bytes already in memory, then ``read_rgb`` as every reader calls it
(the file read, the header and CRC checks, Wuffs), each timed in turn for ``--rounds`` rounds on one thread;
ms an image as the median over the rounds, every round's figure kept. Every decoder's pixels are checked against
PIL's first.

    .venv/bin/python bench/bench_decode.py [--images 307] [--rounds 5] [--out bench/results/decode.json]
"""

from __future__ import annotations

import argparse
import io
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from common import emit, timed
from jobs.config import default_data_root
from lymphoma.images import _spng_rgb, _wuffs_rgb, read_rgb


def per_image_ms(decode: Callable[[object], np.ndarray], items: list) -> float:
    """CPU milliseconds an item of ``decode`` over ``items`` (one thread: the process's CPU time is its own)."""
    return timed(lambda: [decode(item) for item in items])[1] / len(items) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=307)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    paths = sorted((Path(default_data_root()) / "lowres").glob("*/*.png"))[:args.images]
    data = [path.read_bytes() for path in paths]
    decoders: dict[str, tuple[Callable[[object], np.ndarray], list]] = {
        "wuffs": (_wuffs_rgb, data),
        "libspng": (_spng_rgb, data),
        "pil": (lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), data),
        "read_rgb": (read_rgb, paths),
    }
    for name, (decode, items) in decoders.items():  # the same pixels, and every decoder warmed up
        for item, raw in zip(items[:20], data[:20]):
            assert np.array_equal(decode(item), np.asarray(Image.open(io.BytesIO(raw)))), name
    rounds: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(args.rounds):
        for name, (decode, items) in decoders.items():
            rounds[name].append(round(per_image_ms(decode, items), 3))
    median = {name: statistics.median(values) for name, values in rounds.items()}
    emit({"images": len(paths), "rounds": args.rounds, "ms_per_image_median": median, "ms_per_image_rounds": rounds,
          "libspng_over_wuffs": round(median["libspng"] / median["wuffs"], 2),
          "pil_over_wuffs": round(median["pil"] / median["wuffs"], 2)}, args.out)


if __name__ == "__main__":
    main()
