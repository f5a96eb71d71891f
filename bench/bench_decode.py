"""Decoding the data set's PNGs (417x312, 8-bit RGB): Wuffs (pywuffs, what ``lymphoma.images`` uses), libspng
(pyspng, its fallback) and PIL on the same bytes already in memory, then ``read_rgb`` as every reader calls it
(the file read, the header and CRC checks, Wuffs), each timed in turn for ``--rounds`` rounds on one thread;
ms an image as the median over the rounds, every round's figure kept. Every decoder's pixels are checked against
PIL's first. Then the data set's full-size JPEGs (1388x1040) as a model trained on the 417x312 copies reads them
(`predict.scale=match`, Reinhard by image): decoded at half size by their DCT scaling (``decode_rgb``) against
decoded whole, and the whole reading path (``open_tiles``: decode, resize, Reinhard, cut, overview) against the
same steps after a whole decode, in turn on one thread.

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
from lymphoma.image_scale import TrainingScale
from lymphoma.images import _spng_rgb, _wuffs_rgb, decode_rgb, read_rgb
from lymphoma.settings import TileSettings
from lymphoma.stain import StainNormalizer, StainSettings, fit_target
from lymphoma.tile_sources import open_tiles
from lymphoma.tiling import cut_tiles


def per_image_ms(decode: Callable[[object], np.ndarray], items: list) -> float:
    """CPU milliseconds an item of ``decode`` over ``items`` (one thread: the process's CPU time is its own)."""
    return timed(lambda: [decode(item) for item in items])[1] / len(items) * 1000


def full_size_jpegs(rounds: int) -> dict[str, object]:
    """ms an image, median of ``rounds``, of the full-size JPEGs read at the 417x312 copies' scale."""
    paths = sorted((Path(default_data_root()) / "fullres-jpeg").glob("*/*.jpg"))
    normalise = StainNormalizer(fit_target(StainSettings("reinhard", scope="image")))
    scale, settings = TrainingScale((312, 417), 1.0), TileSettings()
    resize = scale.matched_resize((1040, 1388), settings.resize)

    def whole_path(path: Path) -> object:
        image = read_rgb(path)
        return cut_tiles(image, TileSettings(resize=resize), normalise), Image.fromarray(image).reduce(6)

    steps: dict[str, Callable[[Path], object]] = {
        "decode_half": lambda path: decode_rgb(path, shrink_to=lambda height, width: (312, 417)),
        "decode_whole": read_rgb,
        "open_tiles": lambda path: list(open_tiles(str(path), settings, stain=normalise, scale=scale).batches),
        "decode_whole_then_cut": whole_path,
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(round(per_image_ms(step, paths), 3))
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"images": len(paths), "ms_per_image_median": median, "ms_per_image_rounds": times,
            "decode_whole_over_half": round(median["decode_whole"] / median["decode_half"], 2),
            "reading_whole_over_open_tiles": round(median["decode_whole_then_cut"] / median["open_tiles"], 2)}


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
          "pil_over_wuffs": round(median["pil"] / median["wuffs"], 2),
          "fullres_jpeg": full_size_jpegs(args.rounds)}, args.out)


if __name__ == "__main__":
    main()
