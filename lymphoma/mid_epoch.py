"""Checkpoints inside an epoch: ``checkpoints/partial.pt``.

An epoch of a large cohort can outlast a SLURM time limit, and a preemption comes at any step: a rerun then
started the epoch over, and an epoch longer than the limit never ended however often it was requeued. Every
``train.checkpoint_every_min`` minutes, and once when the job's time limit is near, training writes ``partial.pt``
at a step every process agrees on: weights, optimiser and weight average, and each process's random states,
augmentation draws and sums so far. A rerun (or the requeued job) goes on from that step with the batches and
draws the uninterrupted run had (DALI's own draws excepted); the file goes once its epoch is in ``last.pt``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from lymphoma.checkpoint import load_checkpoint
from lymphoma.epochs import EpochStart
from lymphoma.errors import InputError

log = logging.getLogger(__name__)

PARTIAL = "partial.pt"
DEADLINE_MARGIN_S = 180.0  # submitit's signal comes 90 s before a time limit; the last steps and the save need time
ASK_EVERY = 10  # steps between the processes' agreements in a job of several (each waits for the GPU once)


class CheckpointClock:
    """When training writes a mid-epoch checkpoint: ``every_min`` minutes after the last one (or the start), and
    once when the job's time limit (``deadline``, a ``time.time()``) is nearer than a margin of three minutes,
    ``ASK_EVERY`` + 2 times the slowest step and twice the last save. A job of several processes agrees every
    ``ASK_EVERY`` steps (where one says yes, all do: a MAX over the job's process group on ``device``), so that the
    GPU is waited for once every so many steps, not every step, and no other process group is needed."""

    def __init__(self, every_min: Optional[float], deadline: Optional[float], world: int,
                 device: torch.device = torch.device("cpu")) -> None:
        self.every_s = None if every_min is None else every_min * 60.0
        self.deadline = deadline if every_min is not None else None
        self.last = self.step_end = time.monotonic()
        self.slowest_step, self.save_s, self.before_deadline, self.steps = 0.0, 30.0, False, 0
        self.world = world
        self.device = device if world > 1 and dist.get_backend() == "nccl" else torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.every_s is not None

    def _deadline_near(self) -> bool:
        if self.deadline is None or self.before_deadline:
            return False
        margin = DEADLINE_MARGIN_S + (ASK_EVERY + 2) * self.slowest_step + 2 * self.save_s
        return self.deadline - time.time() <= margin

    def due(self) -> bool:
        """Whether the step just done is the one to save at (asked by every process after every step)."""
        now = time.monotonic()
        self.slowest_step, self.step_end = max(self.slowest_step, now - self.step_end), now
        self.steps += 1
        if self.world > 1 and self.steps % ASK_EVERY:
            return False
        wanted = self.every_s is not None and (now - self.last >= self.every_s or self._deadline_near())
        if self.world > 1:
            flag = torch.tensor([int(wanted)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            wanted = bool(flag.item())
        return wanted

    def restart(self) -> None:
        """A checkpoint was written (at the end of an epoch): the next is due ``every_min`` from now, and the
        processes next agree ``ASK_EVERY`` steps from now."""
        self.last = self.step_end = time.monotonic()
        self.steps = 0

    def saved(self, seconds: float) -> None:
        """A checkpoint took ``seconds``: the next is due ``every_min`` from now, and none more for the time limit
        once one was written within its margin."""
        self.save_s = seconds
        self.before_deadline = self.before_deadline or self._deadline_near()
        self.restart()


def gather(mine: dict[str, Any], world: int) -> list[dict[str, Any]]:
    """Every process's ``mine``, in rank order (this one's alone without a process group)."""
    if world == 1:
        return [mine]
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)
    return every


def epoch_order(seed: int, sampling: str, samples_per_epoch: Optional[int]) -> dict[str, Any]:
    """The settings that draw an epoch's order of tiles (``train.*``): a mid-epoch checkpoint's place in an epoch
    is a number of positions in that order, which means other tiles in another one."""
    return {"seed": seed, "sampling": sampling, **({"samples_per_epoch": samples_per_epoch} if sampling == "cases" else {})}


def resume_point(ckpt_dir: Path, world: int, order: dict[str, Any]
                 ) -> tuple[Optional[dict[str, Any]], Optional[Path]]:
    """The checkpoint a training goes on from and its path: ``partial.pt`` where it continues the epoch after
    ``last.pt`` (or the first), was written by as many processes as this job has and drew its tiles in the same
    ``order`` (``epoch_order``), else ``last.pt``, else none. A ``partial.pt`` passed over is said, never an error
    (``last.pt`` is still there)."""
    last, partial = ckpt_dir / "last.pt", ckpt_dir / PARTIAL
    state = load_checkpoint(last) if last.is_file() else None
    if not partial.is_file():
        return state, last if state is not None else None
    try:
        inside = load_checkpoint(partial)
    except InputError as err:
        log.warning(f"{err}; the epoch starts over from {'last.pt' if state is not None else 'the beginning'}")
        return state, last if state is not None else None
    mid, next_epoch = inside.get("mid_epoch", {}), (state["epoch"] + 1 if state is not None else 0)
    if mid.get("epoch") != next_epoch:
        return state, last if state is not None else None
    saved = mid.get("order", order)  # one written before it was recorded: the same order
    changed = [key for key in order if key in saved and saved[key] != order[key]]
    if len(mid.get("ranks", [])) == world and not changed:
        return inside, partial
    if changed:
        log.warning(f"{partial} stopped inside epoch {next_epoch + 1} drawn with other settings ("
                    + ", ".join(f"train.{key}={saved[key]}, now {order[key]}" for key in changed)
                    + "): its place in that epoch is in another order of tiles, so the epoch starts over")
    else:
        log.warning(f"{partial} was written by {len(mid.get('ranks', []))} process(es) and this job has {world}: "
                    f"each process's place in epoch {next_epoch + 1} differs, so the epoch starts over")
    return state, last if state is not None else None


def start_of(state: Optional[dict[str, Any]], rank: int) -> EpochStart:
    """Where this process's first epoch starts: the step of a mid-epoch checkpoint, else the beginning."""
    mid = (state or {}).get("mid_epoch")
    if mid is None:
        return EpochStart()
    return EpochStart(mid["steps"], mid["tiles"], mid["ranks"][rank]["total"], mid["seconds"])
