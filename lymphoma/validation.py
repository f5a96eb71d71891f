"""The tutorial's "visualising results": per-tile outputs, confusion matrix, augmentation, kernels, activations."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lymphoma.augment import build_augmenter
from lymphoma.checkpoint import load_checkpoint, load_model_weights
from lymphoma.data import make_loader
from lymphoma.errors import InputError
from lymphoma.metrics import accuracy, balanced_accuracy, confusion_matrix
from lymphoma.model import build_model
from lymphoma.plots import save_activations, save_confusion, save_grid, save_kernels
from lymphoma.settings import AugmentSettings
from lymphoma.stain import StainNormalizer
from lymphoma.training import open_phase


def validate(checkpoint: Path, tiles_dir: Path, phase: str, out_dir: Path, layer: str = "features.denseblock1",
             batch_size: int = 128, workers: int = 0, n_examples: int = 8) -> dict[str, Any]:
    """Run the checkpoint over a phase's tiles and write tiles.csv, confusion.{json,png}, augment.png,
    kernels.png and activations.png into ``out_dir``."""
    state = load_checkpoint(checkpoint)
    model = build_model(state["architecture"])
    load_model_weights(model, state, checkpoint)
    model.eval()
    augment = AugmentSettings(**state["augment"])
    classes = list(state["classes"])
    tiles = open_phase(tiles_dir, phase, int(state["tiles"]["size"]), augment.crop)
    if tiles.classes != classes:
        raise InputError(f"{tiles_dir}: classes {tiles.classes} differ from the checkpoint's {classes}")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    normalizer = StainNormalizer.from_state(state.get("stain"))
    eval_aug = build_augmenter(augment, False, device, normalizer=normalizer)
    loader = make_loader(tiles, eval_aug.sample, batch_size, 0, 1, False, 0, workers)
    logits = []
    with torch.inference_mode():
        for batch, _ in loader:
            logits.append(model(eval_aug.batch(batch)).float())
    outputs = torch.cat(logits)
    probs = outputs.softmax(1).numpy()
    predicted = outputs.argmax(1)
    truth = torch.from_numpy(tiles.labels)
    confusion = confusion_matrix(truth, predicted, len(classes)).numpy()

    with (out_dir / "tiles.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "filename", "case", "truth", "predicted"] + [f"logit_{c}" for c in classes]
                        + [f"prob_{c}" for c in classes])
        for i in range(len(tiles)):
            writer.writerow([i, tiles.filenames[i], tiles.cases[i], classes[tiles.labels[i]], classes[predicted[i]]]
                            + [f"{v:.5f}" for v in outputs[i].tolist()] + [f"{v:.5f}" for v in probs[i]])
    summary = {"checkpoint": str(checkpoint), "epoch": int(state["epoch"]), "phase": phase, "classes": classes,
               "tiles": len(tiles), "confusion": confusion.tolist(), "accuracy": accuracy(confusion),
               "balanced_accuracy": balanced_accuracy(confusion)}
    (out_dir / "confusion.json").write_text(json.dumps(summary, indent=2) + "\n")
    save_confusion(confusion, classes, out_dir / "confusion.png",
                   f"{phase} tiles, epoch {summary['epoch'] + 1}: accuracy {summary['accuracy']:.3f}")

    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(tiles), size=min(n_examples, len(tiles)), replace=False).tolist())
    raw, _ = tiles.read_batch(pick)
    train_aug = build_augmenter(augment, True, device, seed=1, normalizer=normalizer)
    batch = torch.stack([train_aug.sample(t) for t in raw]) if train_aug.sample else torch.from_numpy(raw)
    std, mean = torch.tensor(augment.std).view(1, 3, 1, 1), torch.tensor(augment.mean).view(1, 3, 1, 1)
    after = (train_aug.batch(batch) * std + mean).permute(0, 2, 3, 1).numpy()
    save_grid([("before augmentation", raw / 255.0), ("after augmentation (train mode)", after)], out_dir / "augment.png")

    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    save_kernels(first_conv.weight.detach().numpy(), out_dir / "kernels.png")

    modules = dict(model.named_modules())
    if layer not in modules:
        options = ", ".join(name for name in modules if name.count(".") <= 1 and name)
        raise InputError(f"--layer {layer!r} is not a layer of this model; choose one of: {options}")
    captured: dict[str, torch.Tensor] = {}
    hook = modules[layer].register_forward_hook(lambda _m, _i, output: captured.__setitem__("maps", output.detach()))
    try:
        with torch.inference_mode():
            model(eval_aug.batch(torch.stack([eval_aug.sample(raw[0])]) if eval_aug.sample
                                 else torch.from_numpy(raw[:1])))
    finally:
        hook.remove()
    centre = (raw[0].shape[0] - augment.crop) // 2
    crop = raw[0][centre:centre + augment.crop, centre:centre + augment.crop] / 255.0
    save_activations(crop, captured["maps"][0].numpy(), layer, out_dir / "activations.png")
    tiles.close()
    return summary
