"""Whole-image tile-vote inference: tile each slide with the checkpoint's settings, run the tiles through
the model in batches (reading and tiling the next slides in a background thread meanwhile), and write
per-slide outputs atomically."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch

from lymphoma.augment import eval_batch
from lymphoma.checkpoint import load_checkpoint, load_model_weights
from lymphoma.engines import (
    ExportedEngine,
    TileClassifier,
    check_engine,
    compiled_model,
    dihedral_tiles,
    exported_engine,
    onnx_bytes,
)
from lymphoma.errors import ImageError
from lymphoma.files import PinnedFile, file_stamp, write_text_atomic
from lymphoma.image_scale import TrainingScale, tiles_cut_with, training_scale
from lymphoma.model import build_model
from lymphoma.plots import save_heatmap, save_probability_maps
from lymphoma.precision import runnable_precision
from lymphoma.read_ahead import ReadStalled, read_ahead
from lymphoma.regions import regions_stamp
from lymphoma.settings import EXPORTED_ENGINES, AugmentSettings, PredictSettings, TileSettings
from lymphoma.slide_exports import level0_squares, write_coords_h5, write_geojson
from lymphoma.stain import StainNormalizer
from lymphoma.tile_sources import TileSource
from lymphoma.voting import vote


@dataclass(frozen=True)
class SlideInput:
    """One image to predict: its path, the key its outputs are named by, and truth if known."""

    path: str
    key: str
    label: Optional[str] = None
    case: Optional[str] = None
    regions: str = ""  # a GeoJSON region file (lymphoma.regions): only the tiles tiles.region_mode keeps


@dataclass
class Predictor:
    model: torch.nn.Module
    classes: list[str]
    tiles: TileSettings
    augment: AugmentSettings
    device: torch.device
    batch_size: int
    fingerprint: str
    tta: bool = False
    normalizer: Optional[StainNormalizer] = None
    amp: bool = False  # bf16 autocast on GPUs (feature extraction)
    precision: str = "fp32"  # what runs: fp32 | bf16 (autocast; on CPUs only with bf16 units: runnable_precision)
    exported: Optional[ExportedEngine] = None  # predict.engine onnxruntime or openvino: runs the model
    scale: Optional[TrainingScale] = None  # predict.scale=match: plain images at another scale matched to this one
    checkpoint: str = ""  # the file the model came from, named in each slide's record
    identity: dict[str, Any] = field(default_factory=dict)  # prediction_identity: in each slide's record

    @classmethod
    def from_checkpoint(cls, path: Path, device: torch.device, batch_size: int = 128,
                        tta: bool = False, tiles: Optional[dict[str, Any]] = None, engine: str = "torch",
                        precision: str = "fp32", export_dir: Optional[Path] = None, scale: str = "match",
                        pinned: Optional[PinnedFile] = None) -> "Predictor":
        """The checkpoint's model and settings; ``tiles``: tile settings used instead of the checkpoint's
        (``lymphoma predict --force``); ``engine``/``precision``: what runs the model; ``scale`` (predict.scale):
        ``match`` resizes plain images at another scale to the training images' (lymphoma.image_scale), ``keep``
        takes them as they are (all part of the fingerprint); ``export_dir``: where the ONNX export is kept for
        the next task (made once); ``pinned``: the job's copy of ``path``, read in its place."""
        check_engine(engine, precision)
        identity_precision = precision  # the request: bf16 resumes as bf16 wherever the slides ran
        if engine not in EXPORTED_ENGINES:  # onnxruntime runs fp32, openvino chooses for itself (OpenVinoEngine)
            precision = runnable_precision(precision, device)
        saved = load_checkpoint(pinned.copy if pinned is not None else path)
        if pinned is not None:
            pinned.check()
        state, matched = with_tiles(saved, tiles), training_scale(saved, scale, tiles)  # the scale it was trained at
        model = build_model(state["architecture"])
        load_model_weights(model, state, path)
        model.to(device, memory_format=torch.channels_last).eval()
        augment, tile_settings = AugmentSettings(**state["augment"]), TileSettings(**state["tiles"])
        if engine == "compile":  # compiled here for full batches; a last, smaller batch compiles once more
            blank = np.zeros((batch_size, tile_settings.size, tile_settings.size, 3), np.uint8)
            example = eval_batch(blank, augment, device).contiguous(memory_format=torch.channels_last)
            model = compiled_model(model, example, precision == "bf16")
        exported = None
        identity = prediction_identity(path, state, tta, engine, identity_precision, matched,
                                       pinned.stamp if pinned is not None else None)
        fingerprint = checkpoint_fingerprint(identity)
        if engine in EXPORTED_ENGINES:  # on the CPU (ONNX Runtime also on CUDA where its GPU package is installed)
            onnx = onnx_export(TileClassifier(model.cpu(), augment, tile_settings.size), tile_settings.size,
                               export_dir and export_dir / f"model-{fingerprint[:16]}.onnx")
            exported = exported_engine(engine, onnx, torch.get_num_threads(), precision)
        return cls(model, list(state["classes"]), tile_settings, augment, device, batch_size, fingerprint, tta,
                   StainNormalizer.from_state(state.get("stain")), precision=precision, exported=exported,
                   scale=matched, checkpoint=str(Path(path).resolve()), identity=identity)

    def normalize_stain(self, tiles: np.ndarray) -> np.ndarray:
        """Stain-normalise uint8 tiles ``[N, H, W, 3]`` when the model was trained on tiles normalised one by one
        (with stain.scope image, tiles are normalised by image where they are cut: read_ahead)."""
        return self.normalizer.batch(tiles) if self.normalizer is not None and self.normalizer.per_tile else tiles

    @torch.inference_mode()
    def logits(self, tiles: np.ndarray, stain_normalized: bool = False) -> torch.Tensor:
        """Raw outputs ``[N, nclass]`` for uint8 tiles ``[N, H, W, 3]`` (``stain_normalized``: already through
        ``normalize_stain``); with ``tta``, the log of the probabilities averaged over the 8 flips and right-angle
        rotations of each tile."""
        if not stain_normalized:
            tiles = self.normalize_stain(tiles)
        if self.exported is not None:
            if not self.tta:
                return self.exported(tiles)
            return (sum(self.exported(view).softmax(1) for view in dihedral_tiles(np.asarray(tiles))) / 8).log()
        x = eval_batch(tiles, self.augment, self.device).contiguous(memory_format=torch.channels_last)
        bf16 = self.precision == "bf16" or (self.amp and self.device.type == "cuda")
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            if not self.tta:
                return self.model(x).float().cpu()
            probs = torch.zeros(())
            for view in dihedral_views(x):
                probs = probs + self.model(view.contiguous(memory_format=torch.channels_last)).float().softmax(1)
            return (probs / 8).log().cpu()


