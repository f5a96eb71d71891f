"""Attention-based multiple-instance learning on tile embeddings (Ilse et al. 2018, gated attention, as CLAM's
single-branch model): a bag is one slide or one case (every tile of a patient), its class comes from the
attention-weighted mean of its tiles' embeddings, and the attention says which tiles it looked at."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from lymphoma.settings import MILSettings


class GatedAttentionMIL(torch.nn.Module):
    """Tiles ``[N, D]`` -> bag logits ``[C]`` and attention ``[N]`` (softmax over the bag's tiles)."""

    def __init__(self, in_dim: int, classes: int, hidden: int = 256, attention: int = 128, dropout: float = 0.25) -> None:
        super().__init__()
        self.embed = torch.nn.Sequential(torch.nn.Linear(in_dim, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout))
        self.att_v = torch.nn.Sequential(torch.nn.Linear(hidden, attention), torch.nn.Tanh(), torch.nn.Dropout(dropout))
        self.att_u = torch.nn.Sequential(torch.nn.Linear(hidden, attention), torch.nn.Sigmoid(), torch.nn.Dropout(dropout))
        self.att_w = torch.nn.Linear(attention, 1)
        self.classifier = torch.nn.Linear(hidden, classes)

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(tiles)
        attention = torch.softmax(self.att_w(self.att_v(h) * self.att_u(h)).squeeze(-1), dim=0)
        return self.classifier((attention.unsqueeze(-1) * h).sum(0)), attention


SMALL_BAG = 1 << 20  # embedding values (tiles x dimensions) of a bag below which one thread runs it faster


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bag_threads(values: float) -> int:
    """Threads for bags of ``values`` embedding values: one for small bags, whose every operation is too short to
    share (with threads each waits for the slowest: 85x slower beside a CV run's two processes on 2 cores), else all."""
    return 1 if values < SMALL_BAG else torch.get_num_threads()


@dataclass
class Bag:
    """One bag: its tiles' embeddings, the class index, and which slide each tile came from."""

    key: str
    features: np.ndarray
    label: int
    slides: np.ndarray  # [N] slide key of each tile


def train_mil(bags: Sequence[Bag], classes: int, settings: MILSettings) -> GatedAttentionMIL:
    """Train on the bags, one bag per step in a seeded shuffled order, cross-entropy weighted by 1 / class
    frequency (bags of rare classes count as much as common ones); a fixed number of epochs."""
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    model = GatedAttentionMIL(bags[0].features.shape[1], classes, settings.hidden, settings.attention,
                              settings.dropout)
    counts = np.bincount([b.label for b in bags], minlength=classes).astype(np.float64)
    weights = torch.tensor(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / classes, 0.0), dtype=torch.float32)
    criterion = torch.nn.CrossEntropyLoss(weight=weights)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    tensors = [(torch.from_numpy(b.features).float(), torch.tensor([b.label])) for b in bags]
    model.train()
    with torch_threads(bag_threads(float(np.median([b.features.size for b in bags])))):
        _epochs(model, tensors, criterion, optimizer, settings.epochs, rng)
    return model.eval()


def _epochs(model: GatedAttentionMIL, tensors: Sequence[tuple[torch.Tensor, torch.Tensor]],
            criterion: torch.nn.Module, optimizer: torch.optim.Optimizer, epochs: int, rng: random.Random) -> None:
    """``epochs`` passes over the bags, one bag per step, in a seeded shuffled order."""
    for _ in range(epochs):
        order = list(range(len(tensors)))
        rng.shuffle(order)
        for i in order:
            x, y = tensors[i]
            logits, _ = model(x)
            loss = criterion(logits.unsqueeze(0), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


@torch.inference_mode()
def predict_bag(model: GatedAttentionMIL, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities ``[C]`` and attention ``[N]`` of one bag."""
    with torch_threads(bag_threads(features.size)):
        logits, attention = model(torch.from_numpy(features).float())
    return logits.softmax(0).numpy(), attention.numpy()
