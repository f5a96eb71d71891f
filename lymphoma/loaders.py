"""PyTorch loaders over the tile shards: a distributed sampler per rank, reshuffled each epoch, with augmentation
draws seeded per tile and epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from lymphoma.augment import NormalizeOnly
from lymphoma.errors import InputError
from lymphoma.phase_tiles import PhaseTiles
from lymphoma.tile_cache import CachedLoader, cached_loader


class AugmentedTiles(Dataset):
    """A phase's tiles as a torch Dataset of ``(tensor, label)``: uint8 HWC as loaded, or the per-tile transform's
    output."""

    def __init__(self, tiles: PhaseTiles, transform: Optional[Callable[[np.ndarray], torch.Tensor]] = None) -> None:
        self.tiles, self.transform = tiles, transform

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        """The tile at ``key``: an index, or ``(index, seed)`` whose transform draws from torch's generator
        seeded with ``seed`` (``SeededDraws``); the caller's generator state is left as it was."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        tile, label = self.tiles[index]
        if not self.transform:
            return torch.from_numpy(tile), label
        if seed is None:
            return self.transform(tile), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(tile), label


class SeededDraws(Sampler[tuple[int, int]]):
    """A training sampler's indices, each with the seed of its augmentation's random draws, a function of
    (seed, epoch, rank, position in the epoch): an epoch draws the same whichever worker takes a tile and
    whatever the workers drew before, so a resumed run repeats the uninterrupted one exactly."""

    def __init__(self, sampler: Sampler[int], seed: int, rank: int) -> None:
        self.sampler, self.seed, self.rank, self.epoch, self.skip = sampler, seed, rank, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Draw epoch ``epoch``'s order, leaving out its first ``skip`` positions (those a mid-epoch checkpoint had
        trained on: the rest keep their tiles and seeds)."""
        self.epoch, self.skip = epoch, skip
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = int(np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1, np.uint64)[0])
        for position, index in enumerate(self.sampler):
            if position >= self.skip:
                yield index, (base + position) % 2**63

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)  # type: ignore[arg-type]


class StridedSampler(Sampler[int]):
    """Every ``world``-th index from ``rank``, in order, without padding: exact distributed evaluation."""

    def __init__(self, length: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, length, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def case_balanced_weights(labels: np.ndarray, cases: np.ndarray) -> np.ndarray:
    """Each tile's probability of being drawn: every class equally likely, within a class every case
    equally likely, within a case every tile equally likely."""
    weights = np.zeros(len(labels), dtype=np.float64)
    classes = np.unique(labels)
    for label in classes:
        in_class = labels == label
        class_cases = np.unique(cases[in_class])
        for case in class_cases:
            members = in_class & (cases == case)
            weights[members] = 1.0 / (len(classes) * len(class_cases) * members.sum())
    return weights / weights.sum()


class CaseBalancedSampler(Sampler[int]):
    """``num_samples`` tiles per epoch drawn with replacement by ``case_balanced_weights``, the same draw on
    every rank (seeded by seed and epoch), each rank taking every ``world``-th of it."""

    def __init__(self, labels: np.ndarray, cases: np.ndarray, num_samples: int, rank: int, world: int,
                 seed: int) -> None:
        self.weights = case_balanced_weights(np.asarray(labels), np.asarray(cases))
        self.per_rank = -(-num_samples // world)
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        draw = rng.choice(len(self.weights), size=self.per_rank * self.world, p=self.weights)
        return iter(draw[self.rank::self.world].tolist())

    def __len__(self) -> int:
        return self.per_rank


def cacheable(transform: Optional[Callable[[np.ndarray], torch.Tensor]]) -> bool:
    """Whether a phase read through ``transform`` can be cached: no per-tile step, or a deterministic one."""
    return transform is None or isinstance(transform, NormalizeOnly)


def make_sampler(tiles: PhaseTiles, rank: int, world: int, train: bool, seed: int, balance_cases: bool = False,
                 samples_per_epoch: Optional[int] = None) -> Sampler[Any]:
    """This rank's sampler: shuffled and split across ranks with a seed per draw (train; ``balance_cases``:
    drawn evenly by class and case), or a strided part (eval)."""
    if len(tiles) < world:
        raise InputError(f"{len(tiles)} tiles for {world} processes: more processes than samples; "
                         "use fewer processes or more images")
    sampler: Sampler[Any]
    if train and balance_cases:
        sampler = CaseBalancedSampler(tiles.labels, tiles.cases, samples_per_epoch or len(tiles), rank, world, seed)
    elif train:
        sampler = DistributedSampler(range(len(tiles)), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    else:
        sampler = StridedSampler(len(tiles), rank, world)
    return SeededDraws(sampler, seed, rank) if train else sampler


def make_loader(tiles: PhaseTiles, transform: Optional[Callable[[np.ndarray], torch.Tensor]], batch_size: int,
                rank: int, world: int, train: bool, seed: int, workers: int, balance_cases: bool = False,
                samples_per_epoch: Optional[int] = None, cache: str = "none",
                device: Optional[torch.device] = None) -> DataLoader | CachedLoader:
    """A loader for this rank (``make_sampler``): loader processes reading the shards (``cache`` none, or a
    random per-tile ``transform``), or the phase read whole into memory or onto ``device``
    (``lymphoma.tile_cache``)."""
    sampler = make_sampler(tiles, rank, world, train, seed, balance_cases, samples_per_epoch)
    if cache in ("memory", "device") and cacheable(transform):
        return cached_loader(tiles, transform, sampler, batch_size, cache, device, workers)
    # its own generator: making the workers' seeds never draws from the global one that dropout uses
    generator = torch.Generator().manual_seed(seed * 2 + int(train))
    return DataLoader(AugmentedTiles(tiles, transform), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      generator=generator, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                      drop_last=False)
