"""Prediction throughput on real images: end to end (read, tile, model, vote, write) against the bare
model on the same tiles already in memory, and against a tutorial-style loop, in one run, for each engine
and precision (torch fp32, torch bf16 autocast, ONNX Runtime fp32, torch.compile bf16, OpenVINO fp32 and bf16),
each engine built and warmed up (compiled) before it is timed; tile-class agreement with torch fp32;
peak memory. ``--stain reinhard`` predicts as a model trained with the default config does (every tile
Reinhard-normalised in the reader); the bare model then runs on tiles normalised beforehand. ``--scope image``:
each image normalised whole before it is cut (stain.scope=image) instead of each tile. ``--tasks 2``: the bare
model and end to end each timed as 2 processes of half the cores, as `lymphoma predict` runs on a CPU node (its
array tasks, cluster.parallelism at once, the cores shared among them), with the model's own CPU time a tile
both ways (the thread that runs the forward); one process of every core otherwise.
The tutorial-style loop reads images as this project does (``read_rgb``: Wuffs, the fastest decoder measured,
bench/bench_decode.py; the tutorial's cv2.imread took 6.9 ms a data-set image where libspng took 5.2 on an
earlier CPU): if anything, it flatters the tutorial.

    .venv/bin/python bench/bench_predict.py [--images 64] [--folder lowres|fullres-jpeg] [--stain none|reinhard]
        [--scope tile|image] [--engines torch:fp32,torch:bf16,onnxruntime:fp32,compile:bf16,openvino:fp32,
        openvino:bf16] [--tasks 1] [--rounds 1] [--out ...]

``--rounds N`` measures everything N times in turn (the tutorial's loop, then each engine, then again) and reports
each rate and ratio as its median over the rounds, every round's figures in ``rounds``: this machine's speed
swings by a third between minutes, more than the differences measured.

The model is the reduced DenseNet with its initial weights (speed does not depend on training).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import jobs  # isort: skip  (imports openvino before torch in every process where LYMPHOMA_OPENVINO_FIRST=1)
import numpy as np
import torch

from common import emit, timed, timed_in_tasks
from hpc.memory import keep_freed_memory
from hpc.task import thread_share
from jobs.config import default_data_root
from lymphoma.augment import eval_batch
from lymphoma.checkpoint import save_checkpoint
from lymphoma.images import read_rgb
from lymphoma.inputs import discover
from lymphoma.model import build_model
from lymphoma.prediction import Predictor, SlideInput, predict_slides
from lymphoma.settings import AugmentSettings, ModelSettings, TileSettings
from lymphoma.stain import StainSettings, fit_target
from lymphoma.tile_sources import open_normalized_tiles
from lymphoma.tiling import cut_tiles

CLASSES = ["CLL", "FL", "MCL"]


def make_checkpoint(path: Path, tiles: TileSettings, augment: AugmentSettings, stain: str = "none",
                    scope: str = "tile") -> None:
    torch.manual_seed(0)
    architecture = ModelSettings().architecture(len(CLASSES))
    model = build_model(architecture)
    target = fit_target(StainSettings(stain, scope=scope))
    save_checkpoint({"model": model.state_dict(), "architecture": architecture, "classes": CLASSES, "epoch": 0,
                     "tiles": asdict(tiles), "augment": asdict(augment),
                     "stain": target.as_dict() if target is not None else None}, path)


# predict.engine, predict.precision
ENGINES = (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("compile", "bf16"), ("openvino", "fp32"),
           ("openvino", "bf16"))


def end_to_end(predictor: Predictor, slides: list[SlideInput], out: Path) -> int:
    records = predict_slides(predictor, slides, out)
    return sum(r["n_tiles"] for r in records)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--folder", default="lowres", choices=("lowres", "fullres-jpeg"),
                        help="the data set's images: lowres (417x312 PNG, 15 tiles each) or fullres-jpeg (the 30 at "
                             "1388x1040, JPEG, 300 tiles each: per-image costs spread over 20x the tiles)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--stain", default="none", help="the checkpoint's stain.normalize (none, reinhard, ...)")
    parser.add_argument("--scope", default="tile", help="the checkpoint's stain.scope (tile, image)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the model's device; ONNX Runtime uses CUDA "
                                                         "when its GPU package is installed)")
    parser.add_argument("--engines", default=",".join(f"{e}:{p}" for e, p in ENGINES),
                        help="engine:precision pairs to measure, comma-separated")
    parser.add_argument("--tasks", type=int, default=1,
                        help="time each engine's bare model and end to end as this many processes at once, each on "
                             "its share of the slides and of the cores, as `lymphoma predict` runs its array tasks "
                             "(cluster.parallelism, default 2); the tutorial's loop stays one process")
    parser.add_argument("--rounds", type=int, default=1, help="measure everything this many times in turn; medians")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # checkpoint, slide list, out: one task
    return parser.parse_args()


def child_task(args: argparse.Namespace) -> None:
    """One prediction task in its own process; prints its peak memory."""
    slides = [SlideInput(**s) for s in json.loads(Path(args.child[1]).read_text())]
    end_to_end(Predictor.from_checkpoint(Path(args.child[0]), torch.device(args.device), args.batch), slides,
               Path(args.child[2]))
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(int(hwm.split()[1]) / 1024)  # this task's own peak (ru_maxrss would count the parent's pre-exec memory)


def tiles_in_memory(predictor: Predictor, slides: list[SlideInput], settings: TileSettings,
                    results: dict[str, object]) -> tuple[np.ndarray, np.ndarray]:
    """Every slide's tiles as read, and as the bare model is fed them (the reader's stain work done, timed)."""
    all_tiles = np.concatenate([cut_tiles(read_rgb(s.path), settings).pixels for s in slides])
    by_image = predictor.normalizer is not None and not predictor.normalizer.per_tile
    images = [read_rgb(s.path) for s in slides] if by_image else []
    start = time.perf_counter()
    normalized = (np.concatenate([cut_tiles(predictor.normalizer(i), settings).pixels for i in images])
                  if by_image else predictor.normalize_stain(all_tiles))
    results["stain_ms_per_tile"] = (time.perf_counter() - start) / len(all_tiles) * 1000
    results["tiles"] = len(all_tiles)
    return all_tiles, normalized


def tutorial_loop(model: torch.nn.Module, slides: list[SlideInput], settings: TileSettings,
                  device: torch.device) -> Callable[[], None]:
    """The tutorial's prediction: batch 10, autograd on, read and tile between model calls, nothing written."""
    def run() -> None:
        for slide in slides:
            tiles = cut_tiles(read_rgb(slide.path), settings).pixels
            outputs = []
            for start in range(0, len(tiles), 10):
                x = torch.from_numpy(tiles[start:start + 10].transpose(0, 3, 1, 2) / 255).float().to(device)
                outputs.append(model(x[:, :, 8:120, 8:120]).detach().cpu().numpy())
            np.concatenate(outputs).argmax(1)
    return run


