"""Prediction engines: the model as served, uint8 tiles in and logits out, run by PyTorch (fp32 or bf16
autocast), or from an ONNX export by ONNX Runtime or OpenVINO; and the export itself (ONNX, TorchScript) with
its preprocessing recorded, so that a site can serve a checkpoint without this project."""

from __future__ import annotations

import functools
import io
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lymphoma.errors import InputError
from lymphoma.image_scale import ASPECT_TOLERANCE, TOLERANCE
from lymphoma.settings import AugmentSettings, PredictSettings

log = logging.getLogger(__name__)


class TileClassifier(torch.nn.Module):
    """The model with its input handling inside: uint8 tiles ``[N, H, W, 3]`` (stain-normalised where the
    model was trained so) in, logits ``[N, classes]`` out; centre crop, scaling and normalisation exactly
    as ``augment.eval_batch`` does them."""

    def __init__(self, model: torch.nn.Module, augment: AugmentSettings, tile_size: int) -> None:
        super().__init__()
        self.model, self.crop = model, augment.crop
        self.offset = int(round((tile_size - augment.crop) / 2.0))  # fixed: exports see one tile size
        self.register_buffer("mean", torch.tensor(augment.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(augment.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        start, end = self.offset, self.offset + self.crop
        x = tiles[:, start:end, start:end].permute(0, 3, 1, 2).float() / 255
        return self.model((x - self.mean) / self.std)


def onnx_bytes(classifier: TileClassifier, tile_size: int) -> bytes:
    """The classifier as an ONNX model (opset of torch's exporter), the batch dimension left free."""
    example = torch.zeros(2, tile_size, tile_size, 3, dtype=torch.uint8)
    with torch.no_grad():
        program = torch.onnx.export(classifier.eval(), (example,), dynamo=True, input_names=["tiles"],
                                    output_names=["logits"], verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    buffer = io.BytesIO()
    program.save(buffer)
    return buffer.getvalue()


def torchscript_bytes(classifier: TileClassifier, tile_size: int) -> bytes:
    """The classifier as TorchScript (traced), loadable with ``torch.jit.load`` alone."""
    example = torch.zeros(2, tile_size, tile_size, 3, dtype=torch.uint8)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.9+ deprecates TorchScript; sites still serve it
        torch.jit.save(torch.jit.trace(classifier.eval(), example, check_trace=False), buffer)
    return buffer.getvalue()


class OnnxEngine:
    """An ONNX Runtime session on the CPU (or CUDA when its provider is there) over an exported classifier."""

    def __init__(self, model: bytes | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise InputError("predict.engine=onnxruntime needs the onnxruntime package: pip install onnxruntime") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=providers)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, tiles: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: np.ascontiguousarray(tiles, dtype=np.uint8)})[0])


def imported_after_torch() -> bool:
    """Whether this process imported torch before openvino (modules enter ``sys.modules`` as their import starts)."""
    names = list(sys.modules)
    return "torch" in sys.modules and "openvino" in sys.modules and names.index("torch") < names.index("openvino")


@functools.cache
def openvino_core() -> object:
    """The process's one OpenVINO Core, never released. Each Core's CPU plugin points the thread that creates it at
    a signal stack of its own and, when released, points it back at the stack it found: two Cores released in
    another order than made (a fp32 engine replaced by a bf16 one) leave the thread on freed memory, and the
    next signal handled there (SIGTERM, SIGINT, faulthandler's SIGSEGV) kills the process with a segmentation
    fault instead (tests/test_predict.py reproduces it in a child process)."""
    import openvino

    return openvino.Core()


class OpenVinoEngine:
    """An OpenVINO model compiled for the CPU over an exported classifier, one inference at a time (latency hint,
    one stream) on ``threads`` threads; ``precision`` bf16 asks for bfloat16 inference, which OpenVINO gives on
    CPUs with bf16 instructions (avx512_bf16, AMX) and replaces by fp32 elsewhere (``precision`` afterwards: what
    runs)."""

    def __init__(self, model: bytes | Path, threads: int | None = None, precision: str = "fp32") -> None:
        try:
            import openvino
        except ImportError:
            raise InputError("predict.engine=openvino needs the openvino package: pip install openvino") from None
        if imported_after_torch():
            log.warning("openvino was imported after torch in this process: its CPU inference may leave the core idle "
                        "about a quarter of the time (jobs/__init__.py); import openvino first where you can")
        core = openvino_core()
        config: dict[str, object] = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                                     "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = core.compile_model(core.read_model(model if isinstance(model, bytes) else str(model)), "CPU", config)
        self.precision = "bf16" if compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.bf16 else "fp32"
        self.request = compiled.create_infer_request()

    def __call__(self, tiles: np.ndarray) -> torch.Tensor:
        outputs = self.request.infer({0: np.ascontiguousarray(tiles, dtype=np.uint8)}, share_inputs=True)
        return torch.from_numpy(outputs[0])  # a copy of the request's output (share_outputs is off)


ExportedEngine = OnnxEngine | OpenVinoEngine  # what runs the ONNX export: predict.engine onnxruntime or openvino


def exported_engine(engine: str, model: bytes, threads: int | None, precision: str) -> ExportedEngine:
    """The engine named by predict.engine over an ONNX export: onnxruntime or openvino."""
    if engine == "openvino":
        return OpenVinoEngine(model, threads, precision)
    return OnnxEngine(model, threads)


def compiled_model(model: torch.nn.Module, example: torch.Tensor, bf16: bool) -> torch.nn.Module:
    """``torch.compile(model)``, compiled now on ``example`` (a batch as prediction feeds it, under the same
    autocast), so that a machine that cannot compile says so before any slide is read."""
    compiled = torch.compile(model)
    try:
        with torch.inference_mode(), torch.autocast(example.device.type, dtype=torch.bfloat16, enabled=bf16):
            compiled(example)
    except Exception as err:  # noqa: BLE001 - inductor raises many types; each becomes the same named error
        first = (str(err).strip().splitlines() or [""])[0]
        raise InputError(f"predict.engine=compile cannot compile the model on this machine ({type(err).__name__}: "
                         f"{first}); install what it names (inductor needs a C++ compiler on CPUs, Triton on "
                         "GPUs) or set predict.engine=torch") from None
    return compiled


def check_engine(engine: str, precision: str) -> None:
    """Named errors for engine and precision values (PredictSettings' own checks)."""
    PredictSettings(engine=engine, precision=precision)


def dihedral_tiles(tiles: np.ndarray) -> Sequence[np.ndarray]:
    """The 8 symmetries of square uint8 tiles ``[N, H, W, 3]`` (the order of ``prediction.dihedral_views``)."""
    views = []
    for k in range(4):
        rotated = np.rot90(tiles, k, axes=(1, 2))
        views += [np.ascontiguousarray(rotated), np.ascontiguousarray(rotated[:, :, ::-1])]
    return views


EXPORT_FORMATS = ("onnx", "torchscript")
EXPORT_FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}  # what each format writes


