"""Stochastic depth for torchvision's DenseNet (Huang et al. 2016, applied to dense layers): in training, each
dense layer's new features are zeroed for a whole sample with probability p and kept ones scaled by 1 / (1 - p),
so the next layers see, on average, what evaluation gives them. p rises linearly with depth, from p_max / L at the
first of the L dense layers to p_max at the last. Forward hooks carry it: the weights, their names and the
network in evaluation (prediction, export, compile) are those of the plain DenseNet."""

from __future__ import annotations

from typing import Any

import torch
from torchvision.models.densenet import _DenseLayer


def _hook(p: float) -> Any:
    def drop(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None
        keep = torch.empty((output.shape[0],) + (1,) * (output.dim() - 1), device=output.device)
        keep = keep.bernoulli_(1.0 - p).to(output.dtype).div_(1.0 - p)
        return output * keep
    return drop


def add_stochastic_depth(net: torch.nn.Module, p_max: float) -> list[float]:
    """Hook every dense layer of ``net`` in order; returns each layer's drop probability."""
    layers = [m for m in net.modules() if isinstance(m, _DenseLayer)]
    if not layers:
        raise ValueError("model.drop_path needs a DenseNet with dense layers")
    rates = [p_max * (i + 1) / len(layers) for i in range(len(layers))]
    for layer, p in zip(layers, rates):
        layer.register_forward_hook(_hook(p))
    return rates
