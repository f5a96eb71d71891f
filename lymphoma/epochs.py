"""One training epoch and one evaluation, written once and used for every phase and process count."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lymphoma.augment import Augmenter
from lymphoma.metrics import accuracy, balanced_accuracy, confusion_matrix
from lymphoma.mixing import BatchMix
from lymphoma.precision import cpu_has_bf16

if TYPE_CHECKING:  # the adversary sums its counts with sum_over_processes from here
    from lymphoma.adversary import CaseAdversary
    from lymphoma.distill import Distiller


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    confusion: Optional[torch.Tensor] = None
    outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    @property
    def accuracy(self) -> float:
        return accuracy(self.confusion) if self.confusion is not None else float("nan")

    @property
    def balanced_accuracy(self) -> float:
        return balanced_accuracy(self.confusion) if self.confusion is not None else float("nan")


def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
    """Sum over processes (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
    return values


def _count(total: torch.Tensor, loss: torch.Tensor, images: int) -> None:
    """Add a batch's summed loss and its image count to ``total`` where it lies, with no copy from the host
    (a host-to-GPU copy of a new tensor would make the host wait for the GPU every step)."""
    total[0] += loss.double() * images
    total[1] += images


def bf16_training(amp: bool | str, device: torch.device) -> bool:
    """Whether a step computes under bf16 autocast: train.amp true or false as set; auto on a CPU with bf16 units
    only (a step 1.75x on this project's avx512_bf16 machine; on GPUs 0.81x to 1.14x against TF32)."""
    if amp == "auto":
        return device.type == "cpu" and cpu_has_bf16()
    return bool(amp)


def _autocast(device: torch.device, amp: bool):  # type: ignore[no-untyped-def]
    """bf16 autocast on GPUs and CPUs (weights, gradients and the optimiser stay float32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp else nullcontext()


def _inputs(batch: torch.Tensor, augmenter: Augmenter, epoch: int, device: torch.device,
            channels_last: bool) -> torch.Tensor:
    x = augmenter.batch(batch, epoch).to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass(frozen=True)
class StepOptions:
    """How each training step runs: bf16 autocast on GPUs, NHWC input, a step cap per epoch, gradient-norm
    clipping, mixup or CutMix of the batch, a case adversary (whose targets carry each tile's case), distillation
    from the reference (whose targets carry each tile's index)."""

    amp: bool = False
    channels_last: bool = False
    max_steps: Optional[int] = None
    clip_grad_norm: Optional[float] = None
    mix: Optional[BatchMix] = None
    adversary: Optional[CaseAdversary] = None
    distiller: Optional[Distiller] = None


def _step_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, criterion: torch.nn.Module,
               options: StepOptions, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the classes of the encoded targets ``y``, the classification loss, the objective to differentiate)."""
    if options.adversary is not None:
        y, cases = options.adversary.split(y)
    if options.distiller is not None:
        y, index = options.distiller.split(y)
    if options.mix is not None:
        mixed = options.mix(x, y)
        loss = mixed.loss(criterion, model(mixed.x))
    elif options.distiller is not None:
        logits = model(x)
        loss = options.distiller.loss(criterion(logits, y), logits, index)
    else:
        loss = criterion(model(x), y)
    return y, loss, loss if options.adversary is None else loss + options.adversary.loss(y, cases, epoch)


@dataclass(frozen=True)
class EpochStart:
    """Where an epoch's training starts: at ``step``, after the loader's first ``skip`` tiles (those steps'), with
    this process's sums of them (loss sum, images) and the seconds they took; all zero at the start of an epoch."""

    step: int = 0
    skip: int = 0
    total: Optional[torch.Tensor] = None
    seconds: float = 0.0


AfterStep = Callable[[int, torch.Tensor, float], None]  # (steps done, this process's sums, seconds of the epoch)


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, augmenter: Augmenter, criterion: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int,
                    options: StepOptions = StepOptions(), averaged: Optional[torch.nn.Module] = None,
                    start_at: EpochStart = EpochStart(), after_step: Optional[AfterStep] = None) -> EpochStats:
    """Train over the loader once from ``start_at`` (updating the weight average ``averaged`` after every step, then
    calling ``after_step``, where a mid-epoch checkpoint is written); loss and image count are summed over all
    processes."""
    model.train()
    start = time.perf_counter() - start_at.seconds
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, images
    if start_at.total is not None:
        total += start_at.total.to(device)
    for step, (batch, labels) in enumerate(loader, start=start_at.step):
        if options.max_steps is not None and step >= options.max_steps:
            break
        x = _inputs(batch, augmenter, epoch, device, options.channels_last)
        y = labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, options.amp):
            y, loss, objective = _step_loss(model, x, y, criterion, options, epoch)
        objective.backward()  # bf16 autocast needs no loss scaling
        if options.adversary is not None:
            options.adversary.sync_grads()
        if options.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip_grad_norm)
        optimizer.step()
        if averaged is not None:
            averaged.update_parameters(model)  # type: ignore[operator]
        _count(total, loss.detach(), len(y))
        if after_step is not None:
            after_step(step + 1, total, time.perf_counter() - start)
    total = sum_over_processes(total)
    return EpochStats(loss=float(total[0] / max(total[1], 1)), images=int(total[1]),
                      seconds=time.perf_counter() - start)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: DataLoader, augmenter: Augmenter, criterion: torch.nn.Module,
             device: torch.device, num_classes: int, amp: bool = False, channels_last: bool = False,
             keep_outputs: bool = False) -> EpochStats:
    """Loss and confusion matrix over the loader (summed over processes); optionally this rank's raw outputs."""
    model.eval()
    start = time.perf_counter()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    outputs = []
    for batch, labels in loader:
        x = _inputs(batch, augmenter, 0, device, channels_last)
        y = labels.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(x).float()
        _count(total, criterion(logits, y), len(y))
        confusion += confusion_matrix(y, logits.argmax(1), num_classes)
        if keep_outputs:
            outputs.append(logits.cpu())
    total, confusion = sum_over_processes(total), sum_over_processes(confusion)
    return EpochStats(loss=float(total[0] / max(total[1], 1)), images=int(total[1]),
                      seconds=time.perf_counter() - start, confusion=confusion.cpu(), outputs=outputs)