def write_export(checkpoint: Path, out_dir: Path, formats: Sequence[str] = EXPORT_FORMATS,
                 check_tiles: np.ndarray | None = None, state: dict[str, Any] | None = None) -> dict[str, object]:
    """Export a checkpoint's model into ``out_dir`` (``model.onnx``, ``model.torchscript.pt``) with
    ``preprocessing.json`` (what a server must do before and after); each export is run on ``check_tiles``
    (uint8 ``[N, H, W, 3]``, default: a fixed random batch) beside PyTorch, and the largest logit
    difference and the share of equal tile classes are recorded in ``export.json``, which is returned.
    ``state``: the checkpoint as already loaded (a foundation model's is read once, not twice)."""
    import hashlib
    import json

    from lymphoma.backbones import file_digest
    from lymphoma.checkpoint import load_checkpoint, load_model_weights
    from lymphoma.files import write_all_or_none
    from lymphoma.model import build_model
    from lymphoma.settings import TileSettings

    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise InputError(f"export formats {list(formats)}: allowed: {', '.join(EXPORT_FORMATS)}")
    state = state if state is not None else load_checkpoint(checkpoint)
    model = build_model(state["architecture"])
    load_model_weights(model, state, checkpoint)
    augment, tiles = AugmentSettings(**state["augment"]), TileSettings(**state["tiles"])
    classifier = TileClassifier(model.eval(), augment, tiles.size).eval()
    if check_tiles is None:
        check_tiles = np.random.default_rng(0).integers(0, 256, (16, tiles.size, tiles.size, 3), dtype=np.uint8)
    with torch.inference_mode():
        reference = classifier(torch.from_numpy(check_tiles)).float()
    report: dict[str, object] = {"checkpoint": str(checkpoint),
                                 "sha256": file_digest(checkpoint),  # read in chunks: never the whole file at once
                                 "check_tiles": len(check_tiles), "files": {}}
    written: dict[Path, bytes] = {}
    for name in formats:
        data = onnx_bytes(classifier, tiles.size) if name == "onnx" else torchscript_bytes(classifier, tiles.size)
        path = out_dir / EXPORT_FILES[name]
        written[path] = data
        if name == "onnx":
            logits = OnnxEngine(data)(check_tiles)
        else:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                logits = torch.jit.load(io.BytesIO(data))(torch.from_numpy(check_tiles)).float()
        report["files"][name] = {  # type: ignore[index]
            "path": path.name, "sha256": hashlib.sha256(data).hexdigest(),  # a server can check the pair is whole
            "max_abs_logit_difference": float((logits - reference).abs().max()),
            "same_class": float((logits.argmax(1) == reference.argmax(1)).float().mean())}
    written[out_dir / "preprocessing.json"] = (json.dumps(_preprocessing(state, augment, tiles), indent=2) + "\n").encode()
    report["preprocessing_sha256"] = hashlib.sha256(written[out_dir / "preprocessing.json"]).hexdigest()
    written[out_dir / "export.json"] = (json.dumps(report, indent=2) + "\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = _exported_models(out_dir)
    write_all_or_none(written)  # an earlier export there stays whole, its record with it, unless all of this fits
    for stale in earlier - set(written):  # an earlier export's model in a format not exported now: never served
        stale.unlink(missing_ok=True)
    return report


def _exported_models(out_dir: Path) -> set[Path]:
    """The model files that the export recorded in ``out_dir/export.json`` wrote (none if it holds no record)."""
    import json

    try:
        files = json.loads((out_dir / "export.json").read_text())["files"]
        return {out_dir / entry["path"] for entry in files.values() if entry["path"] in EXPORT_FILES.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def _preprocessing(state: dict[str, object], augment: AugmentSettings, tiles: object) -> dict[str, object]:
    """What a server does around the exported model: how tiles are cut, what happens to them before, inside and
    after the model."""
    from dataclasses import asdict

    return {
        "classes": list(state["classes"]),  # type: ignore[arg-type]
        "input": {"name": "tiles", "dtype": "uint8", "layout": "NHWC", "channels": "RGB",
                  "shape": ["batch", tiles.size, tiles.size, 3]},  # type: ignore[attr-defined]
        "output": {"name": "logits", "shape": ["batch", len(state["classes"])],  # type: ignore[arg-type]
                   "probabilities": "softmax over the last axis",
                   "slide": "majority vote of the tile classes (lymphoma predict.aggregate=vote), or the class of "
                            "the mean tile probability (mean)"},
        "tiling": {**asdict(tiles),  # type: ignore[call-overload]
                   "how": "tiles of size x size pixels every stride pixels after resizing the image by resize "
                          "(or, with target_mpp, read from whole slides at that resolution over tissue)",
                   "training_image_size": state.get("image_size"),
                   "scale": "without target_mpp the model knows its images' scale only by their size: the median "
                            "[height, width] of its training images; images of the same field of view at another "
                            "size need resize scaled by the ratio of the sizes (lymphoma predict, predict.scale=match: "
                            f"an image more than {TOLERANCE:g}x off along a side, with the training images' "
                            f"width:height within {ASPECT_TOLERANCE:.0%}, is resized so)"},
        "before_the_model": {"stain_normalization": state.get("stain"),
                             "how": "none when null; else the tile is normalised to this target (method 'reinhard': "
                                    "LAB mean/std matched to the target's, those of each tile with scope 'tile', "
                                    "those of its whole image once resized (before it is cut), or of a slide's "
                                    "tissue in its thumbnail, with scope 'image'; 'macenko': stain vectors)"},
        "inside_the_model": {"centre_crop": augment.crop, "scale": "1/255", "mean": list(augment.mean),
                             "std": list(augment.std)},
    }
