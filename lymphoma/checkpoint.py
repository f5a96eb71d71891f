"""Checkpoints: written atomically, loaded with ``weights_only=True``, with errors that say what to do."""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lymphoma.errors import DiskFullError, InputError, is_disk_full
from lymphoma.settings import DENSENET_KEYS, AugmentSettings, TileSettings

# what model._densenet reads from a DenseNet's architecture (the preset's name is a label, not needed)
DENSENET_FIELDS = (*(key for key in DENSENET_KEYS if key != "preset"), "num_classes")


def rng_state() -> dict[str, Any]:
    """Every random generator training uses, in types that ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


@contextmanager
def signals_held(signums: tuple[int, ...] = (signal.SIGUSR2, signal.SIGTERM)) -> Iterator[None]:
    """Run the block with these signals held back: one that arrives meanwhile is handled when it ends. A scheduler's
    signal (SLURM's before a time limit or a preemption, whose handler requeues and exits) cut ``torch.save`` short,
    and its writer's error then took the place of the exit: the task failed instead of being requeued."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum)) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in caught:
            signal.raise_signal(signum)  # now to its own handler


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` through a temporary file, so a reader never sees half a checkpoint. A full disk
    is a DiskFullError naming the folder and the size needed, raised after the temporary file is closed and
    removed (torch's own writer, left open in the traceback, kept its space taken: the task could then not even
    record its error)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with signals_held(), tmp.open("wb") as handle:
            torch.save(state, handle)
            handle.close()
            os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch reports a short write as a RuntimeError ("unexpected pos")
        tmp.unlink(missing_ok=True)
        needed, free = _tensor_bytes(state), shutil.disk_usage(path.parent).free
        if is_disk_full(err) or free < needed:
            raise DiskFullError(path.parent, needed, free, path.name) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _tensor_bytes(value: Any) -> int:
    """The bytes of the tensors in a nested state (about a checkpoint's size on disk)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by save_checkpoint (tensors and plain Python values only)."""
    path = Path(path)
    if not path.is_file():
        found = "is a folder" if path.is_dir() else "not found"
        raise InputError(f"checkpoint {path} {found}; give the path of a best.pt or last.pt from a training run")
    state = load_state(path, map_location, "checkpoint", "use another (e.g. last.pt beside it) or train again")
    missing = [key for key in ("model", "architecture", "classes", "epoch", "tiles", "augment") if key not in state]
    if missing:
        raise InputError(f"checkpoint {path} lacks {missing}; it was not written by `lymphoma train`")
    problem = _contents_problem(state)
    if problem:
        raise InputError(f"checkpoint {path} is inconsistent: {problem}; it was damaged or edited after "
                         "`lymphoma train` wrote it: use another checkpoint (e.g. last.pt beside it) or train again")
    return state


def load_state(path: Path, map_location: str | torch.device = "cpu", what: str = "file",
               fix: str = "write it again") -> Any:
    """``torch.load`` with ``weights_only`` of a file this project saved; one that cannot be read is an InputError
    saying what it is (``what`` names it, ``fix`` says what to do)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise InputError(f"{what} {path} cannot be read: it {_why_unreadable(path, err)}; {fix}") from None


def _why_unreadable(path: Path, err: Exception) -> str:
    """What a file that torch.load refused is, in a few words (torch's own messages run to a page)."""
    with path.open("rb") as handle:
        head = handle.read(8)
    size = path.stat().st_size
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # neither torch's zip archive nor a legacy pickle
        return f"is no PyTorch checkpoint: a file of {size:,} bytes that begins {head!r}"
    text = str(err).strip()
    if "Weights only load failed" in text:
        return ("holds Python objects besides tensors and plain values, so it was not written by `lymphoma train` "
                "(and is not loaded, as it could run code)")
    first = text.splitlines()[0][:200] if text else ""
    return f"is damaged or cut short ({size:,} bytes; {type(err).__name__}: {first})"


def _contents_problem(state: dict[str, Any]) -> str | None:
    """What does not fit together in a checkpoint's fields (None when nothing), before anything is built."""
    arch, classes = state["architecture"], state["classes"]
    if not isinstance(arch, dict):
        return f"'architecture' is a {type(arch).__name__}, not a mapping"
    needed = ("backbone", "num_classes") if arch.get("backbone") else DENSENET_FIELDS
    lacking = [key for key in needed if key not in arch]
    if lacking:
        return f"'architecture' lacks {lacking}"
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes) or \
            len(set(classes)) != len(classes):
        return f"'classes' must be distinct class names, got {classes!r}"
    if len(classes) != int(arch["num_classes"]):
        return f"'classes' names {len(classes)} classes {list(classes)} but the model's head has {arch['num_classes']}"
    for key, settings in (("tiles", TileSettings), ("augment", AugmentSettings)):
        known = set(settings.__dataclass_fields__)
        if not isinstance(state[key], dict) or set(state[key]) - known:
            unknown = sorted(set(state[key]) - known) if isinstance(state[key], dict) else state[key]
            return f"{key!r} holds settings this version does not know: {unknown}"
    return None


def load_model_weights(model: torch.nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """Load weights, with an error naming both architectures when they differ."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise InputError(f"checkpoint {path} holds another architecture ({state.get('architecture')}): {first}; "
                         "use the model settings it was trained with or another checkpoint") from None
