"""Shared fixtures: the real data (``$LYMPHOMA_DATA``) and small real subsets of it."""

from __future__ import annotations

import csv
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tables
import torch

from jobs.config import default_data_root
from jobs.run_folder import Run, open_run
from jobs.tile import run_tile


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(default_data_root())
    if not (root / "manifest.csv").is_file():
        pytest.fail(f"real data not found at {root}; set LYMPHOMA_DATA to the lymphoma-iicbu2008 folder")
    return root


@pytest.fixture(scope="session")
def manifest_rows(data_root: Path) -> list[dict[str, str]]:
    with (data_root / "manifest.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def pick_images(rows: list[dict[str, str]], cases_per_class: int, images_per_case: int) -> list[dict[str, str]]:
    """The first images of the first cases of each class, in manifest order."""
    chosen, cases = [], {}
    for row in rows:
        seen = cases.setdefault(row["cls"], [])
        if row["case_id"] not in seen:
            if len(seen) == cases_per_class:
                continue
            seen.append(row["case_id"])
        if sum(r["case_id"] == row["case_id"] for r in chosen) < images_per_case:
            chosen.append(row)
    return chosen


@pytest.fixture()
def make_dataset(tmp_path: Path, data_root: Path, manifest_rows) -> Callable[..., Path]:
    """Copy a real subset into ``<tmp>/<name>/<class>/`` folders, as a user's data would be laid out."""

    def make(cases_per_class: int = 2, images_per_case: int = 2, name: str = "images") -> Path:
        root = tmp_path / name
        for row in pick_images(manifest_rows, cases_per_class, images_per_case):
            target = root / row["cls"] / Path(row["lowres_path"]).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data_root / row["lowres_path"], target)
        return root

    return make


@pytest.fixture()
def make_config(tmp_path: Path) -> Callable[..., Run]:
    """A config on the embedded defaults with the data source and a run folder under tmp_path."""

    def make(source: Path, *overrides: str, cluster: str | None = None, experiment: str | None = None) -> Run:
        base = [f"data.source={source}", f"run.root={tmp_path / 'runs'}", "run.name=test", "tiles.images_per_shard=4"]
        return open_run(experiment, base + list(overrides), cluster)

    return make


def read_shards(paths: list[Path]) -> dict[str, np.ndarray]:
    """Concatenated arrays of a list of shards, for comparing whole stores."""
    out: dict[str, list[np.ndarray]] = {"imgs": [], "labels": [], "coords": [], "filenames": [], "cases": []}
    for path in paths:
        with tables.open_file(path) as h5:
            for key in out:
                out[key].append(h5.get_node("/", key)[:])
    return {key: np.concatenate(value) for key, value in out.items()}