def count_model_cpu(predictor: Predictor) -> dict[str, float]:
    """From now on, what the thread that runs ``predictor.logits`` spends inside its calls (the model's own work:
    with one torch thread a task, the forward runs on that thread) adds up in the returned dict: user and system
    CPU seconds and minor page faults (getrusage of the thread). Whether the model itself runs slower end to end
    than bare, beside the reader and writer threads, and why."""
    spent, logits = {"user": 0.0, "system": 0.0, "minor_faults": 0.0}, predictor.logits

    def usage() -> tuple[float, float, int]:
        use = resource.getrusage(resource.RUSAGE_THREAD)
        return use.ru_utime, use.ru_stime, use.ru_minflt

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        before = usage()
        try:
            return logits(*args, **kwargs)
        finally:
            for key, start, end in zip(spent, before, usage()):
                spent[key] += end - start
    predictor.logits = counted  # type: ignore[method-assign]
    return spent


def task_run(checkpoint: Path, slides: list[SlideInput], engine: str, precision: str, mode: str, out: Path,
             batch: int) -> Callable[[], None]:
    """One of ``--tasks`` processes, prepared: its engine built and warmed up; returns its timed part, its slides
    predicted end to end (``mode`` e2e) or its tiles, read and normalised beforehand, through the model (bare).
    The timed part leaves the model's own CPU use in ``out/model_cpu.json``."""
    predictor = Predictor.from_checkpoint(checkpoint, torch.device("cpu"), batch, engine=engine, precision=precision,
                                          export_dir=out / "engine")
    if mode == "e2e":
        end_to_end(predictor, slides[:2], out / "warm")

        def work() -> None:
            end_to_end(predictor, slides, out / "out")
    else:
        tiles = np.concatenate([pixels for s in slides  # as the reader gives them to the model
                                for pixels in open_normalized_tiles(s.path, predictor.tiles,
                                                                    predictor.normalizer).batches])

        def work() -> None:
            for start in range(0, len(tiles), batch):
                predictor.logits(tiles[start:start + batch], stain_normalized=True)
        work()
    spent = count_model_cpu(predictor)

    def run() -> None:
        spent.update(dict.fromkeys(spent, 0.0))
        work()
        out.mkdir(parents=True, exist_ok=True)
        (out / "model_cpu.json").write_text(json.dumps(spent))
    return run