def dihedral_views(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """The 8 symmetries of a square batch ``[B, C, H, W]``: 4 right-angle rotations, each also mirrored."""
    for k in range(4):
        rotated = torch.rot90(x, k, dims=(2, 3))
        yield rotated
        yield rotated.flip(3)


def onnx_export(classifier: TileClassifier, tile_size: int, path: Optional[Path]) -> bytes:
    """The classifier's ONNX export, read from ``path`` when an earlier task made it, else made (and kept there)."""
    if path is not None and path.is_file():
        return path.read_bytes()
    data = onnx_bytes(classifier, tile_size)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return data


def with_tiles(state: dict[str, Any], tiles: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The checkpoint's state with some tile settings replaced (none: unchanged)."""
    return {**state, "tiles": tiles_cut_with(state, tiles)} if tiles else state


def prediction_identity(path: Path, state: dict[str, Any], tta: bool = False, engine: str = "torch",
                        precision: str = "fp32", scale: Optional[TrainingScale] = None,
                        stamp: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """What a slide's outputs depend on, by name (every record keeps it, so that a refusal can say what differs): the
    checkpoint file (its size and time: ``stamp``, else the file's now), the tiling, crop and stain normalisation it
    was trained with (or tiles forced in their place), TTA, the engine and the precision asked for (bf16 that a CPU
    without bf16 units runs as fp32 included: the same request resumes wherever it runs), and the training scale
    images are matched to."""
    if stamp is None:
        stat = Path(path).stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
    return {"checkpoint": str(Path(path).resolve()), "checkpoint size": stamp[0],
            "checkpoint mtime_ns": stamp[1], "tiles": state["tiles"], "augment": state["augment"],
            "stain": state.get("stain"), "predict.tta": bool(tta), "predict.engine": engine,
            "predict.precision": precision, "training scale": None if scale is None else [list(scale.size), scale.resize]}


def checkpoint_fingerprint(identity: dict[str, Any]) -> str:
    """The digest of a ``prediction_identity``, in the form earlier versions wrote (their folders resume)."""
    payload = [identity["checkpoint"], identity["checkpoint size"], identity["checkpoint mtime_ns"], identity["tiles"],
               identity["augment"], identity["stain"]]
    if identity["predict.tta"]:
        payload.append("tta")
    if (identity["predict.engine"], identity["predict.precision"]) != ("torch", "fp32"):
        payload.append([identity["predict.engine"], identity["predict.precision"]])
    if identity["training scale"] is not None:
        payload.append(["scale", *identity["training scale"]])
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def identity_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two prediction identities, in words: ``tiles.target_mpp (None there, 1.6 now)``, the
    checkpoint (another file, or the same rewritten), or ``stain``."""
    if before.get("checkpoint") != now["checkpoint"]:
        words = [f"the checkpoint (there {before.get('checkpoint')}, now {now['checkpoint']})"]
    elif (before.get("checkpoint size"), before.get("checkpoint mtime_ns")) != (now["checkpoint size"],
                                                                                now["checkpoint mtime_ns"]):
        words = [f"the checkpoint {now['checkpoint']} (rewritten since)"]
    else:
        words = []
    for name in ("tiles", "augment"):
        old, new = before.get(name) or {}, now[name] or {}
        words += [f"{name}.{key} ({old.get(key)} there, {new.get(key)} now)" for key in sorted({*old, *new})
                  if old.get(key) != new.get(key)]
    words += [name if name == "stain" else f"{name} ({before.get(name)} there, {now[name]} now)"
              for name in ("stain", "predict.tta", "predict.engine", "predict.precision", "training scale")
              if before.get(name) != now[name]]
    return words


def _record_of_key(out_dir: Path, slide: SlideInput) -> Optional[dict[str, Any]]:
    """The record under the slide's name in ``out_dir``, whatever file it was made of; None where none is readable."""
    try:
        record = json.loads((out_dir / f"{slide.key}.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _record_of_path(out_dir: Path, slide: SlideInput) -> Optional[dict[str, Any]]:
    record = _record_of_key(out_dir, slide)
    return record if record is not None and record.get("path") == slide.path else None


def adopt_moved(out_dir: Path, slides: Sequence[SlideInput]) -> list[tuple[str, str]]:
    """Records in ``out_dir`` of slide files that moved (a cohort copied or mounted elsewhere): made of another path
    under this slide's name, of a file of this one's size and modification time (``mv``, ``rsync -a`` and ``cp -p``
    keep both; a file copied without them is predicted again). Each is rewritten with the slide's path, so the
    outputs are resumed as this slide's; the (earlier path, path now) of each."""
    moved = []
    for slide in slides:
        record = _record_of_key(out_dir, slide)
        if record is None or record.get("path") in (None, slide.path) or record.get("slide_file") is None \
                or _file_changed(record, slide):
            continue
        write_text_atomic(out_dir / f"{slide.key}.json", json.dumps({**record, "path": slide.path}, indent=1) + "\n")
        moved.append((str(record["path"]), slide.path))
    return moved


def moved_notes(moved: Sequence[tuple[str, str]], outputs: str) -> list[str]:
    """One note naming the slides whose earlier ``outputs`` were kept under their new path; nothing where none."""
    if not moved:
        return []
    pairs = ", ".join(f"{before} -> {now}" for before, now in moved[:3]) + (" ..." if len(moved) > 3 else "")
    return [f"{len(moved)} slide file(s) found at another path than this folder's {outputs} of them name, with the "
            f"same name, size and modification time: taken as moved, their {outputs} kept under the new path: {pairs}"]


def _file_changed(record: dict[str, Any], slide: SlideInput) -> bool:
    """Whether the slide's file is no longer the one its record was made of (records of earlier versions, which keep
    no size and time, are taken as made of it)."""
    return record.get("slide_file") not in (None, file_stamp(slide.path))


def read_record(out_dir: Path, slide: SlideInput) -> Optional[dict[str, Any]]:
    """The slide's record (succeeded or failed) written for this very file, if any: the same path and, where the
    record keeps them (earlier versions did not), the same size and modification time."""
    record = _record_of_path(out_dir, slide)
    return None if record is None or _file_changed(record, slide) else record


def changed_since(out_dir: Path, slides: Sequence[SlideInput]) -> list[SlideInput]:
    """The slides of ``out_dir`` that succeeded there but whose file has changed since (size or modification time)."""
    return [slide for slide in slides if (record := _record_of_path(out_dir, slide)) is not None
            and record.get("status") == "ok" and _file_changed(record, slide)]


def outputs_complete(out_dir: Path, slide: SlideInput, fingerprint: str) -> Optional[dict[str, Any]]:
    """The slide's record if its outputs exist, succeeded and were made by the same model and settings."""
    record = read_record(out_dir, slide)
    ok = (record is not None and record.get("status") == "ok" and record.get("fingerprint") == fingerprint
          and record.get("regions", "") == regions_stamp(slide.regions) and (out_dir / f"{slide.key}.npz").is_file())
    return record if ok else None


@dataclass
class _Progress:
    """A slide being predicted: logits so far, and its TileSource once all its tiles have arrived."""

    parts: list[torch.Tensor]
    done: int = 0
    source: Optional[TileSource] = None


class SlideWriter(Protocol):
    """What becomes of a slide's model outputs: the tile vote (``VoteWriter``) or its embeddings."""

    def complete(self, slide: SlideInput) -> Optional[dict[str, Any]]: ...

    def finish(self, slide: SlideInput, source: TileSource, outputs: torch.Tensor) -> dict[str, Any]: ...

    def failed(self, slide: SlideInput, error: str, readable: bool = True) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Pictures:
    """Which of a slide's optional outputs to write: the tile-class heatmap PNG, one probability map per class
    (``<key>-probabilities.png``), the tiles as QuPath detections and CLAM coords (``<key>.geojson``, ``.h5``)."""

    heatmap: bool = True
    probability_maps: bool = False
    geojson: bool = True

    @classmethod
    def of(cls, settings: PredictSettings) -> "Pictures":
        return cls(settings.heatmaps, settings.probability_maps, settings.geojson)


@dataclass
class VoteWriter:
    """Per slide: ``<key>.npz`` (coords, logits, probabilities, votes), ``<key>.json`` and a heatmap PNG."""

    predictor: Predictor
    out_dir: Path
    pictures: Pictures = Pictures()

    def complete(self, slide: SlideInput) -> Optional[dict[str, Any]]:
        return outputs_complete(self.out_dir, slide, self.predictor.fingerprint)

    def finish(self, slide: SlideInput, source: TileSource, outputs: torch.Tensor) -> dict[str, Any]:
        return _finish(self.predictor, slide, self.out_dir, source, outputs, self.pictures)

    def failed(self, slide: SlideInput, error: str, readable: bool = True) -> dict[str, Any]:
        return _failed(slide, self.out_dir, error, self.predictor.fingerprint, readable)


class _Batches:
    """Tiles of consecutive slides gathered into forward passes of ``predictor.batch_size``; each slide's outputs
    go to the writer, on a thread of their own (files and pictures off the model's path), once all its tiles
    have been through the model."""

    def __init__(self, predictor: Predictor, slides: Sequence[SlideInput], writer: SlideWriter) -> None:
        self.predictor, self.slides, self.writer = predictor, slides, writer
        self.progress: dict[int, _Progress] = {}
        self.batch: list[tuple[int, np.ndarray]] = []  # (slide, tiles) pieces of the next forward pass
        self.size = 0
        self.writing = ThreadPoolExecutor(1, thread_name_prefix="slide-writer")
        self.written: dict[int, Future[dict[str, Any]]] = {}

    def add(self, index: int, tiles: np.ndarray) -> None:
        """Slide ``index``'s next tiles, split across batches where they straddle one's end."""
        self.progress.setdefault(index, _Progress([]))
        batch_size, start = self.predictor.batch_size, 0
        while start < len(tiles):
            take = min(batch_size - self.size, len(tiles) - start)
            self.batch.append((index, tiles[start:start + take]))
            self.size, start = self.size + take, start + take
            if self.size == batch_size:
                self.flush()

    def source(self, index: int, source: TileSource) -> None:
        """Slide ``index``'s tiles have all been read: its outputs are written once they have all been through."""
        self.progress.setdefault(index, _Progress([])).source = source
        self._finish_ready()

    def drop(self, index: int) -> None:
        """A slide that failed half way: its tiles still in the batch are run but not kept."""
        self.progress.pop(index, None)

    def flush(self) -> None:
        if self.batch:
            logits = self.predictor.logits(np.concatenate([pixels for _, pixels in self.batch]), stain_normalized=True)
            offset = 0
            for i, pixels in self.batch:
                if i in self.progress:
                    self.progress[i].parts.append(logits[offset:offset + len(pixels)])
                    self.progress[i].done += len(pixels)
                offset += len(pixels)
            self.batch, self.size = [], 0
        self._finish_ready()

    def _finish_ready(self) -> None:
        for i, state in list(self.progress.items()):
            if state.source is not None and state.done == len(state.source.coords):
                self.written[i] = self.writing.submit(self.writer.finish, self.slides[i], state.source,
                                                      torch.cat(state.parts))
                del self.progress[i]

    def records(self) -> dict[int, dict[str, Any]]:
        """Every finished slide's record, after the last batch and the last write (a writer's error is raised here)."""
        self.flush()
        self.writing.shutdown(wait=True)
        return {i: future.result() for i, future in self.written.items()}


def predict_slides(predictor: Predictor, slides: Sequence[SlideInput], out_dir: Path, prefetch: int = 4,
                   pictures: Pictures = Pictures(), writer: Optional[SlideWriter] = None,
                   readers: int = 1, read_timeout_min: Optional[float] = None) -> list[dict[str, Any]]:
    """Run the model over every slide whose outputs are not complete yet and hand each slide's outputs to the
    writer (default: the tile vote); one record per slide, in input order. Tiles of consecutive slides share
    batches of ``predictor.batch_size``. A slide read for ``read_timeout_min`` without a tile fails (``read_ahead``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = writer or VoteWriter(predictor, out_dir, pictures)
    records: list[Optional[dict[str, Any]]] = [writer.complete(s) for s in slides]
    for record in records:
        if record is not None:
            record["resumed"] = True
    pending = [i for i, r in enumerate(records) if r is None]
    batches = _Batches(predictor, slides, writer)
    stain = predictor.normalizer.target.as_dict() if predictor.normalizer is not None else None
    for local, item in read_ahead([slides[i] for i in pending], predictor.tiles, prefetch, predictor.batch_size,
                                  stain, readers, predictor.scale,
                                  read_timeout_min * 60 if read_timeout_min is not None else None):
        index = pending[local]
        if isinstance(item, Exception):
            records[index] = writer.failed(slides[index], item.problem if isinstance(item, ImageError) else str(item),
                                           readable=not isinstance(item, ReadStalled))
            batches.drop(index)
        elif isinstance(item, TileSource):
            batches.source(index, item)
        else:
            batches.add(index, item)
    for i, record in batches.records().items():
        records[i] = record
    return [r for r in records if r is not None]


def _finish(predictor: Predictor, slide: SlideInput, out_dir: Path, source: TileSource, logits: torch.Tensor,
            pictures: Pictures = Pictures()) -> dict[str, Any]:
    """Every output of a slide, its ``<key>.json`` record last: a slide with a record has all of them."""
    probs = logits.softmax(1).numpy()
    result = vote(probs)
    classes = predictor.classes
    buffer = io.BytesIO()
    np.savez_compressed(buffer, coords=source.coords, logits=logits.numpy(), probs=probs,
                        tile_class=probs.argmax(1).astype(np.int16), votes=np.asarray(result.votes),
                        classes=np.asarray(classes))
    tmp = out_dir / f".{slide.key}.npz.tmp"
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(out_dir / f"{slide.key}.npz")
    if pictures.heatmap:
        save_heatmap(source.overview, source.coords, probs.argmax(1), classes, source.coord_scale, source.extent,
                     source.step, out_dir / f"{slide.key}.png")
    if pictures.probability_maps:
        save_probability_maps(source.overview, source.coords, probs, classes, source.coord_scale, source.extent,
                              source.step, out_dir / f"{slide.key}-probabilities.png")
    if pictures.geojson:
        squares = level0_squares(source.coords, source.extent, source.to_level0)
        write_geojson(out_dir / f"{slide.key}.geojson", squares, probs, classes)
        write_coords_h5(out_dir / f"{slide.key}.h5", squares, probs, classes)
    record = {"key": slide.key, "path": slide.path, "slide_file": source.file_stamp, "status": "ok",
              "error": "", "label": slide.label, "case": slide.case, "n_tiles": int(len(probs)),
              "n_background": int(source.n_background), "image_size": [int(v) for v in source.shape],
              **({"matched_resize": round(source.matched_resize, 6)} if source.matched_resize is not None else {}),
              **result.as_dict(classes), "fingerprint": predictor.fingerprint, "regions": regions_stamp(slide.regions),
              **({"checkpoint": predictor.checkpoint} if predictor.checkpoint else {}),
              **({"identity": predictor.identity, "precision": ran_precision(predictor)} if predictor.identity else {})}
    write_text_atomic(out_dir / f"{slide.key}.json", json.dumps(record, indent=1) + "\n")
    return record


def ran_precision(predictor: Predictor) -> str:
    """The precision that ran the model: predict.precision, or fp32 where the CPU has no bf16 units, or what an
    exported engine chose."""
    return getattr(predictor.exported, "precision", None) or predictor.precision


def _failed(slide: SlideInput, out_dir: Path, error: str, fingerprint: str, readable: bool = True) -> dict[str, Any]:
    """A failed slide's record; its file's size and time where it is ``readable`` (not a read that hangs)."""
    record = {"key": slide.key, "path": slide.path, "slide_file": file_stamp(slide.path) if readable else None,
              "status": "failed",
              "error": error, "label": slide.label, "case": slide.case, "fingerprint": fingerprint}
    write_text_atomic(out_dir / f"{slide.key}.json", json.dumps(record, indent=1) + "\n")
    return record
