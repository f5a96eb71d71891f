"""The one config flow: defaults YAML, then an experiment YAML, then a cluster profile, then dotted overrides.

OmegaConf merges them onto a typed schema, so an unknown key or a value of the wrong type is an
error naming the key and the file it came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hpc.executors import EXECUTOR_KINDS, ExecutorSettings
from lymphoma.errors import InputError
from lymphoma.files import write_text_atomic
from lymphoma.settings import (
    AugmentSettings,
    CVSettings,
    ModelSettings,
    PredictSettings,
    TrainSettings,
)
from lymphoma.stain import StainSettings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"
DATA_ENV = "LYMPHOMA_DATA"


class ConfigError(InputError):
    """A config file or override that cannot be used."""


@dataclass
class RunConfig:
    name: str = MISSING
    root: str = MISSING


@dataclass
class DataConfig:
    source: str = MISSING
    classes: Optional[List[str]] = MISSING
    case_pattern: str = MISSING
    columns: Dict[str, str] = MISSING


@dataclass
class SplitConfig:
    val_fraction: float = MISSING
    test_fraction: float = MISSING
    seed: int = MISSING


@dataclass
class TilesConfig:
    size: int = MISSING
    stride: int = MISSING
    resize: float = MISSING
    pad: int = MISSING
    resample: str = MISSING
    background_level: int = MISSING
    max_background: float = MISSING
    target_mpp: Optional[float] = MISSING
    target_power: Optional[float] = MISSING
    default_mpp: Optional[float] = MISSING
    min_tissue: float = MISSING
    compression: str = MISSING
    images_per_shard: int = MISSING
    strict: bool = MISSING


@dataclass
class DownloadConfig:
    urls: List[str] = MISSING
    sha1: Optional[str] = MISSING
    dest: str = MISSING


@dataclass
class Config:
    run: RunConfig = MISSING
    data: DataConfig = MISSING
    split: SplitConfig = MISSING
    tiles: TilesConfig = MISSING
    download: DownloadConfig = MISSING
    model: ModelSettings = MISSING
    augment: AugmentSettings = MISSING
    stain: StainSettings = MISSING
    train: TrainSettings = MISSING
    predict: PredictSettings = MISSING
    cv: CVSettings = MISSING
    cluster: ExecutorSettings = MISSING


def default_data_root() -> str:
    """``$LYMPHOMA_DATA``, else the shared real data beside the checkout."""
    return os.environ.get(DATA_ENV) or str(PROJECT_ROOT.parent / "shared" / "data" / "lymphoma-iicbu2008")


def _read_yaml(path: Path) -> DictConfig:
    try:
        with path.open() as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; give an existing YAML file (see {CONFIG_DIR})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}; fix the syntax at the line shown") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping of sections (run, data, split, tiles, ...), "
                          f"got a {type(data).__name__}")
    return OmegaConf.create(data)


def cluster_profile(name: str) -> DictConfig:
    """``local``/``debug``/``slurm`` (with ``configs/cluster/<name>.yaml`` if present) or a profile's path."""
    path = Path(name)
    if name in EXECUTOR_KINDS:
        named = CONFIG_DIR / "cluster" / f"{name}.yaml"
        profile = _read_yaml(named) if named.is_file() else OmegaConf.create({})
        return OmegaConf.merge(profile, {"cluster": {"kind": name}})
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return _read_yaml(path)
    named = CONFIG_DIR / "cluster" / f"{name}.yaml"
    if named.is_file():
        return _read_yaml(named)
    profiles = sorted(p.stem for p in (CONFIG_DIR / "cluster").glob("*.yaml"))
    raise ConfigError(f"--cluster {name!r}: not one of {', '.join(EXECUTOR_KINDS)}, a profile in "
                      f"{CONFIG_DIR / 'cluster'} ({', '.join(profiles)}) or a YAML file")


def load_config(experiment: str | Path | None = None, overrides: list[str] | None = None,
                cluster: str | None = None) -> DictConfig:
    """Merge defaults, experiment, cluster profile and ``key=value`` overrides onto the schema."""
    if not OmegaConf.has_resolver("lymphoma_data"):
        OmegaConf.register_resolver("lymphoma_data", default_data_root)
    layers: list[tuple[str, Any]] = [(str(CONFIG_DIR / "defaults.yaml"), _read_yaml(CONFIG_DIR / "defaults.yaml"))]
    if experiment is not None:
        layers.append((str(experiment), _read_yaml(Path(experiment))))
    if cluster is not None:
        layers.append((f"--cluster {cluster}", cluster_profile(cluster)))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override(s) {bad} must look like section.key=value, e.g. tiles.stride=64")
        layers.append(("command-line overrides", OmegaConf.from_dotlist(overrides)))
    cfg = OmegaConf.structured(Config)
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{source}: {_explain(err)}") from None
    return cfg


def from_yaml_text(text: str) -> DictConfig:
    """A resolved config saved as YAML (as a job receives it), checked against the schema again."""
    try:
        return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
    except OmegaConfBaseException as err:
        raise ConfigError(f"saved config: {_explain(err)}") from None


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    first = str(err).splitlines()[0]
    if "not in" in first or "Key '" in first and "not" in first:
        return f"unknown key {key!r} ({first}); check the spelling against configs/defaults.yaml"
    return f"bad value for {key!r}: {first}"


def to_object(cfg: DictConfig) -> Config:
    """Resolve interpolations, check that nothing is missing and build the typed config."""
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(f"config: {_explain(err)}") from None
    except ValueError as err:
        raise ConfigError(str(err)) from None


def save_resolved(cfg: DictConfig, path: Path) -> None:
    """Write the fully resolved config (interpolations filled in) next to the outputs it made."""
    write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))
