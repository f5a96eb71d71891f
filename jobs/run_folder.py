"""One run: its typed config, the resolved YAML it was made from, and the run folder with every path in it.

A ``Run`` is built once from the layered config (``open_run``) and handed to every stage; it is picklable,
so a submitted task receives it as it is instead of parsing the config again.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import submitit
from omegaconf import DictConfig, OmegaConf

from hpc import make_executor, refuse_beside_open_job, submit, wait_for
from jobs.config import Config, ConfigError, load_config, to_object
from lymphoma.errors import InputError, is_disk_full
from lymphoma.files import write_text_atomic
from lymphoma.inputs import Inputs, discover
from lymphoma.sharding import MANIFEST_NAME

log = logging.getLogger(__name__)
NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP}  # flock on a filesystem without locks
_WARNED_NO_LOCKS: set[int] = set()  # the filesystems (st_dev) this process has warned about


@dataclass(frozen=True)
class Run:
    """The typed ``config``, its ``resolved`` YAML (interpolations filled in) and the folder ``dir``."""

    config: Config
    resolved: str
    dir: Path

    @classmethod
    def from_config(cls, raw: DictConfig, folder: Path | None = None) -> Run:
        """Type and check the layered config once; the folder is ``run.root/run.name`` unless given."""
        config = to_object(raw)
        return cls(config, OmegaConf.to_yaml(raw, resolve=True),
                   Path(folder if folder is not None else Path(config.run.root) / config.run.name).absolute())

    def at(self, folder: Path | str) -> Run:
        """The same config working in another folder (a cross-validation fold, a grid point)."""
        return replace(self, dir=Path(folder).absolute())

    def with_values(self, values: dict[str, Any]) -> Run:
        """The config with some dotted keys set (each must exist: a typo is an error naming it)."""
        raw = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(self.resolved))
        layer: dict[str, Any] = {}
        for key, value in values.items():
            if OmegaConf.select(raw, key, default="__missing__") == "__missing__":
                raise ConfigError(f"{key!r} is not a setting; `lymphoma config` lists every key")
            *sections, name = key.split(".")
            node = layer
            for section in sections:
                node = node.setdefault(section, {})
            node[name] = value
        return Run.from_config(OmegaConf.merge(raw, layer), self.dir)

    def as_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what checkpoints record)."""
        return OmegaConf.to_container(OmegaConf.create(self.resolved))  # type: ignore[return-value]

    @property
    def tiles(self) -> Path:
        return self.dir / "tiles"

    @property
    def manifest(self) -> Path:
        return self.tiles / MANIFEST_NAME

    @property
    def split_csv(self) -> Path:
        return self.dir / "split.csv"

    @property
    def train(self) -> Path:
        return self.dir / "train"

    @property
    def checkpoints(self) -> Path:
        return self.train / "checkpoints"

    @staticmethod
    def folder_of_checkpoint(checkpoint: Path) -> Path | None:
        """The run folder a checkpoint lies in (``checkpoints`` read backwards: ``<run>/train/checkpoints/x.pt``), or
        None for one elsewhere."""
        checkpoint = Path(checkpoint).absolute()
        if checkpoint.parent.name == "checkpoints" and checkpoint.parent.parent.name == "train":
            return checkpoint.parents[2]
        return None

    @property
    def predict(self) -> Path:
        return self.dir / "predict"

    def logs(self, stage: str) -> Path:
        """Where a stage's task logs go (``%j`` is the job id)."""
        return (self.train / "logs" if stage == "train" else self.dir / "logs" / stage) / "%j"

    def executor(self, stage: str, logs: Path | None = None, max_timeouts: int = 3) -> submitit.AutoExecutor:
        """The configured executor for a stage's tasks, named ``<stage>-<run name>`` (``hpc.make_executor``)."""
        return make_executor(self.config.cluster, logs or self.logs(stage), f"{stage}-{self.config.run.name}",
                             max_timeouts)

    def one_job(self, stage: str, folder: Path, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` as one job of the configured executor, named ``<stage>-<run name>``, its logs in
        ``<folder>/logs`` and remembered in ``<folder>/slurm-job.json`` (``hpc.ledger``); waited for, its result."""
        folder.mkdir(parents=True, exist_ok=True)
        job = submit(self.executor(stage, folder / "logs" / "%j"), fn, *args, ledger=folder / "slurm-job.json")
        log.info(f"{stage} job {job.job_id}: logs in {folder / 'logs'}")
        return wait_for(job, f"{stage}-{self.config.run.name}", poll_s=self.config.cluster.poll_s)[0]

    def set_aside(self, folder: Path, what: str) -> None:
        """``--restart``: ``folder`` (a stage's outputs) renamed ``<name>.before-<date-time>`` beside it, kept; never
        while a SLURM job the folder's ledger names runs (the ledger moves with it, and submit would no longer ask)."""
        if self.config.cluster.kind == "slurm":
            refuse_beside_open_job(folder / "slurm-job.json", f"{folder.name}-{self.config.run.name}")
        if folder.exists():
            aside = folder.with_name(f"{folder.name}.before-{time.strftime('%Y%m%d-%H%M%S')}")
            folder.rename(aside)
            log.info(f"restarting: the earlier {what} is kept in {aside}")

    def create(self) -> Run:
        """Make the folder and check that it can be written; an error that says what to do when it cannot."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise InputError(f"cannot write to the run folder {self.dir} ({err.strerror or err}); set run.root to a "
                             "writable folder, e.g. run.root=$HOME/lymphoma-runs") from None
        return self

    def save_config(self, path: Path | None = None) -> None:
        """Write the resolved config next to the outputs it made (``<run>/config.yaml`` unless given)."""
        write_text_atomic(path or self.dir / "config.yaml", self.resolved)

    @contextmanager
    def session(self, job: str) -> Iterator[Run]:
        """What a command that writes the run folder does first: create it, lock it against a second
        ``lymphoma <job>`` and save the resolved config in it."""
        with self.create().lock(job):
            self.save_config()
            yield self

    def inputs(self) -> Inputs:
        """The labelled images of ``data`` (bad ones skipped with their reason unless tiles.strict)."""
        data = self.config.data
        return discover(data.source, data.classes, data.case_pattern, data.columns, self.config.tiles.strict,
                        data.regions)

    def lock(self, job: str) -> AbstractContextManager[None]:
        """Hold ``<run>/.<job>.lock`` so that two ``lymphoma <job>`` on one run folder cannot interleave."""
        return folder_lock(self.dir, job, "choose another run.name")

    @contextmanager
    def tiles_in_use(self, writing: bool) -> Iterator[None]:
        """The run's tiles: ``lymphoma tile`` writes them alone, training reads them (any number at once), so
        a tiling never rewrites the shards under a running training, nor starts one on half-written shards."""
        if writing:
            busy = (f"the tiles in {self.tiles} are in use (a running `lymphoma train` reads them); wait for it to "
                    "end, or tile into another run.name")
        else:
            busy = (f"`lymphoma tile` (pid {{holder}}) is writing the tiles in {self.tiles}; wait for it to end, "
                    "then train")
        with _flock(self.dir / ".tiles.lock", fcntl.LOCK_EX if writing else fcntl.LOCK_SH, busy.format):
            yield


def folder_lock(folder: Path, job: str, otherwise: str = "give another --out") -> AbstractContextManager[None]:
    """Hold ``<folder>/.<job>.lock`` so that two ``lymphoma <job>`` never write one folder at once (the second
    is refused at once, naming the first's pid); the lock dies with its process, so a killed job never leaves the
    folder locked."""
    return _flock(folder / f".{job}.lock", fcntl.LOCK_EX,
                  lambda holder: f"another `lymphoma {job}` (pid {holder}) is using {folder}; wait for it to end or "
                                 f"{otherwise}")


@contextmanager
def _flock(path: Path, mode: int, busy: Callable[..., str]) -> Iterator[None]:
    """Hold an flock on ``path`` (LOCK_EX or LOCK_SH) or raise InputError(``busy(holder=<pid>)``) at once;
    the file holds the pid of the last exclusive holder. The lock dies with its process. On a filesystem without
    locks the command goes on unlocked, with a warning (``_no_locks``)."""
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            handle.seek(0)
            raise InputError(busy(holder=handle.read().strip() or "?")) from None
        except OSError as err:
            if err.errno not in NO_LOCKS:
                raise
            _no_locks(path, err)
            locked = False
        if not locked:  # outside the except: an error of the body is not shown as raised while handling this one
            yield
            return
        if mode == fcntl.LOCK_EX:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _no_locks(path: Path, err: OSError) -> None:
    """Warn, once per filesystem, that its folders cannot be locked (NFS without its lock daemon, Lustre mounted
    without flock), so two commands writing one folder at once are not refused there."""
    device = path.parent.stat().st_dev
    if device not in _WARNED_NO_LOCKS:
        _WARNED_NO_LOCKS.add(device)
        log.warning(f"{path.parent} is on a filesystem without file locks ({err.strerror}: NFS without its lock "
                    "daemon, Lustre mounted without flock): going on unlocked, so a second `lymphoma` command writing "
                    "the same folder at once is not refused there; run one at a time on it, or give run.root (--out) "
                    "a folder on a filesystem with locks")


def open_run(experiment: str | Path | None = None, overrides: list[str] | None = None,
             cluster: str | None = None) -> Run:
    """The run of a command line: defaults, experiment, cluster profile and overrides, typed once."""
    return Run.from_config(load_config(experiment, overrides, cluster))


def make_out_folder(path: Path, marker: str | None = None, option: str = "--out") -> Path:
    """``path`` made where needed, as a folder this command can write (with the command's ``marker`` file in it):
    an InputError naming ``option`` where it is a file or cannot be written; a full disk stays the OSError the
    command line reports as such."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} is a file, not a folder; give a new or empty folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        if marker:
            (path / marker).touch()
    except OSError as err:
        if is_disk_full(err):
            raise
        raise InputError(f"cannot write to {path} ({err.strerror}); choose a writable {option}") from None
    return path


def set_aside_out_dir(run: Run, out_dir: Path, marker: str, made_by: str, job: str,
                      before_markers: tuple[str, ...] = ()) -> None:
    """``--restart`` of a command with an output folder: an earlier run's folder (never someone else's files:
    ``prepare_out_dir`` refuses those) renamed ``<name>.before-<date-time>`` beside it and kept; refused while
    another ``lymphoma <job>`` writes it (its lock) or a SLURM job its ledger names still runs."""
    if not out_dir.exists():
        return
    prepare_out_dir(out_dir, marker, made_by, before_markers)
    with folder_lock(out_dir, job):
        run.set_aside(out_dir, f"output of {made_by}")


def prepare_out_dir(out_dir: Path, marker: str, made_by: str,
                    before_markers: tuple[str, ...] = ()) -> Path:
    """An empty folder (but for this command's log) or one an earlier run of the command made (it holds
    ``marker``, or every one of ``before_markers``, what such a run left before it marked its folders); never
    someone else's files, which the command's own names (config.yaml, summary files) would replace."""
    ours = (out_dir / marker).exists() or bool(before_markers) and all((out_dir / n).exists() for n in before_markers)
    if out_dir.is_dir() and any(p.name != "logs" for p in out_dir.iterdir()) and not ours:
        raise InputError(f"output folder {out_dir} exists and holds other files; give an empty or new folder "
                         f"(or the folder of an earlier {made_by}, to resume it)")
    return make_out_folder(out_dir, marker)
