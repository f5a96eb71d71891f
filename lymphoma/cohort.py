"""The inputs of a prediction (files, wildcards, a TSV list) and the cohort report made from its records."""

from __future__ import annotations

import glob
import json
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lymphoma.errors import InputError
from lymphoma.files import write_csv_atomic, write_text_atomic
from lymphoma.images import is_image_file
from lymphoma.inputs import case_of
from lymphoma.metrics import accuracy, balanced_accuracy
from lymphoma.plots import save_confusion
from lymphoma.prediction import SlideInput


def expand_inputs(patterns: Sequence[str], list_file: Optional[Path], basepath: Optional[Path],
                  classes: Sequence[str], case_pattern: re.Pattern[str]) -> list[SlideInput]:
    """Slides from names and wildcards (``**`` recursive) and from a TSV whose columns are path[, label[, case]]
    (``#`` lines and blank lines skipped; relative paths under ``basepath``). Truth comes from the TSV's label
    column or, for files, from a parent folder named after a class."""
    rows: list[tuple[str, Optional[str], Optional[str]]] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if not glob.has_magic(pattern) or (Path(m).is_file() and is_image_file(Path(m)))]
        if not matches:
            raise InputError(f"{pattern!r} matches no image file; check the path and quote wildcards so the shell "
                             "leaves them to lymphoma (e.g. 'cohort/**/*.tif')")
        rows += [(m, None, None) for m in matches]
    if list_file is not None:
        rows += _read_tsv(list_file, basepath)
    if not rows:
        raise InputError("no slides to predict: give file names, wildcards or --list slides.tsv")
    slides, seen = [], {}
    for path, label, case in rows:
        p = Path(path)
        label = label or (p.parent.name if p.parent.name in classes else None)
        if label is not None and label not in classes:
            raise InputError(f"{path}: label {label!r} is not one of the model's classes {list(classes)}")
        key = p.stem
        if key in seen and seen[key] != str(p.resolve()):
            raise InputError(f"two inputs named {key}: {seen[key]} and {p}; outputs are named after the file, "
                             "rename one or predict them separately")
        if key in seen:
            continue
        seen[key] = str(p.resolve())
        slides.append(SlideInput(str(p.resolve()), key, label, case or case_of(p.stem, case_pattern) or p.stem))
    return slides


def _read_tsv(path: Path, basepath: Optional[Path]) -> list[tuple[str, Optional[str], Optional[str]]]:
    if not path.is_file():
        raise InputError(f"--list {path} not found")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) > 3 or not fields[0]:
            raise InputError(f"{path}, line {number}: expected tab-separated path[, label[, case]], got {line!r}")
        if number == 1 and fields[0].lower() in ("path", "file", "filename"):
            continue  # a header
        file = Path(fields[0]) if basepath is None or Path(fields[0]).is_absolute() else basepath / fields[0]
        rows.append((str(file), (fields[1] or None) if len(fields) > 1 else None,
                     (fields[2] or None) if len(fields) > 2 else None))
    return rows


def write_report(records: Sequence[dict[str, Any]], classes: Sequence[str], out_dir: Path,
                 aggregate: str = "vote") -> dict[str, Any]:
    """summary.csv (one row per slide), metrics.json and confusion PNGs at image and case level; an image's
    class is its tiles' majority ``vote`` or their ``mean`` probability's class."""
    rows = []
    for r in records:
        ok = r["status"] == "ok"
        rows.append([r["key"], r["path"], r["status"], image_class(r, aggregate) if ok else "",
                     r.get("mean_prob_class", ""),
                     f"{r['confidence']:.4f}" if ok else ""]
                    + [r["votes"][c] if ok else "" for c in classes]
                    + [r.get("n_tiles", ""), r.get("label") or "", r.get("case") or "", r.get("error", "")])
    write_csv_atomic(out_dir / "summary.csv", ["slide", "path", "status", "predicted", "mean_prob_class", "confidence"]
                     + [f"votes_{c}" for c in classes] + ["n_tiles", "truth", "case", "error"], rows)
    done = [r for r in records if r["status"] == "ok"]
    metrics: dict[str, Any] = {"slides": len(records), "predicted": len(done), "failed": len(records) - len(done),
                               "classes": list(classes), "aggregate": aggregate}
    known = [r for r in done if r.get("label")]
    if known:
        image, case = confusions(known, classes, aggregate)
        for level, confusion in (("image", image), ("case", case)):
            metrics[level] = {"n": int(confusion.sum()), "accuracy": accuracy(confusion),
                              "balanced_accuracy": balanced_accuracy(confusion), "confusion": confusion.tolist()}
            save_confusion(confusion, classes, out_dir / f"confusion_{level}.png",
                           f"{level} level: accuracy {metrics[level]['accuracy']:.3f} (n={confusion.sum()})")
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def image_class(record: dict[str, Any], aggregate: str) -> str:
    """An image's class from its record: the tiles' majority ``vote`` or their ``mean`` probability's class."""
    return record["majority_class"] if aggregate == "vote" else record["mean_prob_class"]


def case_class(records: Sequence[dict[str, Any]], classes: Sequence[str], aggregate: str = "vote") -> str:
    """A case's class. ``vote``: the majority of its images' voted classes, ties to the larger summed mean
    probability; ``mean``: the class of its images' averaged mean probabilities."""
    def summed(c: str) -> float:
        return sum(r["mean_probs"][c] for r in records)

    if aggregate == "mean":
        return max(classes, key=summed)
    counts = Counter(r["majority_class"] for r in records)
    best = max(counts.values())
    return max([c for c in classes if counts.get(c) == best], key=summed)


def confusions(records: Sequence[dict[str, Any]], classes: Sequence[str],
               aggregate: str = "vote") -> tuple[np.ndarray, np.ndarray]:
    """``[true, predicted]`` counts over images and over cases, for records that carry a label."""
    index = {c: i for i, c in enumerate(classes)}
    image = np.zeros((len(classes), len(classes)), dtype=int)
    by_case: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        image[index[r["label"]], index[image_class(r, aggregate)]] += 1
        by_case[r["case"]].append(r)
    case = np.zeros_like(image)
    for items in by_case.values():
        case[index[items[0]["label"]], index[case_class(items, classes, aggregate)]] += 1
    return image, case
