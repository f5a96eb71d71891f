"""Augmentation with one interface and two backends: NVIDIA DALI (GPU, or CPU with device_id=None) and
torchvision transforms v2, with the same semantics.

Both modes first normalise each tile's stains to the reference when a StainNormalizer is given (in the
loader workers, on the CPU, the same code for both backends and prediction). Train mode then: HED stain
jitter, horizontal and vertical flips, a rotation by a uniform angle, a random crop, HSV / colour jitter,
random grayscale, then scaling to [0, 1], normalisation and float CHW. Eval mode: a centre crop, scaling
and normalisation only (no randomness).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import numpy as np
import torch

from lymphoma.errors import InputError
from lymphoma.settings import AugmentSettings
from lymphoma.stain import StainNormalizer, apply_od_affine, draw_hed, hed_jitter_affine


def eval_batch(tiles: np.ndarray | torch.Tensor, settings: AugmentSettings, device: torch.device) -> torch.Tensor:
    """Eval mode without a backend: centre crop, scaling and normalisation of uint8 ``[B, H, W, 3]`` tiles,
    exactly as both backends do it (prediction's fast path)."""
    x = torch.as_tensor(tiles).to(device, non_blocking=True)
    top = int(round((x.shape[1] - settings.crop) / 2.0))
    left = int(round((x.shape[2] - settings.crop) / 2.0))
    x = x[:, top:top + settings.crop, left:left + settings.crop].permute(0, 3, 1, 2).float().div_(255)
    mean, std = on_device(tuple(settings.mean), x.device), on_device(tuple(settings.std), x.device)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


@functools.lru_cache(maxsize=64)
def on_device(values: tuple[Any, ...], device: torch.device) -> torch.Tensor:
    """A float32 constant (a tuple, of tuples for a matrix) on ``device``, made once: copying a new tensor from
    the host to a GPU makes the host wait until the GPU has done all the work queued before it (a stall on every
    batch)."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(settings: AugmentSettings, device: Optional[torch.device] = None) -> str:
    """``auto`` is DALI when it is installed, else ``batch`` on a GPU (torch operations on the device) and
    torch (torchvision in the loader workers) on the CPU."""
    if settings.backend == "auto":
        if dali_available():
            return "dali"
        return "batch" if device is not None and device.type == "cuda" else "torch"
    if settings.backend == "dali" and not dali_available():
        raise InputError("augment.backend=dali but NVIDIA DALI is not installed; pip install nvidia-dali-cuda130 "
                         "(or another CUDA build) or set augment.backend=torch")
    return settings.backend


class Augmenter:
    """``sample`` (or None) runs per tile in the loader workers; ``batch`` turns a loader batch of
    uint8 ``[B, H, W, 3]`` (or already-augmented float ``[B, 3, h, w]``) into float ``[B, 3, crop, crop]``
    on ``device``."""

    sample: Optional[Callable[[np.ndarray], torch.Tensor]] = None

    def batch(self, tiles: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def state(self) -> Optional[dict[str, Any]]:
        """Where its random draws stand inside an epoch, for a mid-epoch checkpoint: empty when it draws nothing
        between batches (the per-tile draws are seeded by the loader), None when it cannot be saved."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Go on drawing from where ``state()`` was taken."""


def build_augmenter(settings: AugmentSettings, train: bool, device: torch.device, seed: int = 0,
                    normalizer: Optional[StainNormalizer] = None) -> Augmenter:
    """The augmentation of the chosen backend, in train (random) or eval (centre crop) mode, after the stain
    normalisation if one is given."""
    backend = choose_backend(settings, device)
    if backend == "dali":
        return DaliAugmenter(settings, train, device, seed, normalizer=normalizer)
    if backend == "batch":
        from lymphoma.batch_augment import BatchAugmenter

        return BatchAugmenter(settings, train, device, seed, normalizer)
    return TorchAugmenter(settings, train, device, normalizer)


class NormalizeOnly:
    """The loader's per-tile step of the DALI and batch backends: stain normalisation only (picklable)."""

    def __init__(self, normalizer: StainNormalizer) -> None:
        self.normalizer = normalizer

    def __call__(self, tile: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.normalizer(tile))


class TorchAugmenter(Augmenter):
    """torchvision transforms v2, one tile at a time, in the DataLoader workers."""

    def __init__(self, settings: AugmentSettings, train: bool, device: torch.device,
                 normalizer: Optional[StainNormalizer] = None) -> None:
        from torchvision.transforms import InterpolationMode, v2

        s = settings
        self.normalizer = normalizer
        self.hed = train and s.hed_jitter
        self.settings = s
        steps: list[object] = []
        if train:
            steps += [v2.RandomHorizontalFlip(s.hflip), v2.RandomVerticalFlip(s.vflip)]
            if s.rotate90:
                steps.append(_RandomRot90())
            steps += [v2.RandomRotation(s.rotate, interpolation=InterpolationMode.BILINEAR, fill=0),
                      v2.RandomCrop(s.crop),
                      v2.ColorJitter(brightness=s.brightness, contrast=s.contrast, saturation=s.saturation, hue=s.hue),
                      v2.RandomGrayscale(s.grayscale_p)]
        else:
            steps.append(v2.CenterCrop(s.crop))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(s.mean, s.std)]
        self._transform = v2.Compose(steps)
        self.device = device
        self.sample = self._apply

    def _apply(self, tile: np.ndarray) -> torch.Tensor:
        if self.normalizer is not None:
            tile = self.normalizer(tile)
        if self.hed:  # drawn from torch's generator, which the loader seeds per tile (loaders.SeededDraws)
            alpha = 1 + self.settings.hed_scale * (2 * torch.rand(3).numpy() - 1)
            beta = self.settings.hed_shift * (2 * torch.rand(3).numpy() - 1)
            m, t = hed_jitter_affine(alpha, beta)
            tile = apply_od_affine(tile, m[0], t[0])
        return self._transform(torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1))

    def batch(self, tiles: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        return tiles.to(self.device, non_blocking=True)


class _RandomRot90(torch.nn.Module):
    """Rotate a CHW tile by k * 90 degrees, k uniform in 0..3 (counter-clockwise, as DALI's angle)."""

    def forward(self, tile: torch.Tensor) -> torch.Tensor:
        return torch.rot90(tile, int(torch.randint(4, ())), dims=(-2, -1))


class DaliAugmenter(Augmenter):
    """A DALI pipeline fed whole batches through external_source: on the GPU when ``device`` is CUDA,
    else on the CPU (``device_id=None``). Seeded per epoch, so that a resumed run repeats it."""

    def __init__(self, settings: AugmentSettings, train: bool, device: torch.device, seed: int = 0,
                 max_batch: int = 512, threads: int = 2, normalizer: Optional[StainNormalizer] = None) -> None:
        self.settings, self.train, self.device, self.seed = settings, train, device, seed
        self.max_batch, self.threads = max_batch, threads
        self.hed = train and settings.hed_jitter
        self.sample = NormalizeOnly(normalizer) if normalizer is not None else None
        self._pipes: dict[int, object] = {}
        self._rng = np.random.default_rng(seed)

    def state(self) -> Optional[dict[str, Any]]:
        return None  # DALI's operators keep their random state to themselves

    def _pipeline(self, epoch: int) -> object:
        if epoch not in self._pipes:
            self._pipes = {epoch: self._build(self.seed * 100_003 + epoch)}
            self._rng = np.random.default_rng([self.seed, epoch])  # HED draws, repeated by a resumed run
        return self._pipes[epoch]

    def _build(self, seed: int) -> object:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali import math as dmath

        s, train, gpu = self.settings, self.train, self.device.type == "cuda"

        @pipeline_def(batch_size=self.max_batch, num_threads=self.threads,
                      device_id=self.device.index or 0 if gpu else None, seed=seed, prefetch_queue_depth=1)
        def pipeline():  # type: ignore[no-untyped-def]
            x = fn.external_source(name="tiles", layout="HWC", dtype=types.UINT8, device="cpu")
            if gpu:
                x = x.gpu()
            pos_x = pos_y = 0.5
            if self.hed:  # od' = M od + T on optical density, M and T drawn per tile on the host
                mt = fn.external_source(name="hed", dtype=types.FLOAT, device="cpu")
                od = -dmath.log((fn.cast(x, dtype=types.FLOAT) + 1.0) / 256.0)
                od = fn.coord_transform(od, MT=mt)
                x = fn.cast(dmath.clamp(256.0 * dmath.exp(-od) - 1.0, 0.0, 255.0), dtype=types.UINT8)
            if train:
                x = fn.flip(x, horizontal=fn.random.coin_flip(probability=s.hflip),
                            vertical=fn.random.coin_flip(probability=s.vflip))
                if s.rotate90:
                    x = fn.rotate(x, angle=90.0 * fn.random.uniform(values=[0, 1, 2, 3]), keep_size=True,
                                  interp_type=types.INTERP_NN)
                if s.rotate:
                    x = fn.rotate(x, angle=fn.random.uniform(range=(-s.rotate, s.rotate)), keep_size=True,
                                  fill_value=0, interp_type=types.INTERP_LINEAR)
                colour = fn.random.coin_flip(probability=1.0 - s.grayscale_p) if s.grayscale_p else 1.0
                saturation = fn.random.uniform(range=(1 - s.saturation, 1 + s.saturation)) if s.saturation else 1.0
                x = fn.hsv(x, hue=fn.random.uniform(range=(-360 * s.hue, 360 * s.hue)) if s.hue else 0.0,
                           saturation=saturation * colour,
                           value=fn.random.uniform(range=(1 - s.brightness, 1 + s.brightness)) if s.brightness else 1.0)
                if s.contrast:
                    x = fn.brightness_contrast(x, contrast=fn.random.uniform(range=(1 - s.contrast, 1 + s.contrast)),
                                               contrast_center=128)
                pos_x, pos_y = fn.random.uniform(range=(0.0, 1.0)), fn.random.uniform(range=(0.0, 1.0))
            return fn.crop_mirror_normalize(x, crop=(s.crop, s.crop), crop_pos_x=pos_x, crop_pos_y=pos_y,
                                            mean=[255 * m for m in s.mean], std=[255 * d for d in s.std],
                                            dtype=types.FLOAT, output_layout="CHW")

        pipe = pipeline()
        pipe.build()
        return pipe

    def batch(self, tiles: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if len(tiles) > self.max_batch:
            raise InputError(f"batch of {len(tiles)} tiles is larger than the DALI pipeline's {self.max_batch}")
        pipe = self._pipeline(epoch if self.train else 0)
        array = tiles.numpy()
        pipe.feed_input("tiles", [array[i] for i in range(len(array))])
        if self.hed:
            m, t = hed_jitter_affine(*draw_hed(self._rng, len(array), self.settings.hed_scale, self.settings.hed_shift))
            mt = np.concatenate([m.transpose(0, 2, 1), t[:, :, None]], axis=2)  # [M^T | T]: column vectors
            pipe.feed_input("hed", [np.ascontiguousarray(mt[i]) for i in range(len(mt))])
        (out,) = pipe.run()
        dense = out.as_tensor()
        result = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, result, cuda_stream=stream)
        return result
