"""How much the dealing of cases into folds moves a figure: the reference baseline of `lymphoma cv` (the same
features, the same code, `jobs.baseline.assignment_spread`) over many fold assignments of a config's cohort,
with the percentile of the first few (the assignments a CNN run with `cv.repeats` uses) in that spread.

    .venv/bin/python bench/baseline_spread.py -c configs/lymphoma-lowres.yaml --assignments 30 --out X.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from common import emit
from jobs.baseline import assignment_spread, load_cohort, mid_percentiles
from jobs.run_folder import open_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--assignments", type=int, default=30, help="fold assignments (seeds cv.seed, cv.seed + 1, ...)")
    parser.add_argument("--ranked", type=int, default=3, help="the first this many: their percentiles in the spread")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    run = open_run(args.config, [*args.overrides, f"cv.baseline_assignments={args.assignments}"])
    inputs = run.inputs()
    cohort = load_cohort(inputs.records, inputs.classes, run.dir / "baseline")
    start = time.perf_counter()
    spread = assignment_spread(run.config, inputs.records, cohort, [])
    seconds = time.perf_counter() - start
    out = {"config": args.config, "overrides": args.overrides, "n_images": len(inputs.records),
           "n_cases": len(set(cohort.cases)), "seconds_per_assignment": round(seconds / args.assignments, 2),
           **spread}
    for level in ("image", "case"):
        values = np.asarray(spread[level]["values"])
        out[level]["values"] = values.round(3).tolist()
        out[level]["first_percentiles"] = [round(p) for p in mid_percentiles(values, args.ranked)]
        out[level]["p5_p50_p95"] = np.percentile(values, [5, 50, 95]).round(3).tolist()
        del out[level]["run_percentiles"]
    emit(out, args.out)


if __name__ == "__main__":
    main()
