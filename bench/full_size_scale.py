"""What a pixel-tile model does with images at another scale: each fold model of a `lymphoma cv` run on the data
set's 417x312 copies predicts the full-size originals (1388x1040 JPEG, ``fullres-jpeg/``) of its own test cases:
as `lymphoma predict` does by default (``predict.scale=match``: resized to the training scale, their aspect being
the copies'), as they are (``predict.scale=keep``) and with ``--force tiles.resize=0.3`` (the scale its warning
names), against its predictions of the same images' copies in the CV run. Every image is predicted by the fold that never saw its
patient, so the accuracies are honest, on the 30 images that exist at full size.

    .venv/bin/python bench/full_size_scale.py runs/<cv run> [--out bench/results/full-size-scale.json]
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path
from typing import Any

from common import emit
from jobs.cli import main as lymphoma
from jobs.config import default_data_root

WAYS = ("matched", "as_is", "resize_0.3")


def fold_images(fold: Path, full_of: dict[str, str]) -> list[dict[str, str]]:
    """The fold's predicted test images that exist at full size: path, full-size path, truth, CV prediction."""
    with (fold / "predict" / "summary.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["status"] == "ok"]
    return [{"path": r["path"], "full": full_of[Path(r["path"]).name], "truth": r["truth"], "copy": r["predicted"]}
            for r in rows if Path(r["path"]).name in full_of]


def predicted(out: Path) -> dict[str, str]:
    """Each predicted image's majority-vote class by its file's stem."""
    with (out / "summary.csv").open(newline="") as handle:
        return {Path(r["path"]).stem: r["predicted"] for r in csv.DictReader(handle)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    root = Path(default_data_root())
    with (root / "manifest.csv").open(newline="") as handle:
        full_of = {Path(r["lowres_path"]).name: str(root / r["fullres_jpeg_path"])
                   for r in csv.DictReader(handle) if r["fullres_jpeg_path"]}
    rows: list[dict[str, Any]] = []
    for fold in sorted((args.run / "repeat-0").glob("fold-*")):
        images = fold_images(fold, full_of)
        if not images:
            continue
        checkpoint = str(fold / "train" / "checkpoints" / "best.pt")
        ways = {"matched": [], "as_is": ["predict.scale=keep"], "resize_0.3": ["tiles.resize=0.3", "--force"]}
        for way, words in ways.items():
            out = args.run / "full-size" / fold.name / way
            lymphoma(["predict", "--checkpoint", checkpoint, "--out", str(out), "-q", *words, *[i["full"] for i in images]])
            classes = predicted(out)
            for image in images:
                image[way] = classes[Path(image["full"]).stem]
        rows += [{**image, "fold": fold.name, "path": Path(image["path"]).name,
                  "full": str(Path(image["full"]).relative_to(root))} for image in images]
    accuracy = {way: round(sum(r[way] == r["truth"] for r in rows) / len(rows), 3)
                for way in ("copy", *WAYS)}
    emit({"run": str(args.run), "images": len(rows), "slides": len({r["path"].rsplit("_", 1)[0] for r in rows}),
          "image_accuracy": accuracy,
          "agreement_with_copy": {way: round(sum(r[way] == r["copy"] for r in rows) / len(rows), 3)
                                  for way in WAYS},
          "predicted_classes": {way: {c: sum(r[way] == c for r in rows) for c in sorted({r["truth"] for r in rows})}
                                for way in ("copy", *WAYS)},
          "rows": rows}, args.out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