def measure_engines(args: argparse.Namespace, checkpoint: Path, slides: list[SlideInput], all_tiles: np.ndarray,
                    normalized: np.ndarray, tutorial: Callable[[], None], reference: torch.Tensor,
                    results: dict[str, object], tag: str = "") -> None:
    """Tiles/s and CPU time of the tutorial's loop, then of each engine's bare model and end to end, with ratios;
    ``reference``: torch fp32's logits of the first 256 tiles, which each engine's tile classes are compared to;
    ``tag``: added to the output folders' names (each round predicts into its own: none resumes another's)."""
    device, n, work = torch.device(args.device), len(all_tiles), checkpoint.parent
    cpu: dict[str, float] = {}
    model_cpu: dict[str, dict[str, float]] = {}  # with --tasks: the model's own CPU use, bare and end to end
    timings = {}
    timings["tutorial_style"], cpu["tutorial_style"] = timed(tutorial)
    engines = []
    for engine, precision in (tuple(pair.split(":")) for pair in args.engines.split(",")):
        name = f"{engine}_{precision}"

        def bare() -> None:
            for start in range(0, n, args.batch):
                predictor.logits(normalized[start:start + args.batch], stain_normalized=True)

        try:  # built (a compiled model: compiled here), then warmed up once
            predictor = Predictor.from_checkpoint(checkpoint, device, args.batch, engine=engine, precision=precision,
                                                  export_dir=work / "engine")
            bare()
        except Exception as err:  # noqa: BLE001 - an engine this machine cannot run (no compiler, no provider)
            results[f"error_{name}"] = f"{type(err).__name__}: {err}"[:500]
            continue
        engines.append((engine, precision))
        if args.tasks > 1:  # the job's layout: its array tasks at once, the cores shared among them
            for mode, key in (("bare", f"bare_model_{name}"), ("e2e", f"end_to_end_{name}")):
                per_task = [(checkpoint, slides[i::args.tasks], engine, precision, mode, work / f"task-{key}-{i}{tag}",
                             args.batch) for i in range(args.tasks)]
                timings[key], cpu[key] = timed_in_tasks(task_run, per_task, thread_share(args.tasks))
                used = [json.loads((task[5] / "model_cpu.json").read_text()) for task in per_task]
                model_cpu[key] = {k: sum(u[k] for u in used) for k in used[0]}
        else:
            timings[f"bare_model_{name}"], cpu[f"bare_model_{name}"] = timed(bare)
            end_to_end(predictor, slides[:2], work / f"warm-{name}{tag}")  # and at a smaller last batch
            timings[f"end_to_end_{name}"], cpu[f"end_to_end_{name}"] = timed(
                lambda: end_to_end(predictor, slides, work / f"out-{name}{tag}"))
        same = predictor.logits(all_tiles[:256]).argmax(1) == reference.argmax(1)
        results[f"same_tile_class_as_torch_fp32_{name}"] = float(same.float().mean())
    for name, seconds in timings.items():
        results[f"{name}_tiles_per_s"] = n / seconds
        results[f"{name}_cpu_ms_per_tile"] = cpu[name] / n * 1000  # core-milliseconds: where the time goes
        if name in model_cpu:  # of which the model's own forward passes, user and system, and its page faults
            used = model_cpu[name]
            results[f"{name}_model_cpu_ms_per_tile"] = (used["user"] + used["system"]) / n * 1000
            results[f"{name}_model_system_cpu_ms_per_tile"] = used["system"] / n * 1000
            results[f"{name}_model_minor_faults_per_tile"] = used["minor_faults"] / n
    for engine, precision in engines:
        name = f"{engine}_{precision}"
        results[f"end_to_end_vs_tutorial_style_{name}"] = timings["tutorial_style"] / timings[f"end_to_end_{name}"]
        results[f"end_to_end_vs_bare_model_{name}"] = timings[f"bare_model_{name}"] / timings[f"end_to_end_{name}"]
        results[f"bare_model_vs_tutorial_style_{name}"] = timings["tutorial_style"] / timings[f"bare_model_{name}"]


