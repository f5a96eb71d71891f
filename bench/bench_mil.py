"""Attention-MIL training time: small bags on one thread (``lymphoma.mil.bag_threads``) against all of torch's
threads, on a quiet machine and beside another process that holds one core (a shared node, or a sweep beside),
in one run. Bags shaped as this cohort's: 230 bags of 15 tiles x 128 dimensions (one fold of `lymphoma mil`).

    .venv/bin/python bench/bench_mil.py [--bags 230] [--tiles 15] [--dim 128] [--epochs 5] [--out ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import lymphoma.mil as mil
from common import emit
from lymphoma.settings import MILSettings


def seconds(bags: list[mil.Bag], settings: MILSettings, small_bag: int) -> float:
    """Wall seconds of ``train_mil`` with ``SMALL_BAG`` set to ``small_bag`` (0: every bag on all threads)."""
    saved, mil.SMALL_BAG = mil.SMALL_BAG, small_bag
    try:
        start = time.perf_counter()
        mil.train_mil(bags, 3, settings)
        return time.perf_counter() - start
    finally:
        mil.SMALL_BAG = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, default=230)
    parser.add_argument("--tiles", type=int, default=15)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    bags = [mil.Bag(str(i), rng.standard_normal((args.tiles, args.dim)).astype(np.float32), i % 3,
                    np.asarray([str(i)] * args.tiles)) for i in range(args.bags)]
    settings = MILSettings(epochs=args.epochs)
    results: dict[str, object] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                  "torch_threads": torch.get_num_threads(), "bags": args.bags,
                                  "bag": f"{args.tiles} tiles x {args.dim}", "epochs": args.epochs}
    for where in ("quiet", "beside a busy process"):
        busy = (subprocess.Popen([sys.executable, "-c", "while True: pass"]) if where != "quiet" else None)
        try:
            chosen = seconds(bags, settings, mil.SMALL_BAG)
            every = seconds(bags, settings, 0)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        results[where] = {"one_thread_s": chosen, "all_threads_s": every, "speedup": every / chosen}
    emit(results, args.out)


if __name__ == "__main__":
    main()
