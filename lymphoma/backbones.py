"""Pretrained backbones: torchvision DenseNets and any timm architecture, built without weights and then
loaded from a local file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``). Nothing here reaches the network:
compute nodes are often offline, and a missing file is an error naming the setting and the file."""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from lymphoma.errors import InputError

if TYPE_CHECKING:
    from lymphoma.settings import ModelSettings

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# torchvision's DenseNet files name the layers of a dense layer norm.1, relu.1, conv.1, ...; its modules
# are norm1, relu1, conv1 (torchvision renames them on load the same way)
LEGACY_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
                                 r"running_var|num_batches_tracked))$")
WRAPPER_KEYS = ("state_dict", "model", "module", "teacher", "student")


class InputAdapter(torch.nn.Module):
    """Resize the batch to the backbone's input edge (if one is set) and normalise it as it was pretrained."""

    def __init__(self, input_size: Optional[int], mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and x.shape[-1] != self.input_size:
            x = torch.nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                                align_corners=False, antialias=x.shape[-1] > self.input_size)
        return (x - self.mean) / self.std


class Backbone(torch.nn.Module):
    """A pretrained network behind its input adapter; ``head`` names its classifier module (never frozen)."""

    def __init__(self, net: torch.nn.Module, adapter: InputAdapter, head: str) -> None:
        super().__init__()
        self.adapter, self.net, self.head = adapter, net, head
        self.frozen: list[str] = []  # modules whose parameters are frozen: kept in eval mode while training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.adapter(x))

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        modules = dict(self.net.named_modules())
        for name in self.frozen:  # frozen batch-norm statistics stay what they were pretrained as
            modules[name].eval()
        return self


def require_architecture(backbone: str) -> None:
    """A timm backbone's architecture exists (checked before any task is submitted), else an InputError with the
    names closest to it; torchvision's are checked with the settings."""
    source, _, name = backbone.partition(":")
    if source != "timm":
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm never downloads here: weights come from model.weights
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
        raise InputError(f"model.backbone {backbone!r}: timm has no architecture {name!r}"
                         + (f"; similar: {', '.join(close)}" if close else "; see timm.list_models()"))


def create_net(backbone: str, num_classes: int, drop_rate: float) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    """The network of ``source:name`` with a fresh head of ``num_classes``, the head's module name and the
    model's own pretraining configuration (timm's; empty for torchvision)."""
    source, _, name = backbone.partition(":")
    if source == "torchvision":
        import torchvision

        net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes, drop_rate=drop_rate)
        return net, "classifier", {}
    require_architecture(backbone)
    import timm

    net = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
    classifier = net.get_classifier()
    head = next(module_name for module_name, module in net.named_modules() if module is classifier)
    return net, head, dict(getattr(net, "pretrained_cfg", None) or {})


def build_backbone(architecture: dict[str, Any]) -> Backbone:
    """The backbone of an architecture dict (``ModelSettings.architecture``), weights at initialisation."""
    net, head, cfg = create_net(str(architecture["backbone"]), int(architecture["num_classes"]),
                                float(architecture.get("drop_rate") or 0.0))
    fixed = cfg.get("input_size") if cfg.get("fixed_input_size") else None
    size = architecture.get("input_size") or (int(fixed[-1]) if fixed else None)
    mean = architecture.get("mean") or list(cfg.get("mean") or IMAGENET_MEAN)
    std = architecture.get("std") or list(cfg.get("std") or IMAGENET_STD)
    model = Backbone(net, InputAdapter(size, list(mean), list(std)), head)
    freeze(model, str(architecture.get("freeze") or "none"))
    return model


def require_model(model: "ModelSettings") -> None:
    """Before any task is submitted (train, cv, features): a pretrained backbone's architecture exists, its
    ``model.freeze`` names one of its blocks, and its weight file is here. The DenseNet presets need nothing."""
    if model.backbone is None:
        return
    require_buildable(model.architecture(2))  # the number of classes changes the head alone
    if model.weights is not None:
        require_weight_file(model.weights)


def require_buildable(architecture: dict[str, Any]) -> None:
    """A backbone's settings make a network (its architecture exists, ``model.freeze`` names one of its blocks),
    checked before any task is submitted: built on the meta device, so nothing is allocated."""
    if not architecture.get("backbone"):
        return
    with torch.device("meta"):  # create_net names an architecture timm has not before it builds anything
        build_backbone(architecture)


