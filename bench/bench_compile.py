"""torch.compile (inductor) as a prediction lever on this CPU: the bare model compiled against eager on the same
real tiles in memory, fp32 and bf16 autocast, in alternating rounds of one run; the compile's own seconds (paid
once per process, that is per prediction task) and the compiled model's agreement with eager.

    .venv/bin/python bench/bench_compile.py [--images 64] [--rounds 3] [--out bench/results/compile.json]

The model is the reduced DenseNet with its initial weights (speed does not depend on training).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from common import emit
from jobs.config import default_data_root
from lymphoma.augment import eval_batch
from lymphoma.images import read_rgb
from lymphoma.inputs import discover
from lymphoma.model import build_model
from lymphoma.settings import AugmentSettings, ModelSettings, TileSettings
from lymphoma.tiling import cut_tiles

CLASSES = ["CLL", "FL", "MCL"]


def batches(images: int, batch: int) -> list[torch.Tensor]:
    """Real 128-px tiles of ``images`` images, centre-cropped and normalised as prediction feeds them (NHWC)."""
    records = discover(Path(default_data_root()) / "lowres", CLASSES).records
    records = records[:: max(1, len(records) // images)][:images]
    tiles = np.concatenate([cut_tiles(read_rgb(r.path), TileSettings(size=128, stride=64)).pixels for r in records])
    x = eval_batch(tiles, AugmentSettings(), torch.device("cpu")).contiguous(memory_format=torch.channels_last)
    return list(x.split(batch))


def throughput(model: torch.nn.Module, xs: list[torch.Tensor], bf16: bool) -> float:
    """Tiles per second of one pass over every batch."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        start = time.perf_counter()
        for x in xs:
            model(x)
    return sum(len(x) for x in xs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternating eager/compiled rounds per precision")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    eager = build_model(ModelSettings().architecture(len(CLASSES))).eval().to(memory_format=torch.channels_last)
    xs = batches(args.images, args.batch)
    results: dict[str, object] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                  "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                                  "tiles": sum(len(x) for x in xs), "batch": args.batch}
    for precision in ("fp32", "bf16"):
        bf16 = precision == "bf16"
        compiled = torch.compile(eager)
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            compiled(xs[0])
            if len(xs[-1]) != len(xs[0]):
                compiled(xs[-1])  # the last, smaller batch compiles again
            reference = torch.cat([eager(x).float() for x in xs])
            outputs = torch.cat([compiled(x).float() for x in xs])
        results[f"compile_s_{precision}"] = time.perf_counter() - start
        results[f"max_abs_logit_difference_{precision}"] = float((outputs - reference).abs().max())
        results[f"same_tile_class_{precision}"] = float((outputs.argmax(1) == reference.argmax(1)).float().mean())
        throughput(eager, xs, bf16)  # warm the eager kernels too
        pairs = [(throughput(eager, xs, bf16), throughput(compiled, xs, bf16)) for _ in range(args.rounds)]
        results[f"eager_tiles_per_s_{precision}"] = [e for e, _ in pairs]
        results[f"compiled_tiles_per_s_{precision}"] = [c for _, c in pairs]
        results[f"compiled_vs_eager_{precision}"] = [c / e for e, c in pairs]
        torch._dynamo.reset()
    emit(results, args.out)


if __name__ == "__main__":
    main()