def median_of_rounds(rounds: list[dict[str, object]]) -> dict[str, object]:
    """The first round's results with every rate, CPU time and ratio replaced by its median over the rounds, and
    each round's own figures under ``rounds``."""
    measured = [k for k, v in rounds[0].items() if isinstance(v, float) and ("_per_" in k or "_vs_" in k)]
    merged = {**rounds[0], **{k: float(np.median([r[k] for r in rounds])) for k in measured}}
    if len(rounds) > 1:
        merged["rounds"] = [{k: r[k] for k in measured if "_vs_" in k} for r in rounds]
    return merged


def check_task(args: argparse.Namespace, checkpoint: Path, slides: list[SlideInput], predictor: Predictor,
               normalized: np.ndarray, results: dict[str, object]) -> None:
    """A prediction task in its own process: its peak memory, and its outputs against the model applied directly."""
    work, device = checkpoint.parent, torch.device(args.device)
    listing = work / "slides.json"
    listing.write_text(json.dumps([asdict(s) for s in slides]))
    child = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--device", args.device,
                            "--child", str(checkpoint), str(listing), str(work / "child")],
                           check=True, capture_output=True, text=True)
    results["peak_memory_per_task_MiB"] = float(child.stdout.strip().splitlines()[-1])
    with torch.inference_mode():  # the same outputs both ways
        direct = predictor.model(eval_batch(normalized[:8], predictor.augment, device)).cpu()
    first = np.load(next((work / "child").glob(f"{slides[0].key}.npz")))["logits"][:8]
    # cuDNN convolutions use TF32 by default and pick kernels by batch size: agreement to 1e-2 there
    results["outputs_tolerance"] = tolerance = 1e-4 if device.type == "cpu" else 1e-2
    results["outputs_match"] = bool(np.allclose(first, direct.numpy()[: len(first)], atol=tolerance))


def main() -> None:
    args = parse_args()
    keep_freed_memory()  # as every job's task does (hpc.task.task_setup); HPC_KEEP_FREED_MEMORY=0: malloc as it is
    if args.tasks > 1 and args.device != "cpu":
        raise SystemExit("--tasks measures CPU nodes: use it with --device cpu")
    if args.child:
        child_task(args)
        return
    if "openvino" in args.engines:  # its task processes import it before torch, as `lymphoma predict`'s do
        jobs.openvino_first_in_tasks("openvino")
    records = discover(Path(default_data_root()) / args.folder, CLASSES).records
    records = records[:: max(1, len(records) // args.images)][: args.images]
    slides = [SlideInput(r.path, Path(r.path).stem, r.label, r.case) for r in records]
    tiles_settings = TileSettings(size=128, stride=64)
    results: dict[str, object] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "device": args.device,
                                  "torch_threads": torch.get_num_threads(), "images": len(slides), "folder": args.folder,
                                  "batch": args.batch,
                                  "stain": args.stain, "scope": args.scope, "tasks": args.tasks,
                                  "threads_per_task": thread_share(args.tasks)}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "model.pt"
        make_checkpoint(checkpoint, tiles_settings, AugmentSettings(), args.stain, args.scope)
        predictor = Predictor.from_checkpoint(checkpoint, torch.device(args.device), args.batch)
        all_tiles, normalized = tiles_in_memory(predictor, slides, tiles_settings, results)
        tutorial = tutorial_loop(predictor.model, slides, tiles_settings, torch.device(args.device))
        reference, rounds = predictor.logits(all_tiles[:256]), []
        for _ in range(args.rounds):
            rounds.append(dict(results))
            measure_engines(args, checkpoint, slides, all_tiles, normalized, tutorial, reference, rounds[-1],
                            f"-round{len(rounds)}")
        results = median_of_rounds(rounds)
        check_task(args, checkpoint, slides, predictor, normalized, results)
    emit(results, args.out)


if __name__ == "__main__":
    main()
