"""The experiment table of the README from cross-validation runs: one row per run folder and prediction
variant (cv, cv-last, cv-tta), with pooled image- and case-level accuracy (majority vote) as the mean +- sd
over the run's fold assignments (cv.repeats) and, with one assignment, its case-bootstrap interval; the
reference baseline in the same folds and its permutation null; and where each run fails, over all its
assignments: how often it predicts each class, each class's recall, and with ``--case-groups REGEX`` the image
accuracy per group of cases (the regex's first group of the case id, e.g. the year prefix ``^(sj-0[345])``).

    .venv/bin/python bench/cv_table.py runs/cv-tutorial runs/cv-stable ... [--out bench/results/cv.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections import Counter
from pathlib import Path
from typing import Optional

from common import emit

VARIANTS = {"cv": "", "cv-last": " (last epoch)", "cv-tta": " + TTA", "cv-last-tta": " (last epoch) + TTA"}


def figure(report: dict, aggregate: str, level: str, kind: str = "accuracy") -> str:
    """Mean +- sd over fold assignments, or the single assignment's value with its interval."""
    across = report.get("across_repeats") or {}
    if across.get("n", 1) > 1:
        entry = across[f"{aggregate}_{level}_{kind}"]
        return f"{entry['mean']:.3f} +- {entry['sd']:.3f} (n={across['n']})"
    low, high = report[aggregate]["interval"][f"{level}_{kind}"]
    return f"{report[aggregate][level][kind]:.3f} [{low:.2f}, {high:.2f}]"


def baseline_cell(report: dict) -> str:
    baseline = report.get("baseline")
    if not baseline:
        return ""
    across = baseline["across_repeats"]
    image, case = across["vote_image_accuracy"], across["vote_case_accuracy"]
    null = baseline.get("null") or {}
    tail = f"; null p95 {null['image']['p95']:.2f}/{null['case']['p95']:.2f}" if null.get("permutations") else ""
    return f"{image['mean']:.3f} / {case['mean']:.3f}{tail}"


def row(run: Path, variant: str, report: dict) -> str:
    epochs = [str(k["epoch"]) for k in report.get("kept", []) if k.get("epoch") and k["repeat"] == 0]
    return (f"| {run.name}{VARIANTS[variant]} | {figure(report, 'vote', 'image')} | "
            f"{figure(report, 'vote', 'image', 'balanced_accuracy')} | {figure(report, 'vote', 'case')} | "
            f"{figure(report, 'mean', 'image')} | {baseline_cell(report)} | {'/'.join(epochs)} | "
            f"{report['minutes']:.0f} |")


def where_it_fails(predictions: Path, case_groups: Optional[str] = None) -> dict:
    """Over every fold assignment's predicted images: the count of each voted class, each true class's recall
    and, with ``case_groups``, the accuracy per group of cases."""
    rows = [r for r in csv.DictReader(predictions.open()) if r["status"] == "ok"]
    truths = Counter(r["truth"] for r in rows)
    right = Counter(r["truth"] for r in rows if r["vote_class"] == r["truth"])
    out = {"images": len(rows), "predicted": dict(sorted(Counter(r["vote_class"] for r in rows).items())),
           "recall": {c: round(right[c] / n, 3) for c, n in sorted(truths.items())}}
    if case_groups:
        groups: dict[str, list[bool]] = {}
        for r in rows:
            match = re.search(case_groups, r["case"])
            groups.setdefault(match.group(1) if match else "other", []).append(r["vote_class"] == r["truth"])
        out["accuracy_by_group"] = {g: {"images": len(v), "accuracy": round(sum(v) / len(v), 3)}
                                    for g, v in sorted(groups.items())}
    return out


def summarise(runs: list[Path], variants: tuple[str, ...] = tuple(VARIANTS), echo: bool = True,
              case_groups: Optional[str] = None) -> dict:
    """The figures of these run folders by ``<run>/<variant>``, printing each as a row of the table."""
    summary = {}
    for run in runs:
        for variant in variants:
            path = run / variant / "report.json"
            if not path.is_file():
                continue
            report = json.loads(path.read_text())
            if echo:
                print(row(run, variant, report))
            keep = ("vote", "mean", "n_images", "n_cases", "minutes", "tta", "checkpoint", "across_repeats", "kept")
            entry = {k: report.get(k) for k in keep}
            if report.get("baseline"):
                entry["baseline"] = {k: report["baseline"].get(k) for k in ("across_repeats", "null", "cnn_above_null")}
            for aggregate in ("vote", "mean"):
                entry[aggregate] = {k: v for k, v in entry[aggregate].items() if k != "folds"}
            if (run / variant / "predictions.csv").is_file():
                entry["errors"] = where_it_fails(run / variant / "predictions.csv", case_groups)
            summary[f"{run.name}/{variant}"] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--case-groups", metavar="REGEX", help="accuracy per group of cases: the regex's first "
                        "group of each case id (e.g. '^(sj-0[345])', the year prefix of this data set)")
    args = parser.parse_args()
    print("| run | image acc. (vote) | image balanced acc. | case acc. (vote) | image acc. (mean prob.) "
          "| baseline image / case acc. (same folds) | epoch kept per fold | minutes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    summary = summarise(args.runs, case_groups=args.case_groups)
    if args.out:
        emit(summary, args.out)


if __name__ == "__main__":
    main()
