"""Mixup and CutMix of a training batch (Zhang et al. 2018; Yun et al. 2019): each tile is blended with, or
has a box pasted from, another tile of the same batch, and the loss is the same mix of the two tiles' losses.
A regulariser against memorising the few training patients. The mixing weight comes from torch's CPU
generator and the partner order from the batch's device generator, so a step never waits for the GPU and a
resumed run draws what an unbroken one would."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Mixed:
    """A mixed batch: inputs, each tile's own and its partner's label, and the share ``lam`` of its own."""

    x: torch.Tensor
    y: torch.Tensor
    y_partner: torch.Tensor
    lam: float

    def loss(self, criterion: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """The mix of the losses against both labels (exact for cross-entropy, weighted or smoothed)."""
        if self.lam >= 1.0:
            return criterion(logits, self.y)
        return self.lam * criterion(logits, self.y) + (1.0 - self.lam) * criterion(logits, self.y_partner)


@dataclass(frozen=True)
class BatchMix:
    """``kind``: mixup (the whole tiles blended, weight ~ Beta(alpha, alpha)) or cutmix (a box of area
    1 - weight pasted from the partner; the weight is then the box's exact complement)."""

    kind: str
    alpha: float

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Mixed:
        lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        partner = torch.randperm(len(y), device=x.device)
        if self.kind == "mixup":
            return Mixed(x.lerp(x[partner], 1.0 - lam), y, y[partner], lam)
        return self._cutmix(x, y, partner, lam)

    @staticmethod
    def _cutmix(x: torch.Tensor, y: torch.Tensor, partner: torch.Tensor, lam: float) -> Mixed:
        h, w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        bh, bw = int(round(h * cut)), int(round(w * cut))
        top = int(torch.randint(0, h - bh + 1, ()).item())
        left = int(torch.randint(0, w - bw + 1, ()).item())
        out = x.clone()
        out[..., top:top + bh, left:left + bw] = x[partner][..., top:top + bh, left:left + bw]
        return Mixed(out, y, y[partner], 1.0 - bh * bw / (h * w))


def batch_mix(kind: str, alpha: float) -> BatchMix | None:
    """The mix the settings name, or None for ``none``."""
    return None if kind == "none" else BatchMix(kind, alpha)
