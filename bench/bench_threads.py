"""Small fits on one thread against all of them (after a warm-up, best of two each), on a quiet machine and
beside another process that holds one core (a shared node, or a sweep beside), in one run: attention-MIL
training (``lymphoma.mil.bag_threads``; 230 bags of 15 tiles x 128 dimensions, one fold of `lymphoma mil` on
this cohort) and the reference baseline's logistic regressions (``lymphoma.baseline.cv_records``; 307 images x
93 features, 4 folds with C chosen inside).

    .venv/bin/python bench/bench_threads.py [--bags 230] [--tiles 15] [--dim 128] [--epochs 5] [--out ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import lymphoma.baseline as baseline
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


def baseline_seconds(cohort: baseline.Cohort, folds: list[list[str]], threads: Optional[int]) -> float:
    """Wall seconds of the baseline's fits in ``folds`` with BLAS on ``threads`` (None: as many as it has)."""
    import threadpoolctl

    saved = threadpoolctl.threadpool_limits
    if threads is None:  # what cv_records did before: no limit
        threadpoolctl.threadpool_limits = lambda *_: saved(None)  # type: ignore[assignment]
    try:
        start = time.perf_counter()
        baseline.cv_records(cohort, folds, 0)
        return time.perf_counter() - start
    finally:
        threadpoolctl.threadpool_limits = saved  # type: ignore[assignment]


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
    cases = np.asarray([f"case{i % 23}" for i in range(307)])
    cohort = baseline.Cohort([str(i) for i in range(307)], [""] * 307, rng.standard_normal((307, 93)),
                             np.asarray([int(c[4:]) % 3 for c in cases]), cases, ["CLL", "FL", "MCL"])
    folds = [[f"case{i}" for i in range(23) if i % 4 == k] for k in range(4)]
    results: dict[str, object] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                  "torch_threads": torch.get_num_threads(), "bags": args.bags,
                                  "bag": f"{args.tiles} tiles x {args.dim}", "epochs": args.epochs}
    seconds(bags[:10], MILSettings(epochs=1), mil.SMALL_BAG)  # warm up: libraries loaded, thread pools made
    baseline_seconds(cohort, folds[:1], None)
    for where in ("quiet", "beside a busy process"):
        busy = (subprocess.Popen([sys.executable, "-c", "while True: pass"]) if where != "quiet" else None)
        try:
            chosen = min(seconds(bags, settings, mil.SMALL_BAG) for _ in range(2))
            every = min(seconds(bags, settings, 0) for _ in range(2))
            one_blas = min(baseline_seconds(cohort, folds, 1) for _ in range(2))
            all_blas = min(baseline_seconds(cohort, folds, None) for _ in range(2))
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        results[where] = {"mil_one_thread_s": chosen, "mil_all_threads_s": every, "mil_speedup": every / chosen,
                          "baseline_one_thread_s": one_blas, "baseline_all_threads_s": all_blas,
                          "baseline_speedup": all_blas / one_blas}
    emit(results, args.out)


if __name__ == "__main__":
    main()
