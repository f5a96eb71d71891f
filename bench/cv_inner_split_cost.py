"""What the inner split of `lymphoma cv` costs in patients, measured on the reference baseline: in each fold of
many fold assignments, the logistic regression on colour/texture features fitted on every training case (as
`lymphoma cv` fits it) against one fitted on the cases the fold's CNN trains on (the training cases less the
inner val of ``cv.inner_val_fraction``, drawn as `lymphoma cv` draws it), both tested on the same test cases.
With ``train.select=last`` (the default) the CNN's inner val chooses nothing; it watches training and gates the
shipped ensemble, and takes about 3 of a fold's 17 training patients.

    .venv/bin/python bench/cv_inner_split_cost.py -c configs/lymphoma-lowres.yaml [--repeats 30] [--out ...]
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
from cv_embeddings import paired
from threadpoolctl import threadpool_limits

from common import emit, reference_cv_args
from jobs.baseline import load_cohort
from jobs.run_folder import open_run
from lymphoma.baseline import Cohort, fold_records, pooled_accuracy
from lymphoma.crossval import fold_phases, grouped_folds


def without_cases(cohort: Cohort, cases: set[str]) -> Cohort:
    """The cohort less every image of ``cases``."""
    keep = ~np.isin(cohort.cases, sorted(cases))
    return replace(cohort, keys=[k for k, kept in zip(cohort.keys, keep) if kept],
                   paths=[p for p, kept in zip(cohort.paths, keep) if kept],
                   features=cohort.features[keep], labels=cohort.labels[keep], cases=cohort.cases[keep])


def assignment(cohort: Cohort, records: list[Any], folds: list[list[str]], fraction: float, seed: int
               ) -> tuple[tuple[float, float], tuple[float, float], float]:
    """Pooled (image, case) accuracy fitted on every training case and on the training cases less the inner
    val, and the mean number of training cases the inner val takes."""
    every, fewer, dropped = [], [], []
    for test_cases in folds:
        phase_of = fold_phases(records, test_cases, fraction, seed)
        inner = {case for case, phase in phase_of.items() if phase == "val"}
        every.append(fold_records(cohort, cohort.labels, test_cases, seed))
        fitted = without_cases(cohort, inner)
        fewer.append(fold_records(fitted, fitted.labels, test_cases, seed))
        dropped.append(len(inner))
    return pooled_accuracy(every, cohort.classes), pooled_accuracy(fewer, cohort.classes), float(np.mean(dropped))


def main() -> None:
    args = reference_cv_args(__doc__)
    run = open_run(args.config)
    inputs, cv = run.inputs(), run.config.cv
    cohort = load_cohort(inputs.records, inputs.classes, run.dir / "baseline")
    rows = []
    with threadpool_limits(1):
        for r in range(args.repeats):
            folds = grouped_folds(inputs.records, cv.folds, cv.seed + r)
            rows.append(assignment(cohort, inputs.records, folds, cv.inner_val_fraction, cv.seed + r))
    methods = {name: {level: [round(row[i][j], 3) for row in rows] for j, level in enumerate(("image", "case"))}
               for i, name in enumerate(("every training case", "less the inner val"))}
    for method in methods.values():
        method.update({f"{level}_mean_sd": [round(float(np.mean(method[level])), 3), round(float(np.std(method[level])), 3)]
                       for level in ("image", "case")})
    emit({"config": args.config, "images": len(inputs.records), "folds": cv.folds,
          "inner_val_fraction": cv.inner_val_fraction, "seeds": [cv.seed + r for r in range(args.repeats)],
          "inner_val_cases_per_fold": round(float(np.mean([row[2] for row in rows])), 2), "methods": methods,
          "less_the_inner_val_minus_every": paired(methods["less the inner val"], methods["every training case"])},
         args.out)


if __name__ == "__main__":
    main()
