"""The ``batch`` augmentation backend: torch operations on whole batches on the training device (on a GPU node,
the uint8 batch is uploaded once and augmented there), for machines where DALI cannot be installed. The same
steps and ranges as the DALI and torchvision backends: HED jitter, flips, right-angle and arbitrary rotations,
colour jitter, grayscale, random crop, scaling and normalisation; draws from a generator seeded per epoch, so
a resumed run repeats them."""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from lymphoma.augment import Augmenter, NormalizeOnly, eval_batch, on_device
from lymphoma.settings import AugmentSettings
from lymphoma.stain import SKIMAGE_OD_UNIT, StainNormalizer, hed_matrices

GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's grayscale


class BatchAugmenter(Augmenter):
    """Augments loader batches of uint8 ``[B, H, W, 3]`` on ``device`` into float ``[B, 3, crop, crop]``."""

    def __init__(self, settings: AugmentSettings, train: bool, device: torch.device, seed: int = 0,
                 normalizer: Optional[StainNormalizer] = None) -> None:
        self.settings, self.train, self.device, self.seed = settings, train, device, seed
        self.sample = NormalizeOnly(normalizer) if normalizer is not None else None
        self._epoch: Optional[int] = None
        self._generator = torch.Generator(device=device)

    def generator(self, epoch: int) -> torch.Generator:
        """The epoch's generator (reseeded when the epoch changes: the same draws after a resume)."""
        if epoch != self._epoch:
            self._generator.manual_seed(self.seed * 100_003 + epoch)
            self._epoch = epoch
        return self._generator

    def state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "generator": self._generator.get_state()}

    def restore(self, state: dict[str, Any]) -> None:
        self._epoch = state["epoch"]
        if self._epoch is not None:
            self._generator.set_state(state["generator"])

    def batch(self, tiles: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        x = tiles.to(self.device, non_blocking=True)
        s = self.settings
        if not self.train:
            return eval_batch(x, s, self.device)
        g = self.generator(epoch)
        x = x.permute(0, 3, 1, 2).float()  # [B, 3, H, W] in 0..255
        if s.hed_jitter:
            x = hed_jitter(x, s.hed_scale, s.hed_shift, g)
        x = _flip(_flip(x, s.hflip, 3, g), s.vflip, 2, g)
        if s.rotate90:
            x = _rotate90(x, g)
        if s.rotate:
            x = _rotate(x, s.rotate, g)
        x = _colour(x, s, g)
        x = _crop(x, s.crop, g)
        mean, std = on_device(tuple(s.mean), x.device), on_device(tuple(s.std), x.device)
        return (x / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def _uniform(g: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=g, device=g.device)


def hed_jitter(x: torch.Tensor, scale: float, shift: float, g: torch.Generator) -> torch.Tensor:
    """Each stain's optical density scaled by U(1 - scale, 1 + scale) and shifted by U(-shift, shift) per tile:
    ``od' = od @ M + T`` with od = -log((I + 1) / 256) (``stain.hed_jitter_affine``), rounded to whole levels
    as the other backends' uint8 steps do. Draws: alpha ``[B, 3]`` then beta ``[B, 3]``."""
    n = len(x)
    alpha, beta = _uniform(g, (n, 3), 1 - scale, 1 + scale), _uniform(g, (n, 3), -shift, shift)
    to_hed, to_rgb = _hed_on(x.device)
    m = (to_hed * alpha[:, None, :]) @ to_rgb  # [B, 3, 3]: to_hed diag(alpha) to_rgb
    t = (beta * SKIMAGE_OD_UNIT) @ to_rgb
    od = -torch.log((x + 1) / 256).flatten(2)  # [B, 3, H*W]
    od = torch.baddbmm(t[:, :, None], m.transpose(1, 2), od).view_as(x)  # od' = od M + T, one batched product
    return (256 * torch.exp(-od) - 1).clamp(0, 255).round()


@functools.lru_cache(maxsize=8)
def _hed_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-image's HED matrices on ``device``, copied there once."""
    to_hed, to_rgb = (torch.as_tensor(m, dtype=torch.float32, device=device) for m in hed_matrices())
    return to_hed, to_rgb


def _flip(x: torch.Tensor, p: float, dim: int, g: torch.Generator) -> torch.Tensor:
    chosen = torch.rand(len(x), generator=g, device=g.device) < p
    return torch.where(chosen.view(-1, 1, 1, 1), x.flip(dim), x)


def _rotate90(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each tile rotated by k * 90 degrees, k uniform in 0..3 (counter-clockwise, as the other backends)."""
    k = torch.randint(0, 4, (len(x),), generator=g, device=g.device).view(-1, 1, 1, 1)
    out = x
    for turns in (1, 2, 3):  # every turn of the whole batch, then a choice per tile: no masked indexing, whose
        #                      sizes would make the host wait for the GPU on every batch
        out = torch.where(k == turns, torch.rot90(x, turns, dims=(2, 3)), out)
    return out


def _rotate(x: torch.Tensor, degrees: float, g: torch.Generator) -> torch.Tensor:
    """Rotation about the centre by U(-degrees, degrees), bilinear, corners outside the tile black."""
    angle = _uniform(g, (len(x),), -degrees, degrees) * math.pi / 180
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    weights = on_device(GRAY, x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _colour(x: torch.Tensor, s: AugmentSettings, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast (about each tile's mean grey), saturation, hue and grayscale, per tile."""
    n = len(x)
    if s.brightness:
        x = (x * _uniform(g, (n, 1, 1, 1), 1 - s.brightness, 1 + s.brightness)).clamp(0, 255)
    if s.contrast:
        centre = _gray(x).mean((2, 3), keepdim=True)
        x = ((x - centre) * _uniform(g, (n, 1, 1, 1), 1 - s.contrast, 1 + s.contrast) + centre).clamp(0, 255)
    if s.saturation:
        grey = _gray(x)
        x = (grey + (x - grey) * _uniform(g, (n, 1, 1, 1), 1 - s.saturation, 1 + s.saturation)).clamp(0, 255)
    if s.hue:
        x = _shift_hue(x, _uniform(g, (n, 1, 1), -s.hue, s.hue))
    if s.grayscale_p:
        chosen = torch.rand(n, generator=g, device=g.device) < s.grayscale_p
        x = torch.where(chosen.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
    return x


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue turned by ``shift`` (a fraction of the circle, ``[B, 1, 1]``) in HSV, value and saturation kept."""
    r, g_, b = x.unbind(1)
    value, _ = x.max(1)
    low, _ = x.min(1)
    chroma = value - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(value == r, ((g_ - b) / safe) % 6, torch.where(value == g_, (b - r) / safe + 2, (r - g_) / safe + 4))
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift) % 1.0 * 6
    k = torch.stack([(5 + hue) % 6, (3 + hue) % 6, (1 + hue) % 6], 1)  # the standard HSV -> RGB by channel
    return value.unsqueeze(1) - chroma.unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _crop(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """A ``size`` window of each tile at a uniform position."""
    n, _, height, width = x.shape
    top = torch.randint(0, height - size + 1, (n,), generator=g, device=g.device)
    left = torch.randint(0, width - size + 1, (n,), generator=g, device=g.device)
    steps = torch.arange(size, device=x.device)
    rows, cols = (top[:, None] + steps)[:, :, None], (left[:, None] + steps)[:, None, :]
    return x[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
