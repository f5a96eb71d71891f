"""PyTorch loaders over the tile shards: a distributed sampler per rank, reshuffled each epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from lymphoma.dataset import TileDataset
from lymphoma.errors import InputError


class TileTorchDataset(Dataset):
    """Tiles as ``(tensor, label)``: uint8 HWC as loaded, or the per-tile transform's output."""

    def __init__(self, tiles: TileDataset, transform: Optional[Callable[[np.ndarray], torch.Tensor]] = None) -> None:
        self.tiles, self.transform = tiles, transform

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        tile, label = self.tiles[index]
        return (self.transform(tile) if self.transform else torch.from_numpy(tile)), label


class StridedSampler(Sampler[int]):
    """Every ``world``-th index from ``rank``, in order, without padding: exact distributed evaluation."""

    def __init__(self, length: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, length, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(tiles: TileDataset, transform: Optional[Callable[[np.ndarray], torch.Tensor]], batch_size: int,
                rank: int, world: int, train: bool, seed: int, workers: int) -> DataLoader:
    """A loader for this rank: shuffled and split across ranks (train), or a strided part (eval)."""
    if len(tiles) < world:
        raise InputError(f"{len(tiles)} tiles for {world} processes: more processes than samples; "
                         "use fewer processes or more images")
    dataset = TileTorchDataset(tiles, transform)
    sampler: Sampler[int] = (DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
                             if train else StridedSampler(len(dataset), rank, world))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), drop_last=False)