def require_weight_file(path: str | Path, setting: str = "model.weights") -> Path:
    """The weight file, which must exist here: nothing is ever downloaded."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{setting}={path}: file not found; give a local weight file ({', '.join(WEIGHT_SUFFIXES)}): "
                         f"nothing is downloaded (or {setting}=null to start from random weights)")
    return path


def read_weight_file(path: str | Path, setting: str = "model.weights",
                     read_from: Optional[str | Path] = None) -> dict[str, torch.Tensor]:
    """The tensors of a weight file, unwrapped from ``{"state_dict": ...}``-style containers; ``read_from``: a copy
    of ``path`` to read in its place (a job's ``PinnedFile``; errors name ``path``)."""
    path = require_weight_file(path, setting) if read_from is None else Path(path)
    source = Path(read_from) if read_from is not None else path
    if path.suffix not in WEIGHT_SUFFIXES:
        raise InputError(f"{setting}={path}: unknown format {path.suffix!r}; allowed: {', '.join(WEIGHT_SUFFIXES)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(source))
        else:
            state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - each format fails in its own way on a damaged file
        raise InputError(f"{setting}={path}: cannot be read ({type(err).__name__}: {str(err)[:200]}); the file is "
                         "damaged or not a weight file") from None
    while isinstance(state, dict) and len(state) <= 4 and any(k in state for k in WRAPPER_KEYS):
        state = state[next(k for k in WRAPPER_KEYS if k in state)]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{setting}={path}: holds no state dict of tensors; save model.state_dict()")
    return state


def canonical_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key names as the model spells them: a prefix every key shares (``module.``, ``model.``) dropped, and
    torchvision's legacy DenseNet names (``norm.1``) renamed (``norm1``)."""
    for prefix in ("module.", "model.", "backbone.", "encoder."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    renamed = {}
    for key, value in state.items():
        match = LEGACY_DENSENET_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


@dataclass(frozen=True)
class LoadedWeights:
    """What a weight file gave: how many tensors, which head tensors were left for the new head, its digest."""

    path: str
    sha256: str
    loaded: int
    head_skipped: list[str]


def load_pretrained(model: Backbone, path: str | Path, setting: str = "model.weights",
                    read_from: Optional[str | Path] = None) -> LoadedWeights:
    """Load every tensor of the file (or of ``read_from``, its copy) into the backbone, bit-exactly; the head is kept
    fresh when the file's is of another shape (other classes). Missing or misshapen tensors elsewhere mean another
    architecture."""
    state = canonical_keys(read_weight_file(path, setting, read_from))
    target = model.net.state_dict()
    is_head = [key for key in set(target) | set(state) if key.startswith(model.head + ".")]
    misshapen = [k for k in state if k in target and state[k].shape != target[k].shape and k not in is_head]
    missing = [k for k in target if k not in state and k not in is_head]
    unexpected = [k for k in state if k not in target and k not in is_head]
    if misshapen or missing or len(unexpected) > len(state) // 20:
        detail = "; ".join(part for part in (
            f"{len(missing)} weights of the model missing (first: {missing[:3]})" if missing else "",
            f"{len(misshapen)} of another shape (first: {misshapen[0]}: {tuple(state[misshapen[0]].shape)} in the file, "
            f"{tuple(target[misshapen[0]].shape)} in the model)" if misshapen else "",
            f"{len(unexpected)} in the file that the model lacks (first: {unexpected[:3]})" if unexpected else "") if part)
        raise InputError(f"{setting}={path}: not weights of this backbone ({detail}); set model.backbone to the "
                         "architecture the file was saved from")
    usable = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
    model.net.load_state_dict(usable, strict=False)
    if any(k in is_head and k not in usable for k in target):
        reset_head(model)
    skipped = sorted(k for k in state if k in is_head and k not in usable)
    return LoadedWeights(str(path), file_digest(read_from if read_from is not None else path), len(usable), skipped)


def reset_head(model: Backbone) -> None:
    """Start a fresh head (the file's was for other classes, or had none) near zero: weights N(0, 0.01), biases
    0, so fine-tuning starts at chance. timm's Google-style init draws a head's weights from +-1/sqrt(classes),
    +-0.58 for 3 classes: on pretrained EfficientNet-Lite0 features the first loss was 5.4 instead of ln 3, and
    the first steps' large gradients wrecked the pretrained layers (inner-val accuracy at chance after 4 epochs)."""
    head = dict(model.net.named_modules())[model.head]
    with torch.no_grad():
        for parameter in head.parameters():
            if parameter.ndim > 1:
                torch.nn.init.normal_(parameter, std=0.01)
            else:
                torch.nn.init.zeros_(parameter)


def freeze(model: Backbone, spec: str) -> int:
    """Freeze ``all`` parameters but the head's, or every parameter up to and including the block named
    ``spec`` (in definition order); returns how many tensors were frozen. Frozen modules' batch norms stay in
    eval mode while training, so their statistics stay the pretrained ones."""
    if spec == "none":
        return 0
    names = [name for name, _ in model.net.named_modules() if name]
    if spec != "all" and spec not in names:
        choices = [name for name in names if name.count(".") <= 1][:40]
        raise InputError(f"model.freeze={spec!r} is not a block of {type(model.net).__name__}; use none, all or "
                         f"one of: {', '.join(choices)}")
    params = [(name, p) for name, p in model.net.named_parameters() if not name.startswith(model.head + ".")]
    if spec != "all":
        inside = [i for i, (name, _) in enumerate(params) if name.startswith(spec + ".")]
        if not inside:
            raise InputError(f"model.freeze={spec!r} has no parameters of its own to freeze; name a block above it")
        params = params[:inside[-1] + 1]
    for _, parameter in params:
        parameter.requires_grad_(False)
    model.frozen = [name for name, module in model.net.named_modules()
                    if name and any(True for _ in module.parameters(recurse=False))
                    and not any(p.requires_grad for p in module.parameters(recurse=False))]
    return len(params)


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in chunks (foundation-model files are gigabytes)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
