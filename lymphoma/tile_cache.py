"""A phase's tiles held whole in memory or on the GPU, batched without loader processes, for augmenters that
work on whole batches (``batch``, ``dali``): the loader is then never what a GPU waits for, and their one
per-tile step, stain normalisation, runs once per tile instead of once per epoch.

``train.cache``: ``device`` uploads the uint8 tiles to the training GPU once and gathers each batch there;
``memory`` keeps them in this process's memory and gathers each batch with one indexing; ``none`` reads each
tile from its shard in loader processes; ``auto`` picks ``device`` on a GPU where the tiles take at most a
quarter of its free memory and the augmenter works on the GPU, else ``memory`` where they take at most a
quarter of the node's available memory shared by its processes, else ``none``. The batches are the same in
every mode: the sampler's indices, in its order, ``batch_size`` at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Sampler, Subset

from lymphoma.errors import InputError
from lymphoma.phase_tiles import PhaseTiles

SHARE = 4  # auto uses at most 1/SHARE of the free device memory, or of the available host memory
GATHER_BYTES = 256 << 20  # tiles each process sends per round when the processes pool their parts


def available_memory() -> int:
    """Bytes of memory the node can still give (MemAvailable), or 0 where that is unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def choose_cache(setting: str, nbytes: int, device: torch.device, on_device: bool, processes: int = 1) -> str:
    """The cache mode for a phase of ``nbytes`` pixels (see the module's docstring); ``on_device``: the
    augmenter accepts batches that are already on ``device``; ``processes``: training processes on this node."""
    if setting != "auto":  # one of CACHES: TrainSettings checked it
        if setting == "device" and not (device.type == "cuda" and on_device):
            raise InputError(f"train.cache=device needs a GPU and a batch augmenter that runs there "
                             f"(augment.backend=batch); here: {device.type}; use train.cache=memory or auto")
        return setting
    if device.type == "cuda" and on_device and nbytes * SHARE <= torch.cuda.mem_get_info(device)[0]:
        return "device"
    if nbytes * SHARE * max(processes, 1) <= available_memory():
        return "memory"
    return "none"


MODES = ("none", "memory", "device")  # from the most to the least cautious


def agreed_cache(mode: str, device: torch.device) -> str:
    """The most cautious of the modes the job's processes chose (each judges its own free memory): they read
    the phases together, so they must all cache or all not."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mode
    code = torch.tensor([MODES.index(mode)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(code, op=dist.ReduceOp.MIN)
    return MODES[int(code.item())]


class CachedLoader:
    """Batches ``(uint8 [B, H, W, 3], labels [B])`` of ``pixels`` (a tensor in memory or on the device) in the
    order of ``sampler``, which may yield ``(index, seed)`` pairs (the seed is for per-tile augmentation, which
    a cached phase does not have). Exposes ``sampler`` and ``len`` as a DataLoader does, and ``mode``: where the
    tiles are held (memory or device)."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, sampler: Sampler, batch_size: int) -> None:
        self.pixels, self.labels, self.sampler = pixels, labels, sampler
        self.batches = BatchSampler(sampler, batch_size, drop_last=False)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def mode(self) -> str:
        return "memory" if self.pixels.device.type == "cpu" else "device"

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for keys in self.batches:
            index = torch.tensor([k[0] if isinstance(k, tuple) else k for k in keys], dtype=torch.int64)
            index = index.to(self.pixels.device, non_blocking=True)
            yield self.pixels.index_select(0, index), self.labels.index_select(0, index)


def read_phase(tiles: PhaseTiles, step: Optional[Callable[[np.ndarray], torch.Tensor]], workers: int,
               device: Optional[torch.device] = None, keep_on_device: bool = False) -> torch.Tensor:
    """Every tile of the phase, ``[N, H, W, 3]`` uint8, after the deterministic per-tile ``step`` if any (stain
    normalisation: computed once instead of every epoch), by ``workers`` loader processes. In a job of several
    processes each computes the step on its own ``1/world`` of the tiles and the parts are gathered (through
    ``device`` with NCCL, and left there with ``keep_on_device``), so a node's processes share the work instead
    of each doing all of it."""
    if step is None:
        return torch.from_numpy(tiles.read_all())
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    per = -(-len(tiles) // world)
    rank = dist.get_rank() if world > 1 else 0
    part = _read(tiles, step, workers, range(rank * per, min(len(tiles), (rank + 1) * per)))
    return part if world == 1 else _gather(part, per, len(tiles), world, device, keep_on_device)


def _read(tiles: PhaseTiles, step: Callable[[np.ndarray], torch.Tensor], workers: int,
          indices: range) -> torch.Tensor:
    from lymphoma.loaders import AugmentedTiles

    size = tiles.tile_size or 0
    pixels = torch.empty((len(indices), size, size, 3), dtype=torch.uint8)
    loader = DataLoader(Subset(AugmentedTiles(tiles, step), indices), batch_size=256, num_workers=workers)
    start = 0
    for batch, _ in loader:
        pixels[start:start + len(batch)] = batch
        start += len(batch)
    return pixels


def _gather(part: torch.Tensor, per: int, n: int, world: int, device: Optional[torch.device],
            keep_on_device: bool) -> torch.Tensor:
    """Every process's ``part`` (``per`` tiles each, the last may hold fewer) in rank order, ``[n, ...]``;
    gathered in rounds of at most GATHER_BYTES a process, through the GPU where the group is NCCL, and held
    there with ``keep_on_device`` (else in memory)."""
    through = device if dist.get_backend() == "nccl" and device is not None else torch.device("cpu")
    held = through if keep_on_device else torch.device("cpu")
    shape = part.shape[1:]
    rows = max(1, GATHER_BYTES // max(1, int(np.prod(shape))))
    padded = torch.zeros((per, *shape), dtype=torch.uint8)
    padded[:len(part)] = part
    out = torch.empty((per * world, *shape), dtype=torch.uint8, device=held)
    for start in range(0, per, rows):
        chunk = padded[start:start + rows].to(through)
        pieces = [torch.empty_like(chunk) for _ in range(world)]
        dist.all_gather(pieces, chunk)
        for r, piece in enumerate(pieces):
            out[r * per + start:r * per + start + len(piece)] = piece.to(held)
    return out[:n]


def cached_loader(tiles: PhaseTiles, step: Optional[Callable[[np.ndarray], torch.Tensor]], sampler: Sampler,
                  batch_size: int, mode: str, device: Optional[torch.device], workers: int) -> CachedLoader:
    """Read the phase whole (``read_phase``) into memory, or onto ``device`` (``mode`` device), and batch it."""
    on_device = mode == "device" and device is not None
    pixels, labels = read_phase(tiles, step, workers, device, on_device), torch.from_numpy(tiles.targets)
    if on_device:
        pixels, labels = pixels.to(device), labels.to(device)
    return CachedLoader(pixels, labels, sampler, batch_size)
