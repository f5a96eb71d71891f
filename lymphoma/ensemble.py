"""One checkpoint from several trained ones: the fold models of a cross-validation, averaged in probability
at prediction time. `lymphoma predict` uses it like any other checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lymphoma.checkpoint import load_checkpoint, save_checkpoint
from lymphoma.errors import InputError
from lymphoma.image_scale import training_image_size

SHARED = ("classes", "tiles", "augment", "stain")  # what every member must agree on to be averaged


def ensemble_state(paths: Sequence[Path]) -> dict[str, Any]:
    """The checkpoint of an ensemble of the checkpoints at ``paths``; members must share the architecture,
    classes, tiling, crop and stain target, since one tiling of a slide feeds all of them."""
    if not paths:
        raise InputError("an ensemble needs at least one checkpoint")
    states = [load_checkpoint(path) for path in paths]
    first = states[0]
    for path, state in zip(paths[1:], states[1:]):
        for key in ("architecture", *SHARED):
            if state.get(key) != first.get(key):
                raise InputError(f"{path} differs from {paths[0]} in {key!r}; the members of an ensemble must be "
                                 "trained with the same model, classes, tiling, crop and stain settings")
    weights = {f"members.{i}.{name}": tensor for i, state in enumerate(states) for name, tensor in state["model"].items()}
    members = [{"path": str(path), "epoch": int(state["epoch"]), "val_loss": state.get("val_loss"),
                "val_accuracy": state.get("val_accuracy")} for path, state in zip(paths, states)]
    return {**{key: first.get(key) for key in SHARED}, "architecture": {**first["architecture"], "members": len(states)},
            "model": weights, "epoch": max(m["epoch"] for m in members), "config": first.get("config"),
            "backend": first.get("backend"), "ensemble": members, "image_size": members_image_size(states),
            "cases_seen": members_cases_seen(states)}


def members_cases_seen(states: Sequence[dict[str, Any]]) -> Any:
    """Every case some member learnt from or chose its epoch on (None when a member does not record its own)."""
    if any(s.get("cases_seen") is None for s in states):
        return None
    return sorted({case for s in states for case in s["cases_seen"]})


def members_image_size(states: Sequence[dict[str, Any]]) -> Any:
    """The median of the members' training-image sizes (None when none records one)."""
    sizes = [s["image_size"] for s in states if s.get("image_size") is not None]
    return training_image_size(np.asarray(sizes)) if sizes else None


def write_ensemble(paths: Sequence[Path], out: Path) -> Path:
    """Write the ensemble of ``paths`` to ``out`` (atomically) and return ``out``."""
    save_checkpoint(ensemble_state(paths), out)
    return out
