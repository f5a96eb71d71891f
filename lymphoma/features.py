"""Tile embeddings per slide, in the layout CLAM and TRIDENT read: ``h5_files/<slide>.h5`` with ``features``
``[N, D]`` (float32) and ``coords`` ``[N, 2]`` (top-left x, y: level-0 pixels for whole slides), and the tile
size, resolution and encoder as attributes.

The encoder is a pretrained backbone from settings or any checkpoint of this project (the tile DenseNet too)
with its head removed. Tiles come from the same source as tiling and prediction (tissue, mpp, stain
normalisation, centre crop); each file is written under a temporary name and renamed when complete, so a
rerun redoes only slides without a complete file made by the same encoder and settings."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from lymphoma.backbones import Backbone, load_pretrained
from lymphoma.checkpoint import load_checkpoint
from lymphoma.engines import TileClassifier, exported_engine
from lymphoma.errors import InputError, one_line
from lymphoma.files import PinnedFile, file_stamp, write_text_atomic
from lymphoma.image_scale import training_scale
from lymphoma.model import Ensemble, build_model
from lymphoma.precision import runnable_precision
from lymphoma.prediction import Predictor, SlideInput, onnx_export, read_record, with_tiles
from lymphoma.regions import regions_stamp
from lymphoma.settings import EXPORTED_ENGINES, AugmentSettings, ModelSettings, StainSettings, TileSettings
from lymphoma.stain import StainNormalizer, fit_target
from lymphoma.tile_sources import TileSource

FEATURES_FORMAT = "lymphoma-features-1"
ENCODER_FILE = "encoder.json"  # a features folder's encoder, and the cases it has seen (for `lymphoma mil`)


def strip_head(model: torch.nn.Module) -> torch.nn.Module:
    """The network up to its pooled features: the classifier replaced by the identity (timm's ``reset_classifier``)."""
    if isinstance(model, Ensemble):
        raise InputError("an ensemble of fold models is not one encoder; give one fold's best.pt or last.pt")
    net = model.net if isinstance(model, Backbone) else model
    if hasattr(net, "reset_classifier"):  # timm
        net.reset_classifier(0)
    elif isinstance(getattr(net, "classifier", None), torch.nn.Linear):  # torchvision DenseNet, ours included
        net.classifier = torch.nn.Identity()
    else:
        raise InputError(f"{type(net).__name__}: cannot find its classifier to remove")
    return model


@dataclass(frozen=True)
class Engine:
    """What runs the encoder (predict.engine, predict.precision): torch (bf16 autocast on GPUs, and on CPUs with
    bf16), or its ONNX export run by onnxruntime or openvino, kept in ``export_dir`` for the next task."""

    name: str = "torch"
    precision: str = "fp32"
    export_dir: Optional[Path] = None


def _encoder(model: torch.nn.Module, tiles: TileSettings, augment: AugmentSettings, normalizer: Any,
             device: torch.device, batch_size: int, about: dict[str, Any],
             engine: Engine = Engine()) -> tuple[Predictor, dict[str, Any]]:
    """The encoder as a Predictor whose outputs are the embeddings. bf16 and an exported engine enter the
    fingerprint (torch fp32's stays what it was); the metadata's ``precision`` and ``engine`` are what runs."""
    model = strip_head(model).to(device, memory_format=torch.channels_last).eval()
    exported = engine.name in EXPORTED_ENGINES
    precision = engine.precision if exported else runnable_precision(engine.precision, device)
    about = {**about, "precision": "bf16"} if precision == "bf16" else about
    about = {**about, "engine": engine.name} if exported else about
    fingerprint = hashlib.sha1(json.dumps(about, sort_keys=True, default=str).encode()).hexdigest()
    predictor = Predictor(model, [], tiles, augment, device, batch_size, fingerprint, False, normalizer,
                          amp=device.type == "cuda", precision=precision)
    runs = "bf16" if precision == "bf16" or device.type == "cuda" else "fp32"
    if exported:
        onnx = onnx_export(TileClassifier(model.cpu(), augment, tiles.size), tiles.size,
                           engine.export_dir and engine.export_dir / f"encoder-{fingerprint[:16]}.onnx")
        predictor.exported = exported_engine(engine.name, onnx, torch.get_num_threads(), engine.precision)
        runs = getattr(predictor.exported, "precision", "fp32")
    return predictor, {**about, "precision": runs, "engine": engine.name, "fingerprint": fingerprint}


def encoder_from_checkpoint(path: Path, device: torch.device, batch_size: int = 128, engine: Engine = Engine(),
                            scale: str = "match", tiles: Optional[dict[str, Any]] = None,
                            pinned: Optional[PinnedFile] = None) -> tuple[Predictor, dict[str, Any]]:
    """A trained model of this project as an encoder: its tiling (with the user's ``tiles`` in place of its own,
    as prediction takes them), crop and stain normalisation; with ``scale`` ``match`` (predict.scale), plain images at
    another resolution resized to its training scale, as prediction does (each file's ``tiles`` attribute then
    holds the resize it was cut at); ``pinned``: the job's copy of ``path``, read in its place."""
    saved = load_checkpoint(pinned.copy if pinned is not None else path)
    if pinned is not None:
        pinned.check()
    state, matched = with_tiles(saved, tiles), training_scale(saved, scale, tiles)
    model = build_model(state["architecture"])
    model.load_state_dict(state["model"])
    size, mtime = pinned.stamp if pinned is not None else file_stamp(path) or (0, 0)
    about = {"encoder": str(Path(path).resolve()), "encoder_size": size, "encoder_mtime": mtime,
             "backbone": state["architecture"].get("backbone") or f"densenet:{state['architecture'].get('preset')}",
             "tiles": state["tiles"], "augment": state["augment"], "stain": state.get("stain")}
    if matched is not None:
        about["scale"] = [list(matched.size), matched.resize]
    encoder, meta = _encoder(model, TileSettings(**state["tiles"]), AugmentSettings(**state["augment"]),
                             StainNormalizer.from_state(state.get("stain")), device, batch_size, about, engine)
    encoder.scale = matched
    return encoder, meta


def encoder_from_settings(model_settings: ModelSettings, tiles: TileSettings, augment: AugmentSettings,
                          stain: StainSettings, device: torch.device, batch_size: int = 128,
                          engine: Engine = Engine(), pinned: Optional[PinnedFile] = None) -> tuple[Predictor, dict[str, Any]]:
    """A pretrained backbone as configured (``model.backbone``, ``model.weights``: read from ``pinned``, the job's
    copy of it, where given), with the run's tiling, crop and stain normalisation."""
    if model_settings.backbone is None:
        raise InputError("lymphoma features needs an encoder: --checkpoint of a trained model, or model.backbone "
                         "(with model.weights) for a pretrained one")
    torch.manual_seed(0)  # without weights, every task of the array builds the same random encoder
    model = build_model(model_settings.architecture(1))
    loaded = (load_pretrained(model, model_settings.weights, read_from=pinned.copy if pinned is not None else None)
              if model_settings.weights else None)
    if pinned is not None:
        pinned.check()
    target = fit_target(stain)
    about = {"encoder": loaded.path if loaded else "random initialisation", "encoder_sha256": loaded and loaded.sha256,
             "backbone": model_settings.backbone, "tiles": tiles.as_dict(), "augment": asdict(augment),
             "stain": target.as_dict() if target is not None else None, "model": asdict(model_settings)}
    return _encoder(model, tiles, augment, StainNormalizer(target) if target is not None else None, device,
                    batch_size, about, engine)


@dataclass
class FeatureWriter:
    """``h5_files/<key>.h5`` per slide (atomic), ``pt_files/<key>.pt`` (its features as one float32 tensor, which
    CLAM's MIL training loads) and ``records/<key>.json``; a slide is complete when its record and h5 file exist and
    were made with the same encoder and settings (``meta["fingerprint"]``); a missing .pt is made from the .h5."""

    out_dir: Path
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        for folder in ("h5_files", "pt_files", "records"):
            (self.out_dir / folder).mkdir(parents=True, exist_ok=True)

    def _record_path(self, slide: SlideInput) -> Path:
        return self.out_dir / "records" / f"{slide.key}.json"

    def complete(self, slide: SlideInput) -> Optional[dict[str, Any]]:
        record = read_record(self.out_dir / "records", slide)
        ok = (record is not None and record.get("status") == "ok"
              and record.get("fingerprint") == self.meta["fingerprint"] and Path(record["file"]).is_file()
              and record.get("regions", "") == regions_stamp(slide.regions))
        if not ok:
            return None
        if not (self.out_dir / "pt_files" / f"{slide.key}.pt").is_file():  # a folder of an earlier version
            try:
                self._write_pt(slide, read_features(record["file"])[0])
            except InputError:  # its .h5 damaged since: embedded again
                return None
        return {**record, "resumed": True}

    def _write_pt(self, slide: SlideInput, features: np.ndarray) -> None:
        path = self.out_dir / "pt_files" / f"{slide.key}.pt"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)), tmp)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)

    def finish(self, slide: SlideInput, source: TileSource, outputs: torch.Tensor) -> dict[str, Any]:
        import h5py

        path = self.out_dir / "h5_files" / f"{slide.key}.h5"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        features = outputs.numpy().astype(np.float32, copy=False)
        tiles = {**self.meta["tiles"], **({"resize": source.matched_resize} if source.matched_resize else {})}
        try:
            with h5py.File(tmp, "w") as h5:
                h5.create_dataset("features", data=features)
                coords = h5.create_dataset("coords", data=np.asarray(source.coords, dtype=np.int64).reshape(-1, 2))
                attrs = {"format": FEATURES_FORMAT, "slide": slide.key, "path": slide.path, "label": slide.label or "",
                         "case": slide.case or "", "feature_dim": int(features.shape[1]) if features.ndim == 2 else 0,
                         "backbone": str(self.meta["backbone"]), "encoder": str(self.meta["encoder"]),
                         "tile_size": int(self.meta["tiles"]["size"]), "stride": int(self.meta["tiles"]["stride"]),
                         "target_mpp": float(self.meta["tiles"].get("target_mpp") or 0.0),
                         "coords_convention": "top-left (x, y) in level-0 pixels of the slide"
                         if self.meta["tiles"].get("target_mpp") or self.meta["tiles"].get("target_power")
                         else "top-left (x, y) in the resized image", "fingerprint": self.meta["fingerprint"],
                         "precision": str(self.meta["precision"]), "engine": str(self.meta.get("engine", "torch")),
                         "tiles": json.dumps(tiles), "matched_resize": float(source.matched_resize or 0.0)}
                h5.attrs.update(attrs)
                coords.attrs.update({"patch_size": attrs["tile_size"], "patch_level": 0})
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        self._write_pt(slide, features)
        record = {"key": slide.key, "path": slide.path, "slide_file": source.file_stamp, "status": "ok",
                  "error": "", "label": slide.label, "case": slide.case, "n_tiles": int(len(features)),
                  "feature_dim": attrs["feature_dim"], "file": str(path), "fingerprint": self.meta["fingerprint"],
                  "regions": regions_stamp(slide.regions),
                  "image_size": [int(v) for v in source.shape],
                  **({"matched_resize": source.matched_resize} if source.matched_resize else {})}
        write_text_atomic(self._record_path(slide), json.dumps(record, indent=1) + "\n")
        return record

    def failed(self, slide: SlideInput, error: str, readable: bool = True) -> dict[str, Any]:
        record = {"key": slide.key, "path": slide.path, "slide_file": file_stamp(slide.path) if readable else None,
                  "status": "failed",
                  "error": error, "label": slide.label, "case": slide.case, "file": "",
                  "fingerprint": self.meta["fingerprint"]}
        write_text_atomic(self._record_path(slide), json.dumps(record, indent=1) + "\n")
        return record


def encoder_cases_seen(folder: Path) -> Optional[set[str]]:
    """The cases the encoder of a features folder learnt from or chose its epoch on (its ``ENCODER_FILE``); None
    where that is not known (a folder made before the file was written, or an older checkpoint)."""
    try:
        seen = json.loads((Path(folder) / ENCODER_FILE).read_text()).get("cases_seen")
    except (OSError, ValueError, AttributeError):
        return None
    return None if seen is None else {str(case) for case in seen}


def read_features(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``features``, ``coords`` and the attributes of one slide's file."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            return h5["features"][:], h5["coords"][:], dict(h5.attrs)
    except (OSError, KeyError) as err:
        raise InputError(f"{path}: not a feature file of `lymphoma features` ({one_line(err)}); extract it again") from None
