"""int8 prediction, measured before offering it: a trained checkpoint exported to ONNX, quantised statically by
ONNX Runtime (QDQ, per-channel int8 weights, uint8 activations, calibrated on 256 real tiles), against ONNX Runtime
fp32, torch fp32 and torch bf16 autocast on the same tiles: bare-model tiles/s (best of three passes over 1,024
tiles, batch 32) and the share of real tiles whose class equals fp32's (the speed issue asks for at least 0.99).

    .venv/bin/python bench/bench_int8.py CHECKPOINT [--out bench/results/int8.json]

Every image of the data set is normalised and cut as the checkpoint was trained; calibration tiles are drawn
at random and kept out of the agreement.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common import emit
from jobs.config import default_data_root
from lymphoma.checkpoint import load_checkpoint, load_model_weights
from lymphoma.engines import OnnxEngine, TileClassifier, onnx_bytes
from lymphoma.model import build_model
from lymphoma.settings import AugmentSettings, TileSettings
from lymphoma.stain import StainNormalizer
from lymphoma.tile_sources import open_normalized_tiles


def quantised(onnx_model: bytes, calibration: np.ndarray, folder: Path) -> bytes:
    """The model quantised to int8 (QDQ, per channel), its activation ranges from ``calibration`` tiles."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Tiles(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"tiles": calibration[i:i + 32]} for i in range(0, len(calibration), 32)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    (folder / "fp32.onnx").write_bytes(onnx_model)
    quant_pre_process(str(folder / "fp32.onnx"), str(folder / "pre.onnx"))
    quantize_static(str(folder / "pre.onnx"), str(folder / "int8.onnx"), Tiles(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return (folder / "int8.onnx").read_bytes()


def tiles_per_s(run: Callable[[np.ndarray], torch.Tensor], tiles: np.ndarray) -> float:
    run(tiles[:32])
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for i in range(0, 1024, 32):
            run(tiles[i:i + 32])
        best = max(best, 1024 / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    state = load_checkpoint(args.checkpoint)
    model = build_model(state["architecture"])
    load_model_weights(model, state, args.checkpoint)
    augment, tiling = AugmentSettings(**state["augment"]), TileSettings(**state["tiles"])
    normalizer = StainNormalizer.from_state(state.get("stain"))
    images = sorted(Path(default_data_root()).glob("lowres/*/*.png"))
    tiles = np.concatenate([batch for p in images for batch in open_normalized_tiles(str(p), tiling, normalizer).batches])
    order = np.random.default_rng(0).permutation(len(tiles))
    calibration, test = tiles[order[:256]], tiles[order[256:]]
    classifier = TileClassifier(model.eval(), augment, tiling.size).eval()
    with tempfile.TemporaryDirectory() as tmp:
        exported = onnx_bytes(classifier, tiling.size)
        engines: dict[str, Callable[[np.ndarray], torch.Tensor]] = {
            "onnxruntime fp32": OnnxEngine(exported, torch.get_num_threads()),
            "onnxruntime int8": OnnxEngine(quantised(exported, calibration, Path(tmp)), torch.get_num_threads())}

    @torch.inference_mode()
    def torch_run(x: np.ndarray, bf16: bool) -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return classifier(torch.from_numpy(x)).float()

    engines["torch fp32"] = lambda x: torch_run(x, False)
    engines["torch bf16"] = lambda x: torch_run(x, True)

    def classes(run: Callable[[np.ndarray], torch.Tensor]) -> np.ndarray:
        return np.concatenate([run(test[i:i + 256]).argmax(1).numpy() for i in range(0, len(test), 256)])

    reference = classes(engines["onnxruntime fp32"])
    results: dict[str, object] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                  "checkpoint": str(args.checkpoint), "agreement_tiles": len(test)}
    for name, run in engines.items():
        results[name] = {"tiles_per_s": tiles_per_s(run, test), "same_class_as_fp32": float(np.mean(classes(run) == reference))}
    emit(results, args.out)


if __name__ == "__main__":
    main()
