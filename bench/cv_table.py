"""The experiment table of the README from cross-validation runs: one row per run folder, its pooled
image- and case-level accuracy with bootstrap intervals, for majority vote and mean probability.

    .venv/bin/python bench/cv_table.py runs/cv-tutorial runs/cv-hed ... [--tta] [--out bench/results/cv.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import emit


def cell(entry: dict, level: str, kind: str = "accuracy") -> str:
    low, high = entry["interval"][f"{level}_{kind}"]
    return f"{entry[level][kind]:.3f} [{low:.2f}, {high:.2f}]"


def row(run: Path, report: dict) -> str:
    vote, mean = report["vote"], report["mean"]
    epochs = [k["epoch"] for k in report.get("kept", []) if k.get("epoch")]
    return (f"| {run.name}{' + TTA' if report.get('tta') else ''} | {cell(vote, 'image')} | "
            f"{cell(vote, 'image', 'balanced_accuracy')} | {cell(vote, 'case')} | {cell(mean, 'image')} | "
            f"{cell(mean, 'case')} | {'/'.join(map(str, epochs))} | {report['minutes']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print("| run | image acc. (vote) | image balanced acc. (vote) | case acc. (vote) | image acc. (mean prob.) "
          "| case acc. (mean prob.) | epochs per fold | minutes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    summary = {}
    for run in args.runs:
        for sub in ("cv", "cv-tta"):
            path = run / sub / "report.json"
            if path.is_file():
                report = json.loads(path.read_text())
                print(row(run, report))
                summary[f"{run.name}/{sub}"] = {k: report[k] for k in ("vote", "mean", "n_images", "n_cases", "minutes",
                                                                       "tta")}
                for aggregate in ("vote", "mean"):
                    summary[f"{run.name}/{sub}"][aggregate].pop("folds", None)
    if args.out:
        emit(summary, args.out)


if __name__ == "__main__":
    main()