def slurm_is_up() -> bool:
    import shutil
    import subprocess

    if shutil.which("scontrol") is None:
        return False
    return subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout.count("UP") > 0


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A running SLURM cluster; .ci/run starts one (hpc/local_cluster/start.sh) and sets LYMPHOMA_REQUIRE_SLURM=1."""
    import os

    if not slurm_is_up():
        if os.environ.get("LYMPHOMA_REQUIRE_SLURM") == "1":
            pytest.fail("LYMPHOMA_REQUIRE_SLURM=1 but no SLURM cluster answers `scontrol ping`")
        pytest.skip("no SLURM cluster is up: start one with `bash hpc/local_cluster/start.sh`")


@pytest.fixture()
def tasks_importable(monkeypatch) -> None:
    """Let the subprocesses of the local executor and SLURM import the task functions in tests/hpc_tasks.py."""
    import os

    tests_dir = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in [tests_dir, os.environ.get("PYTHONPATH", "")] if p))
    monkeypatch.syspath_prepend(tests_dir)


FAST = ["tiles.size=64", "tiles.stride=64", "augment.crop=56", "train.num_workers=0", "train.batch_size=16",
        "train.eval_batch_size=64", "cluster.timeout_min=20", "train.patience=null",
        "train.samples_per_epoch=null"]  # epoch counts stay fixed


@pytest.fixture(scope="session")
def tiled(tmp_path_factory, data_root, manifest_rows) -> tuple[Path, Path]:
    """Real images of 2 cases per class (3 images each) tiled once at 64 px: (image folder, runs root)."""
    return tile_real_subset(tmp_path_factory.mktemp("training"), data_root, manifest_rows, 2, 3, 0.5)


def tile_real_subset(root: Path, data_root: Path, manifest_rows: list[dict[str, str]], cases_per_class: int,
                     images_per_case: int, val_fraction: float) -> tuple[Path, Path]:
    """The first real images of the first cases of each class copied under ``root/images`` and tiled at 64 px
    into the run ``base``: (image folder, runs root)."""
    source = root / "images"
    for row in pick_images(manifest_rows, cases_per_class, images_per_case):
        target = source / row["cls"] / Path(row["lowres_path"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_root / row["lowres_path"], target)
    cfg = open_run(None, [f"data.source={source}", f"run.root={root / 'runs'}", "run.name=base",
                             f"split.val_fraction={val_fraction}", *FAST])
    run_tile(cfg, progress=False)
    return source, root / "runs"


@pytest.fixture(scope="module")
def three_cases(tmp_path_factory, data_root, manifest_rows) -> tuple[Path, Path]:
    """Real images of 3 cases per class (2 each) tiled at 64 px, 2 training cases per class: (images, runs)."""
    return tile_real_subset(tmp_path_factory.mktemp("three-cases"), data_root, manifest_rows, 3, 2, 0.34)


SHORT_STEPS = ["train.epochs=2", "train.max_steps_per_epoch=3", "train.deterministic=true", "train.sampling=cases",
               "train.samples_per_epoch=48", "train.select=last", "train.scheduler=none", "train.warmup_epochs=0"]


def config_for(tiled: tuple[Path, Path], name: str, *overrides: str, cluster: str | None = None):
    """A run folder ``name`` holding a copy of the shared tiles, and its config."""
    source, runs = tiled
    if not (runs / name / "tiles").exists():
        shutil.copytree(runs / "base" / "tiles", runs / name / "tiles")
    return open_run(None, [f"data.source={source}", f"run.root={runs}", f"run.name={name}", *FAST, *overrides],
                       cluster)


@pytest.fixture(scope="session")
def local_ddp(tiled) -> list[dict]:
    """One short 2-process gloo training through the local executor, to compare other launches with."""
    from jobs.train import run_train

    return run_train(config_for(tiled, "ddp", *DDP_STEPS, "cluster.tasks_per_node=2"))


DDP_STEPS = ["train.epochs=1", "train.max_steps_per_epoch=4"]


@pytest.fixture()
def small_disk(tmp_path):
    """A real 4 MiB filesystem (tmpfs, mounted as root; ``mount -o remount,size=...`` resizes it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:  # e.g. a container without the right to mount
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


class StallingMount:
    """A real FUSE filesystem (bindfs) over ``source`` at ``path``; ``stall()`` stops its daemon (SIGSTOP), after
    which opening a file there hangs, as on a network filesystem that stopped answering; files stat-ed through it
    before keep answering stat from the kernel's cache (an hour), so that a command can name them."""

    def __init__(self, source: Path, path: Path, daemon: subprocess.Popen) -> None:
        self.source, self.path, self.daemon = source, path, daemon

    def stall(self) -> None:
        os.kill(self.daemon.pid, 19)  # SIGSTOP

    def resume(self) -> None:
        os.kill(self.daemon.pid, 18)  # SIGCONT


@pytest.fixture()
def stalling_mount(tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("mounting a FUSE filesystem needs root and /dev/fuse")
    if shutil.which("bindfs") is None:
        pytest.fail("bindfs is not installed: scripts/test.sh installs it as root (apt-get install bindfs)")
    source, path = tmp_path / "fuse-source", tmp_path / "fuse"
    source.mkdir()
    path.mkdir()
    daemon = subprocess.Popen(["bindfs", "-f", "-o", "attr_timeout=3600,entry_timeout=3600", str(source), str(path)],
                              stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        if os.path.ismount(path) or daemon.poll() is not None:
            break
        time.sleep(0.05)
    if not os.path.ismount(path):  # e.g. a container without the right to mount
        daemon.kill()
        pytest.skip(f"cannot mount a FUSE filesystem here: {daemon.communicate()[1].strip()}")
    mount = StallingMount(source, path, daemon)
    try:
        yield mount
    finally:
        mount.resume()
        subprocess.run(["umount", "-l", str(path)], check=False)
        daemon.wait(timeout=30)


@pytest.fixture()
def no_network(monkeypatch):
    """Networking off in this process: a connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def legacy_densenet_file(path: Path, name: str = "densenet121") -> torch.nn.Module:
    """A randomly initialised torchvision DenseNet (with non-trivial batch-norm statistics) saved under
    torchvision's legacy key names (``norm.1``), as its published files are."""
    import torchvision

    torch.manual_seed(1)
    source = getattr(torchvision.models, name)(weights=None)
    for module in source.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key): value
              for key, value in source.state_dict().items()}
    assert any(".norm.1." in key for key in legacy)
    torch.save(legacy, path)
    return source.eval()


def tiny_timm_file(path: Path, name: str, num_classes: int = 3) -> torch.nn.Module:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(2)
    source = timm.create_model(name, num_classes=num_classes).eval()
    save_file(source.state_dict(), str(path))
    return source


def real_tiles(data_root: Path) -> torch.Tensor:
    """Centre crops (112 px, scaled to [0, 1]) of the default tiles of every 40th low-resolution image: about 100."""
    from lymphoma.settings import TileSettings
    from lymphoma.tile_sources import open_tiles

    images = sorted((data_root / "lowres").glob("*/*.png"))[::40]
    pixels = np.concatenate([b for p in images for b in open_tiles(str(p), TileSettings()).batches])
    return torch.from_numpy(pixels[:, 8:120, 8:120]).permute(0, 3, 1, 2).float() / 255


def decompression_bomb(path: Path) -> Path:
    """A PNG whose header declares 30000 x 30000 pixels (PIL refuses it as a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="session")
def wsi_dir(data_root: Path) -> Path:
    """The small real whole-slide files beside the data set (../shared/data/wsi)."""
    folder = data_root.parent / "wsi"
    if not (folder / "CMU-1-Small-Region.svs").is_file():
        pytest.fail(f"the whole-slide test files are not in {folder}")
    return folder


def replaced_while_the_first_task_runs(command: list[str], records: Path, target: Path, replacement: Path,
                                       first: int, in_place: bool) -> tuple[int, str]:
    """Run ``command`` (an array job whose tasks run one after another, ``first`` slides in the first) in a real
    process and put ``replacement`` in the place of ``target`` once the first task has written its first record into
    ``records``, so that the later tasks start after it: a new file renamed over it, as trainings and `mv` replace
    files, or written over it ``in_place``, as `cp` does; the command's exit status and what it printed."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not list(records.glob("*.json")):
        time.sleep(0.005)
    if in_place:
        shutil.copyfile(replacement, target)
    else:
        shutil.copyfile(replacement, target.with_name(f"{target.name}.new"))
        os.replace(target.with_name(f"{target.name}.new"), target)
    written = len(list(records.glob("*.json")))
    printed, _ = proc.communicate(timeout=600)
    assert 1 <= written < first, f"{written} slides done when the file was replaced: the first task had ended"
    return proc.returncode, printed


def on_a_terminal(command: list[str], timeout_s: float) -> tuple[int, str]:
    """Run ``command`` with its output on a pseudo-terminal 100 columns wide (where progress bars show): its exit
    status and what it printed."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the command and every process it started closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code = proc.wait(timeout=timeout_s)
    reader.join(timeout=30)
    os.close(leader)
    return code, b"".join(chunks).decode(errors="replace")
