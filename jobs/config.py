"""The one config flow: the settings classes' defaults, then an experiment YAML, then a cluster profile, then
dotted overrides.

OmegaConf merges them onto a typed schema built from ``lymphoma.settings`` (and ``hpc.executors`` for the
cluster), so an unknown key or a value of the wrong type is an error naming the key and the file it came from.
``lymphoma config`` prints the result with every key's meaning.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hpc import EXECUTOR_KINDS, ExecutorSettings
from lymphoma.errors import InputError
from lymphoma.settings import (
    AugmentSettings,
    CVSettings,
    DataSettings,
    DownloadSettings,
    MILSettings,
    ModelSettings,
    PredictSettings,
    RunSettings,
    SplitSettings,
    StainSettings,
    TileSettings,
    TrainSettings,
)

if TYPE_CHECKING:
    from jobs.run_folder import Run

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"
DATA_ENV = "LYMPHOMA_DATA"


class ConfigError(InputError):
    """A config file or override that cannot be used."""


@dataclass
class Config:
    """The schema: one section per settings class, whose defaults are the config's defaults."""

    run: RunSettings = field(default_factory=RunSettings)
    data: DataSettings = field(default_factory=DataSettings)
    split: SplitSettings = field(default_factory=SplitSettings)
    tiles: TileSettings = field(default_factory=TileSettings)
    download: DownloadSettings = field(default_factory=DownloadSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    stain: StainSettings = field(default_factory=StainSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    predict: PredictSettings = field(default_factory=PredictSettings)
    cv: CVSettings = field(default_factory=CVSettings)
    mil: MILSettings = field(default_factory=MILSettings)
    cluster: ExecutorSettings = field(default_factory=ExecutorSettings)

    def __post_init__(self) -> None:
        _check_run_name(self.run.name)

    def crop_misfit(self) -> str | None:
        """Why tiles of this config cannot train with it (``augment.crop`` above ``tiles.size``), or None; the
        commands that train refuse before tiling, ``lymphoma tile`` alone warns (its tiles may serve another
        config)."""
        if self.augment.crop <= self.tiles.size:
            return None
        return (f"augment.crop={self.augment.crop} is larger than tiles.size={self.tiles.size}: training crops its "
                "inputs from the stored tiles; lower augment.crop or raise tiles.size")

    def check_trainable(self) -> None:
        """Refuse, before any tile is cut, a config whose tiles cannot train with it."""
        misfit = self.crop_misfit()
        if misfit:
            raise ConfigError(misfit)


def _check_run_name(name: str) -> None:
    """``run.name`` names one folder under ``run.root`` (and the SLURM jobs): no path, nothing that leaves the root."""
    if not name.strip() or name in (".", "..") or any(sep in name for sep in ("/", "\\")):
        raise ConfigError(f"run.name {name!r} must name one folder under run.root (letters, digits, '-', '_', '.'), "
                          "not a path; to keep runs elsewhere set run.root")


def default_data_root() -> str:
    """``$LYMPHOMA_DATA``, else the shared real data beside the checkout."""
    return os.environ.get(DATA_ENV) or str(PROJECT_ROOT.parent / "shared" / "data" / "lymphoma-iicbu2008")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                    "keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _check_sections(source: str, data: Any, form: str) -> None:
    """Each section a mapping of its keys: ``cluster: slurm`` in a file, or ``train=5`` on the command line, gets
    an error that shows the ``form`` a key takes there (``{section}`` filled in)."""
    for name, value in data.items():
        owners = [] if name in Config.__dataclass_fields__ else _sections_with_key(name)
        if owners:
            example = form.replace("{section}", owners[0]).replace("<key>", str(name)).replace("<value>", str(value))
            raise ConfigError(f"{source}: {name!r} is not a section but a key of {' and '.join(owners)}: write it "
                              f"inside its section, e.g. {example}; `lymphoma config` lists every key")
        if name in Config.__dataclass_fields__ and value is not None and not isinstance(value, (dict, DictConfig)):
            hint = " (or --cluster slurm)" if name == "cluster" else ""
            raise ConfigError(f"{source}: section {name!r} must be a mapping of its keys, e.g. "
                              f"{form.format(section=name)}{hint}; got {value!r}; `lymphoma config` lists every key")


def _sections_with_key(key: Any) -> list[str]:
    """The sections that hold a key of this name (``kind``: cluster)."""
    schema = OmegaConf.structured(Config)
    return [name for name in schema if isinstance(schema[name], DictConfig) and key in schema[name]]


def _read_yaml(path: Path) -> DictConfig:
    try:
        with path.open() as handle:
            data = yaml.load(handle, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; give an existing YAML file (see {CONFIG_DIR})") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; give a YAML file (see {CONFIG_DIR})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}; fix the syntax at the line shown") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping of sections (run, data, split, tiles, ...), "
                          f"got a {type(data).__name__}")
    _check_sections(str(path), data, '"{section}:\\n  <key>: <value>"')
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


def keys_set(experiment: str | Path | None, overrides: list[str] | None, section: str) -> set[str]:
    """The keys of ``section`` that the experiment file or the ``key=value`` overrides set (the others are the
    defaults)."""
    keys = set(_read_yaml(Path(experiment)).get(section) or {}) if experiment is not None else set()
    return keys | {o.split("=", 1)[0].split(".", 1)[1] for o in overrides or [] if o.startswith(f"{section}.")}


def load_config(experiment: str | Path | None = None, overrides: list[str] | None = None,
                cluster: str | None = None) -> DictConfig:
    """Merge the experiment, cluster profile and ``key=value`` overrides onto the schema and its defaults."""
    if not OmegaConf.has_resolver("lymphoma_data"):
        OmegaConf.register_resolver("lymphoma_data", default_data_root)
    layers: list[tuple[str, Any]] = []
    if experiment is not None:
        layers.append((str(experiment), _read_yaml(Path(experiment))))
    if cluster is not None:
        layers.append((f"--cluster {cluster}", cluster_profile(cluster)))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override(s) {bad} must look like section.key=value, e.g. tiles.stride=64")
        dotted = OmegaConf.from_dotlist(overrides)
        _check_sections("command-line overrides", dotted, "{section}.<key>=<value>")
        layers.append(("command-line overrides", dotted))
    cfg = OmegaConf.structured(Config)
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{source}: {_explain(err)}") from None
    return cfg


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    first = str(err).splitlines()[0]
    if "not in" in first or "Key '" in first and "not" in first:
        return f"unknown key {key!r} ({first}); `lymphoma config` lists every key"
    return f"bad value for {key!r}: {first}"


def to_object(cfg: DictConfig) -> Config:
    """Resolve interpolations, check that nothing is missing and build the typed config."""
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(f"config: {_explain(err)}") from None
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _field_comments(cls: type) -> dict[str, str]:
    """The comment after each field of a settings class (and comment lines right below it), from its source."""
    comments: dict[str, str] = {}
    last = None
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"^    (\w+): [^=#]+=[^#]*?(?:#\s?(.*))?$", line)
        if match:
            last = match.group(1)
            if match.group(2):
                comments[last] = match.group(2).strip()
        elif last and re.match(r"^    #\s+\S", line):
            comments[last] = f"{comments.get(last, '')} {line.strip().lstrip('#').strip()}".strip()
        else:
            last = None
    return comments


def annotated_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, every section headed by its settings class's summary and every key followed
    by its meaning."""
    out = []
    for section in fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        notes = _field_comments(cls)
        summary = re.split(r"(?<=\.)\s", (inspect.getdoc(cls) or "").replace("\n", " "))[0].rstrip(".")
        out.append(f"{section.name}:{'  # ' + summary if summary else ''}")
        body = OmegaConf.to_yaml(cfg[section.name], resolve=True).rstrip("\n").splitlines()
        for line in body:
            key = line.split(":", 1)[0]
            note = notes.get(key) if not line.startswith((" ", "-")) else None
            out.append(f"  {line}" + (f"  # {note}" if note else ""))
    return "\n".join(out) + "\n"


def command(args: argparse.Namespace, run: Run) -> int:
    """``lymphoma config``: the resolved config with every key's meaning."""
    print(annotated_yaml(OmegaConf.create(run.resolved)), end="")
    return 0
