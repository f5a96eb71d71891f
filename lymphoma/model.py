"""torchvision DenseNet built from settings, with the tutorial's reduced preset and DenseNet-121."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import List

import torch
from torchvision.models import DenseNet

from lymphoma.errors import InputError

PRESETS = {
    "densenet-reduced": {"growth_rate": 32, "block_config": [2, 2, 2, 2], "num_init_features": 64, "bn_size": 4},
    "densenet121": {"growth_rate": 32, "block_config": [6, 12, 24, 16], "num_init_features": 64, "bn_size": 4},
}


@dataclass
class ModelSettings:
    """A DenseNet: a preset, or ``custom`` with every field given."""

    preset: str = "densenet-reduced"
    growth_rate: int = 32
    block_config: List[int] = field(default_factory=lambda: [2, 2, 2, 2])
    num_init_features: int = 64
    bn_size: int = 4
    drop_rate: float = 0.0

    def resolved(self) -> "ModelSettings":
        """The settings with the preset's architecture filled in."""
        if self.preset == "custom":
            return self
        if self.preset not in PRESETS:
            raise InputError(f"model.preset is {self.preset!r}; allowed: {', '.join(PRESETS)}, custom")
        return replace(self, **PRESETS[self.preset])

    def architecture(self, num_classes: int) -> dict[str, object]:
        arch = asdict(self.resolved())
        arch["block_config"] = list(arch["block_config"])
        arch["num_classes"] = num_classes
        return arch


def build_model(architecture: dict[str, object]) -> torch.nn.Module:
    """A torchvision DenseNet from an architecture dict (as stored in checkpoints)."""
    return DenseNet(growth_rate=int(architecture["growth_rate"]), block_config=tuple(architecture["block_config"]),
                    num_init_features=int(architecture["num_init_features"]), bn_size=int(architecture["bn_size"]),
                    drop_rate=float(architecture["drop_rate"]), num_classes=int(architecture["num_classes"]))
