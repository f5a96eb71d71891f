"""Prediction end to end in 2 spawned processes at once (as `--tasks 2` and the job's array tasks run), with torch
imported while each process starts (as the benchmark's tasks and submitit's import the job's modules) or only
inside the task: tiles/s of both and their CPU time over the wall time of their cores. With OpenVINO the first idles about a
quarter of the time on this 2-core machine (README, the prediction engines row) unless openvino was imported before
torch: ``--openvino-first`` has every process do so (LYMPHOMA_OPENVINO_FIRST=1, as `lymphoma predict` and `features`
set for their tasks with predict.engine=openvino; ``jobs/__init__.py``).

    .venv/bin/python bench/bench_import_order.py [--engine openvino] [--precision bf16] [--images 60] [--rounds 2]
        [--openvino-first] [--out F]

The model is the reduced DenseNet with its initial weights and Reinhard by image, as in bench_predict.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jobs  # (imports openvino, before torch, where LYMPHOMA_OPENVINO_FIRST=1)
from common import emit, timed_in_tasks  # imports no torch

AT_START = "BENCH_IMPORT_TORCH_AT_START"
if os.environ.get(AT_START) == "1":  # runs again in every spawned process, before its task is unpickled
    import torch  # noqa: F401


def prepare(checkpoint: str, slides: list[Any], engine: str, precision: str, work: Path) -> Callable[[], None]:
    """One process's engine built and warmed up (``common.timed_in_tasks`` times what it returns: its slides
    predicted into ``work/out``)."""
    import torch
    from bench_predict import end_to_end

    from lymphoma.prediction import Predictor

    predictor = Predictor.from_checkpoint(Path(checkpoint), torch.device("cpu"), 32, engine=engine,
                                          precision=precision, export_dir=work / "engine")
    end_to_end(predictor, slides[:4], work / "warm")
    return lambda: end_to_end(predictor, slides, work / "out")


def run(checkpoint: Path, slides: list[Any], engine: str, precision: str, at_start: bool) -> dict[str, float]:
    """Both processes at once, torch imported at their start or not: tiles/s of both (the tiles their slide
    records count), CPU over their cores' wall time."""
    os.environ[AT_START] = "1" if at_start else "0"
    works = [Path(tempfile.mkdtemp()) for _ in range(2)]
    wall, cpu = timed_in_tasks(prepare, [(str(checkpoint), slides, engine, precision, w) for w in works], 1)
    tiles = sum(json.loads(p.read_text())["n_tiles"] for w in works for p in (w / "out").glob("*.json"))
    return {"tiles_per_s": tiles / wall, "cpu_over_wall": cpu / (2 * wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="openvino", help="predict.engine")
    parser.add_argument("--precision", default="bf16", help="predict.precision")
    parser.add_argument("--images", type=int, default=60, help="images each process predicts (the same ones)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both orders")
    parser.add_argument("--openvino-first", action="store_true", help="every process imports openvino before torch")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    if args.openvino_first:
        jobs.openvino_first_in_tasks(args.engine)
    from bench_predict import CLASSES, make_checkpoint

    from jobs.config import default_data_root
    from lymphoma.inputs import discover
    from lymphoma.prediction import SlideInput
    from lymphoma.settings import AugmentSettings, TileSettings

    records = discover(Path(default_data_root()) / "lowres", CLASSES).records[: args.images]
    slides = [SlideInput(r.path, Path(r.path).stem, r.label, r.case) for r in records]
    results: dict[str, Any] = {"engine": args.engine, "precision": args.precision, "images": len(slides),
                               "openvino_first": args.openvino_first}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "model.pt"
        make_checkpoint(checkpoint, TileSettings(size=128, stride=64), AugmentSettings(), "reinhard", "image")
        for round_ in range(args.rounds):
            for at_start in (True, False):
                key = f"round_{round_}_torch_imported_{'at_start' if at_start else 'in_task'}"
                results[key] = run(checkpoint, slides, args.engine, args.precision, at_start)
                print(key, results[key], flush=True)
    emit(results, args.out)


if __name__ == "__main__":
    main()
