"""torchvision DenseNet built from settings, with the tutorial's reduced preset and DenseNet-121."""

from __future__ import annotations

import torch
from torchvision.models import DenseNet

from lymphoma.settings import PRESETS, ModelSettings

__all__ = ["PRESETS", "ModelSettings", "build_model"]

def build_model(architecture: dict[str, object]) -> torch.nn.Module:
    """A torchvision DenseNet from an architecture dict (as stored in checkpoints)."""
    return DenseNet(growth_rate=int(architecture["growth_rate"]), block_config=tuple(architecture["block_config"]),
                    num_init_features=int(architecture["num_init_features"]), bn_size=int(architecture["bn_size"]),
                    drop_rate=float(architecture["drop_rate"]), num_classes=int(architecture["num_classes"]))
