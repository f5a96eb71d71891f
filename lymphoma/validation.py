"""The tutorial's "visualising results": per-tile outputs, confusion matrix, augmentation, kernels, activations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lymphoma.augment import build_augmenter
from lymphoma.case_bootstrap import bootstrap_intervals
from lymphoma.checkpoint import load_checkpoint, load_model_weights
from lymphoma.cohort_report import probability_record
from lymphoma.errors import InputError
from lymphoma.files import write_csv_atomic, write_text_atomic
from lymphoma.loaders import make_loader
from lymphoma.metrics import accuracy, balanced_accuracy, confusion_matrix
from lymphoma.model import build_model
from lymphoma.plots import save_activations, save_confusion, save_grid, save_kernels
from lymphoma.settings import AugmentSettings
from lymphoma.stain import StainNormalizer
from lymphoma.training import open_phase


def validate(checkpoint: Path, tiles_dir: Path, phase: str, out_dir: Path, layer: str = "features.denseblock1",
             batch_size: int = 128, workers: int = 0, n_examples: int = 8,
             intervals: tuple[int, float] = (2000, 0.95)) -> dict[str, Any]:
    """Run the checkpoint over a phase's tiles and write tiles.csv, confusion.{json,png}, augment.png,
    kernels.png and activations.png into ``out_dir``; the tile accuracies get intervals from ``intervals``
    (resamples, confidence) draws of the phase's cases."""
    state, model, tiles = _open_validation(checkpoint, tiles_dir, phase, layer)
    augment = AugmentSettings(**state["augment"])
    classes = list(state["classes"])
    modules = dict(model.named_modules())
    out_dir.mkdir(parents=True, exist_ok=True)
    normalizer = StainNormalizer.from_state(state.get("stain"))
    if normalizer is not None and not normalizer.per_tile:  # stain.scope image: the stored tiles are normalised
        normalizer = None                                      # already, where their images were cut (as training)
    eval_aug = build_augmenter(augment, False, torch.device("cpu"), normalizer=normalizer)
    loader = make_loader(tiles, eval_aug.sample, batch_size, 0, 1, False, 0, workers)
    with torch.inference_mode():
        outputs = torch.cat([model(eval_aug.batch(batch)).float() for batch, _ in loader])
    summary = _write_tile_outputs(tiles, outputs, classes, out_dir, {"checkpoint": str(checkpoint),
                                                                      "epoch": int(state["epoch"]), "phase": phase},
                                  intervals)
    rng = np.random.default_rng(0)
    raw, _ = tiles.read_batch(sorted(rng.choice(len(tiles), size=min(n_examples, len(tiles)), replace=False).tolist()))
    tiles.close()
    _save_augmentation(raw, augment, normalizer, out_dir / "augment.png")
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    save_kernels(first_conv.weight.detach().numpy(), out_dir / "kernels.png")
    _save_layer_activations(model, modules[layer], layer, raw[0], eval_aug, augment.crop, out_dir / "activations.png")
    return summary


def _open_validation(checkpoint: Path, tiles_dir: Path, phase: str, layer: str) -> tuple[dict[str, Any], Any, Any]:
    """The checkpoint's state, its model (in eval mode) and the phase's tiles; an InputError for a layer the model
    lacks, a phase the run lacks, tiles of another size or other classes."""
    state = load_checkpoint(checkpoint)
    model = build_model(state["architecture"])
    load_model_weights(model, state, checkpoint)
    model.eval()
    modules = dict(model.named_modules())
    if layer not in modules:
        options = ", ".join(name for name in modules if name.count(".") <= 1 and name)
        raise InputError(f"--layer {layer!r} is not a layer of this model; choose one of: {options}")
    size = int(state["tiles"]["size"])
    tiles = open_phase(tiles_dir, phase, size, int(state["augment"]["crop"]), f"checkpoint {checkpoint} was trained on "
                       f"{size}-px tiles; validate it in the run it was trained in (its -c config or run.name)")
    if tiles.classes != list(state["classes"]):
        tiles.close()
        raise InputError(f"{tiles_dir}: classes {tiles.classes} differ from the checkpoint's {list(state['classes'])}")
    return state, model, tiles


