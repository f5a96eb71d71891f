"""A case adversary for training (``train.case_adversary``): a linear head on the network's pooled features that
tries to tell which training case a tile comes from, through a gradient-reversal layer, so the features are
pushed to forget the patient (staining run, scanner, fixation) while the classifier keeps the sub-type.

Every case has one class, so telling cases apart outright would also tell classes apart; the adversary therefore
only chooses among the cases of the tile's own class (class-conditional, as in conditional domain-adversarial
training): what it can learn, and the features must unlearn, is what separates patients of one sub-type. Its
weight rises from 0 to ``train.case_adversary`` over training (``2 / (1 + exp(-10 p)) - 1``, ``p`` the part of the
training done: the ramp of Ganin and Lempitsky's domain-adversarial networks), so the features form before they are
pushed. The loaders carry each tile's class and case in one integer (``PhaseTiles.targets``, ``encode``); the
adversary reads the pooled features through a hook on the network's classifier, so the model, its checkpoints and
prediction are unchanged: the adversary is saved beside them for resuming only.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from lymphoma.epochs import sum_over_processes
from lymphoma.errors import InputError


class _Reverse(torch.autograd.Function):
    """Identity forward; the gradient times ``-scale`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged, its gradient reversed and scaled by ``scale`` on the way back."""
    return _Reverse.apply(x, scale)


def encode(labels: np.ndarray, cases: np.ndarray, num_classes: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Each tile's class and case as one integer ``label + num_classes * case index``, the cases in sorted order,
    and each case's class."""
    names, case_index = np.unique(cases, return_inverse=True)
    case_class = np.zeros(len(names), dtype=np.int64)
    case_class[case_index] = labels
    if len({(int(c), int(k)) for c, k in zip(case_index, labels)}) != len(names):
        raise InputError("train.case_adversary: a case holds tiles of two classes; every case must have one class")
    return labels.astype(np.int64) + num_classes * case_index.astype(np.int64), list(names), case_class


def classifier_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The layer whose input is the pooled features: torchvision DenseNet's ``classifier``, a backbone's head."""
    net = getattr(model, "net", model)
    layer = net.get_classifier() if hasattr(net, "get_classifier") else getattr(net, "classifier", None)
    if not isinstance(layer, torch.nn.Linear):
        raise InputError(f"train.case_adversary needs a network whose classifier is one linear layer; "
                         f"{type(model).__name__} has {type(layer).__name__}: set train.case_adversary=null")
    return layer


class CaseAdversary(torch.nn.Module):
    """The adversary of one training: its head, each case's class, the weight's ramp, and the loss it adds."""

    def __init__(self, model: torch.nn.Module, case_class: np.ndarray, num_classes: int, weight: float,
                 epochs: int) -> None:
        super().__init__()
        if np.bincount(case_class, minlength=num_classes).max() < 2:
            raise InputError("train.case_adversary needs a class with two or more training cases to tell apart; "
                             "set train.case_adversary=null")
        layer = classifier_layer(model)
        self.head = torch.nn.Linear(layer.in_features, len(case_class))
        self.register_buffer("case_class", torch.as_tensor(case_class, dtype=torch.int64))
        self.num_classes, self.weight, self.epochs = num_classes, weight, epochs
        self.features: Optional[torch.Tensor] = None
        self.total: Optional[torch.Tensor] = None  # loss sum, right guesses, tiles this epoch, where the loss lies
        layer.register_forward_pre_hook(self._capture)

    def _capture(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if torch.is_grad_enabled():  # training steps only, never evaluation
            self.features = args[0]

    def split(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class, case index) of each encoded target."""
        return targets % self.num_classes, targets // self.num_classes

    def scale(self, epoch: int) -> float:
        """The weight at ``epoch``: 0 at the start, rising to ``weight``."""
        done = epoch / max(self.epochs, 1)
        return self.weight * (2.0 / (1.0 + math.exp(-10.0 * done)) - 1.0)

    def loss(self, labels: torch.Tensor, cases: torch.Tensor, epoch: int) -> torch.Tensor:
        """The adversary's cross-entropy among the cases of each tile's class, on the features of the last
        forward; the features receive its gradient reversed and scaled."""
        if self.features is None:
            raise RuntimeError("no features captured: the model's classifier did not run in this step")
        logits = self.head(reverse_gradient(self.features, self.scale(epoch))).float()
        self.features = None
        other = self.case_class.to(labels.device)[None, :] != labels[:, None]
        logits = logits.masked_fill(other, float("-inf"))
        loss = torch.nn.functional.cross_entropy(logits, cases)
        if self.total is None or self.total.device != loss.device:
            self.total = torch.zeros(3, dtype=torch.float64, device=loss.device)
        self.total[0] += loss.detach().double() * len(cases)  # no host copy: a GPU step does not wait
        self.total[1] += (logits.argmax(1) == cases).sum()
        self.total[2] += len(cases)
        return loss

    def sync_grads(self) -> None:
        """Average the head's gradients over the job's processes (the network's own go through DDP)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for p in self.head.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()

    def epoch_stats(self) -> dict[str, float]:
        """This epoch's adversary loss and accuracy over every process's tiles; the counts start again."""
        total = sum_over_processes(self.total if self.total is not None else torch.zeros(3, dtype=torch.float64))
        self.total = None
        n = max(float(total[2]), 1.0)
        return {"case_adversary_loss": float(total[0]) / n, "case_adversary_accuracy": float(total[1]) / n}
