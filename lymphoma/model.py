"""The network built from settings: torchvision's DenseNet with the tutorial's reduced preset and DenseNet-121,
or a pretrained backbone (``lymphoma.backbones``); and the ensemble of several such models that `lymphoma cv`
ships."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.models import DenseNet

from lymphoma.stochastic_depth import add_stochastic_depth


class Ensemble(torch.nn.Module):
    """Members of one architecture whose output is the log of their mean softmax: softmax of it is the mean
    of the members' probabilities, so voting, TTA and reports treat it like a single model."""

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([member(x).float().softmax(1) for member in self.members]).mean(0)
        return probs.clamp_min(1e-12).log()


def _densenet(architecture: dict[str, object]) -> torch.nn.Module:
    net = DenseNet(growth_rate=int(architecture["growth_rate"]), block_config=tuple(architecture["block_config"]),
                   num_init_features=int(architecture["num_init_features"]), bn_size=int(architecture["bn_size"]),
                   drop_rate=float(architecture["drop_rate"]), num_classes=int(architecture["num_classes"]))
    if float(architecture.get("drop_path") or 0.0) > 0:
        add_stochastic_depth(net, float(architecture["drop_path"]))
    return net


def _single(architecture: dict[str, object]) -> torch.nn.Module:
    if architecture.get("backbone"):
        from lymphoma.backbones import build_backbone

        return build_backbone(architecture)
    return _densenet(architecture)


def build_model(architecture: dict[str, object]) -> torch.nn.Module:
    """The network of an architecture dict (as stored in checkpoints): this project's DenseNet or a pretrained
    backbone (weights at initialisation: they come from the checkpoint or ``model.weights``); with
    ``members: k``, an ``Ensemble`` of k of them."""
    members = int(architecture.get("members") or 0)
    if members:
        return Ensemble([_single(architecture) for _ in range(members)])
    return _single(architecture)