def check_validation(checkpoint: Path, tiles_dir: Path, phase: str, layer: str) -> None:
    """What ``validate`` would refuse (an InputError), found before a job is submitted for it."""
    _open_validation(checkpoint, tiles_dir, phase, layer)[2].close()


def _write_tile_outputs(tiles: Any, outputs: torch.Tensor, classes: list[str], out_dir: Path,
                        about: dict[str, Any], intervals: tuple[int, float]) -> dict[str, Any]:
    """tiles.csv (every tile's truth, prediction, logits and probabilities) and confusion.{json,png}; the
    accuracies' intervals resample the cases, since the tiles of one patient are not independent."""
    probs, predicted = outputs.softmax(1).numpy(), outputs.argmax(1)
    confusion = confusion_matrix(torch.from_numpy(tiles.labels), predicted, len(classes)).numpy()
    write_csv_atomic(out_dir / "tiles.csv", ["index", "filename", "case", "truth", "predicted"]
                     + [f"logit_{c}" for c in classes] + [f"prob_{c}" for c in classes],
                     ([i, tiles.filenames[i], tiles.cases[i], classes[tiles.labels[i]], classes[predicted[i]]]
                      + [f"{v:.5f}" for v in outputs[i].tolist()] + [f"{v:.5f}" for v in probs[i]]
                      for i in range(len(tiles))))
    records = [probability_record(probs[i], classes, label=classes[tiles.labels[i]], case=tiles.cases[i])
               for i in range(len(tiles))]  # one tile a record: its class its top probability's, as argmax
    drawn = bootstrap_intervals(records, classes, "vote", *intervals)
    summary = {**about, "classes": classes, "tiles": len(tiles), "cases": len(set(tiles.cases)),
               "confusion": confusion.tolist(), "accuracy": accuracy(confusion),
               "balanced_accuracy": balanced_accuracy(confusion), "bootstrap": intervals[0],
               "confidence": intervals[1], "interval": {name: drawn[f"image_{name}"]
                                                        for name in ("accuracy", "balanced_accuracy")}}
    write_text_atomic(out_dir / "confusion.json", json.dumps(summary, indent=2) + "\n")
    save_confusion(confusion, classes, out_dir / "confusion.png",
                   f"{about['phase']} tiles, epoch {about['epoch'] + 1}: accuracy {summary['accuracy']:.3f}")
    return summary


def _save_augmentation(raw: np.ndarray, augment: AugmentSettings, normalizer: Any, path: Path) -> None:
    """Example tiles before and after the training augmentation."""
    train_aug = build_augmenter(augment, True, torch.device("cpu"), seed=1, normalizer=normalizer)
    batch = torch.stack([train_aug.sample(t) for t in raw]) if train_aug.sample else torch.from_numpy(raw)
    std, mean = torch.tensor(augment.std).view(1, 3, 1, 1), torch.tensor(augment.mean).view(1, 3, 1, 1)
    after = (train_aug.batch(batch) * std + mean).permute(0, 2, 3, 1).numpy()
    save_grid([("before augmentation", raw / 255.0), ("after augmentation (train mode)", after)], path)


def _save_layer_activations(model: torch.nn.Module, module: torch.nn.Module, layer: str, tile: np.ndarray,
                            eval_aug: Any, crop: int, path: Path) -> None:
    """The feature maps of ``layer`` for one tile (its centre crop, as evaluation sees it)."""
    captured: dict[str, torch.Tensor] = {}
    hook = module.register_forward_hook(lambda _m, _i, output: captured.__setitem__("maps", output.detach()))
    try:
        with torch.inference_mode():
            model(eval_aug.batch(torch.stack([eval_aug.sample(tile)]) if eval_aug.sample
                                 else torch.from_numpy(tile[None])))
    finally:
        hook.remove()
    centre = (tile.shape[0] - crop) // 2
    save_activations(tile[centre:centre + crop, centre:centre + crop] / 255.0, captured["maps"][0].numpy(), layer, path)
