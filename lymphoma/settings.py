"""Every setting of the pipeline as a plain dataclass (no torch import), one per YAML section, with its default.

These classes are the one source of the defaults: the config schema (``jobs/config.py``) is built from them,
the comment after each field is its documentation (``lymphoma config`` prints both), and the library takes
them as they are. The cluster section's settings live in ``hpc.executors`` (hpc knows nothing of pathology).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, List, Optional

from lymphoma.errors import InputError
from lymphoma.image_scale import SCALES


def require(checks: list[tuple[str, Any, bool, str]]) -> None:
    """The first ``(key, value, holds, rule)`` whose rule does not hold, as an InputError naming the setting, the
    rule and the value given."""
    for key, value, holds, rule in checks:
        if not holds:
            raise InputError(f"{key} must be {rule}, got {value!r}")


@dataclass
class RunSettings:
    """The run folder ``<root>/<name>``: every output of every stage goes there."""

    name: str = "default"          # rerunning the same name resumes it
    root: str = "runs"


@dataclass
class DataSettings:
    """The labelled images: a folder with one sub-folder per class, or a CSV manifest."""

    source: str = "${lymphoma_data:}/lowres"  # ${lymphoma_data:}: $LYMPHOMA_DATA, else ../shared/data/lymphoma-iicbu2008
    classes: Optional[List[str]] = field(default_factory=lambda: ["CLL", "FL", "MCL"])  # label order; null: the
    #                                class folders' names, sorted
    case_pattern: str = r"^(?P<case>.+?)(?:-R\d+)?_\d+$"  # file stem -> case (patient): drops _NNN and -R<k>
    columns: Dict[str, str] = field(default_factory=lambda: {"path": "path", "label": "label", "case": "case",
                                                             "regions": "regions"})
    #                                a manifest's column names (regions: a GeoJSON region file per image, optional),
    #                                and a CSV --list's of predict and features
    regions: Optional[str] = None  # a folder of <image file stem>.geojson region files (QuPath's export); images
    #                                without one are tiled whole; tiles.region_mode says what the regions mean


@dataclass
class SplitSettings:
    """The split of ``lymphoma tile`` and ``lymphoma run``: by case (patient), stratified by class, never by image."""

    val_fraction: float = 0.25
    test_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        require([("split.val_fraction", self.val_fraction, 0 <= self.val_fraction < 1, "in [0, 1)"),
                 ("split.test_fraction", self.test_fraction, 0 <= self.test_fraction < 1, "in [0, 1)"),
                 ("split.val_fraction + split.test_fraction", self.val_fraction + self.test_fraction,
                  self.val_fraction + self.test_fraction < 1, "below 1 (some cases must train)")])


RESAMPLE_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos", "box")
MODEL_INPUT_KEYS = ("size", "stride", "resize", "pad", "target_mpp", "target_power")
NOT_PIXEL_KEYS = ("compression", "images_per_shard", "strict", "max_pixels")  # the tiles' pixels do not depend on them


@dataclass(frozen=True)
class TileSettings:
    """How images become tiles, and how tiles are stored. A pixel whose three channels are all >=
    background_level is background; target_mpp / target_power tile whole slides at a physical resolution,
    read from the best pyramid level, over detected tissue only."""

    size: int = 128                # tile edge in pixels, after resizing
    stride: int = 64               # step between tiles; size - stride is the overlap
    resize: float = 1.0            # scale factor applied to each image before tiling
    pad: int = 0                   # mirror padding on each side, in pixels after resizing
    resample: str = "bilinear"     # nearest | bilinear | bicubic | lanczos | box
    background_level: int = 220    # a pixel with all channels >= this is background
    max_background: float = 1.0    # drop tiles with a larger background fraction (1.0 keeps all)
    target_mpp: Optional[float] = None    # whole slides: tile at this many microns per pixel (0.5 = 20x);
    #                                       null: pixel tiling as above
    target_power: Optional[float] = None  # or as an objective power (20 = 20x), from each slide's objective and mpp
    default_mpp: Optional[float] = None   # the resolution of files that do not record one (plain images, some TIFFs)
    min_tissue: float = 0.5        # with target_mpp: keep tiles with at least this share of tissue
    compression: str = "blosc:zstd:1"  # none | zlib:6 (the tutorial's) | blosc:zstd:1 | blosc:lz4 | ... (see bench/)
    images_per_shard: int = 32     # one shard per array task
    strict: bool = False           # true: a bad image fails the job instead of being skipped
    max_pixels: int = 178_956_970  # plain images declaring more pixels are skipped as possible decompression
    #                                bombs (PIL's own limit); raise it for real large exports (3 bytes a pixel)
    region_mode: str = "include"   # an image with a region file (data.regions): include: tile only inside its
    #                                regions; exclude: only outside them (marked artefacts, pen, folds)
    min_region: float = 0.5        # the share of a tile's area that must lie inside (include) / outside (exclude)
    region_labels: bool = False    # true: a tile's label is the class of the region covering most of it (QuPath's
    #                                classification; it must be one of data.classes), else its image's

    @property
    def by_resolution(self) -> bool:
        """Tiles are cut at a physical resolution through the slide reader (else by pixels)."""
        return self.target_mpp is not None or self.target_power is not None

    def __post_init__(self) -> None:
        checks = [
            (self.size > 0, f"tiles.size must be positive, got {self.size}"),
            (self.stride > 0, f"tiles.stride must be positive, got {self.stride}"),
            (self.stride <= self.size, f"tiles.stride ({self.stride}) is larger than tiles.size ({self.size}): "
             f"{1 - (self.size / max(self.stride, 1)) ** 2:.0%} of every image would lie between tiles, never seen; set "
             "tiles.stride <= tiles.size (equal: tiles side by side, smaller: overlapping)"),
            (self.resize > 0, f"tiles.resize must be positive, got {self.resize}"),
            (self.pad >= 0, f"tiles.pad must be >= 0, got {self.pad}"),
            (self.resample in RESAMPLE_FILTERS,
             f"tiles.resample is {self.resample!r}; allowed: {', '.join(RESAMPLE_FILTERS)}"),
            (0 <= self.background_level <= 255, f"tiles.background_level must be in 0..255, got {self.background_level}"),
            (0.0 <= self.max_background <= 1.0, f"tiles.max_background must be in [0, 1], got {self.max_background}"),
            (self.target_mpp is None or self.target_mpp > 0, f"tiles.target_mpp must be > 0, got {self.target_mpp}"),
            (self.target_power is None or self.target_power > 0,
             f"tiles.target_power must be > 0, got {self.target_power}"),
            (self.target_mpp is None or self.target_power is None,
             "set tiles.target_mpp or tiles.target_power, not both"),
            (self.default_mpp is None or self.default_mpp > 0, f"tiles.default_mpp must be > 0, got {self.default_mpp}"),
            (0.0 <= self.min_tissue <= 1.0, f"tiles.min_tissue must be in [0, 1], got {self.min_tissue}"),
            (self.max_pixels >= 1, f"tiles.max_pixels must be >= 1, got {self.max_pixels}"),
            (self.region_mode in ("include", "exclude"),
             f"tiles.region_mode is {self.region_mode!r}; allowed: include, exclude"),
            (0.0 < self.min_region <= 1.0, f"tiles.min_region must be in (0, 1], got {self.min_region}"),
            (self.images_per_shard >= 1, f"tiles.images_per_shard must be >= 1, got {self.images_per_shard}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    def as_dict(self) -> dict[str, Any]:
        """What the tiles' pixels depend on (the store's own keys left out): recorded in shards, the manifest
        and checkpoints, and hashed into shard fingerprints."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in NOT_PIXEL_KEYS}

    def model_input_differences(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """The settings that change what a model sees and differ from the ones recorded (``as_dict``)."""
        return {key: (getattr(self, key), saved.get(key)) for key in MODEL_INPUT_KEYS
                if getattr(self, key) != saved.get(key)}


@dataclass
class DownloadSettings:
    """``lymphoma download``: the public IICBU 2008 lymphoma tarball."""

    urls: List[str] = field(default_factory=lambda: [
        "https://andrewjanowczyk.com/wp-static/lymphoma.tar.gz",
        "https://ome.grc.nia.nih.gov/iicbu2008/lymphoma.tar.gz"])
    sha1: Optional[str] = "5af6bf000a9f7d0bb9b54ae0558fbeccc1758fe6"  # null skips the check
    dest: str = "data/lymphoma"


STAIN_METHODS = ("none", "macenko", "reinhard", "haematoxylin", "grey")
STAIN_SCOPES = ("tile", "image")
IMAGE_SCOPE_METHODS = ("none", "reinhard", "grey")  # those whose statistics a slide's thumbnail can give


@dataclass(frozen=True)
class StainSettings:
    """Stain normalisation of every tile, in training, validation and prediction alike."""

    normalize: str = "reinhard"    # none | macenko | reinhard (estimated per tile, or per image: scope; the fitted
    #                                reference goes into the checkpoint, so prediction needs no reference file) |
    #                                haematoxylin (the haematoxylin channel alone, its intensity scaled to the
    #                                reference's, drawn in the reference's haematoxylin colour: no eosin) |
    #                                grey (Reinhard, then the luminance alone in all three channels: no colour)
    reference: Optional[str] = None  # an H&E image whose staining is the target; null: a standard H&E (torchstain's
    #                                  Macenko reference; for reinhard, the LAB statistics of an IICBU 2008 CLL image)
    scope: str = "tile"            # tile: each tile moved from its own statistics | image: every tile of an image
    #                                moved from the whole image's (a slide's: its tissue in the thumbnail), once, at
    #                                tiling and prediction, so tiles keep their differences in density (reinhard, grey)

    def __post_init__(self) -> None:
        if self.normalize not in STAIN_METHODS:
            raise InputError(f"stain.normalize is {self.normalize!r}; allowed: {', '.join(STAIN_METHODS)}")
        if self.scope not in STAIN_SCOPES:
            raise InputError(f"stain.scope is {self.scope!r}; allowed: {', '.join(STAIN_SCOPES)}")
        if self.scope == "image" and self.normalize not in IMAGE_SCOPE_METHODS:
            raise InputError(f"stain.scope=image works with stain.normalize {', '.join(IMAGE_SCOPE_METHODS)}, not "
                             f"{self.normalize!r}; use stain.scope=tile for it")


PRESETS = {
    "densenet-reduced": {"growth_rate": 32, "block_config": [2, 2, 2, 2], "num_init_features": 64, "bn_size": 4},
    "densenet121": {"growth_rate": 32, "block_config": [6, 12, 24, 16], "num_init_features": 64, "bn_size": 4},
}


BACKBONE_SOURCES = ("torchvision", "timm")
TORCHVISION_BACKBONES = ("densenet121", "densenet169", "densenet201")
FREEZE_CHOICES = ("none", "all")


@dataclass
class ModelSettings:
    """The network: this project's DenseNet (a preset, or ``custom`` with every field given), or a pretrained
    ``backbone`` whose weights come from a local file.

    A backbone is ``torchvision:<densenet121|densenet169|densenet201>`` (torchvision's files, with their legacy
    key names, load as they are) or ``timm:<any timm architecture>`` (``.safetensors``, ``.pt``, ``.pth`` or
    ``.bin``: UNI as ``timm:vit_large_patch16_224``, CTransPath as a Swin, ...). Its head is replaced by one for
    this project's classes. ``input_size``, ``mean`` and ``std`` are applied inside the model (tiles are resized
    to the backbone's input and normalised as it was pretrained), so training, prediction and features agree;
    ``mpp`` records the resolution it was pretrained at. No code path reaches the network."""

    preset: str = "densenet-reduced"  # densenet-reduced (the tutorial's prototype) | densenet121 | custom
    growth_rate: int = 32          # this and the fields below up to bn_size are used with preset: custom
    block_config: List[int] = field(default_factory=lambda: [2, 2, 2, 2])
    num_init_features: int = 64
    bn_size: int = 4
    drop_rate: float = 0.2         # dropout in the dense layers (the head, with a backbone), with every preset
    drop_path: float = 0.0         # stochastic depth of the DenseNet presets: in training each dense layer's new
    #                                features are dropped for a whole sample, with a probability rising linearly
    #                                from 0 to this at the last layer (lymphoma.stochastic_depth); 0: off
    backbone: Optional[str] = None  # null: the preset above | torchvision:densenet121 | timm:<name>, e.g.
    #                                 timm:vit_small_patch16_224
    weights: Optional[str] = None  # a local weight file the backbone starts from; null: random initialisation
    freeze: str = "none"           # none | all (train the head only: a linear probe) | a block name: freeze every
    #                                layer up to and including it (e.g. features.denseblock2, blocks.5)
    input_size: Optional[int] = None  # the backbone's input edge in pixels (tiles are resized to it); null: the
    #                                   timm model's own if it needs one, else the crop as it is
    mean: Optional[List[float]] = None  # the backbone's input normalisation; null: the timm model's own, ImageNet's
    std: Optional[List[float]] = None   # for torchvision (with a backbone; the DenseNet presets use augment's)
    mpp: Optional[float] = None    # microns per pixel the backbone was pretrained at (e.g. 0.5 for UNI): a
    #                                warning when tiles.target_mpp differs

    def __post_init__(self) -> None:
        if self.preset not in (*PRESETS, "custom"):  # at config time (`lymphoma config` too), not at the first build
            raise InputError(f"model.preset is {self.preset!r}; allowed: {', '.join(PRESETS)}, custom")
        if self.backbone is not None:
            source, _, name = self.backbone.partition(":")
            if source not in BACKBONE_SOURCES or not name:
                raise InputError(f"model.backbone is {self.backbone!r}; write torchvision:<name> "
                                 f"({', '.join(TORCHVISION_BACKBONES)}) or timm:<architecture>, or null")
            if source == "torchvision" and name not in TORCHVISION_BACKBONES:
                raise InputError(f"model.backbone {self.backbone!r}: torchvision backbones are "
                                 f"{', '.join(TORCHVISION_BACKBONES)}; any other architecture through timm:<name>")
        elif self.weights is not None or self.freeze != "none":
            raise InputError("model.weights and model.freeze need a pretrained backbone: set model.backbone "
                             "(e.g. torchvision:densenet121)")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None and (len(values) != 3 or (key == "std" and min(values) <= 0)):
                raise InputError(f"model.{key} needs 3 values (std > 0) or null, got {values}")
        if not 0.0 <= self.drop_path < 1.0:
            raise InputError(f"model.drop_path must be in [0, 1), got {self.drop_path}")
        if self.drop_path and self.backbone is not None:
            raise InputError("model.drop_path applies to the DenseNet presets; a timm backbone takes its own "
                             "(set it to 0 with model.backbone)")
        if self.input_size is not None and self.input_size < 16:
            raise InputError(f"model.input_size must be >= 16 pixels or null, got {self.input_size}")
        require([("model.drop_rate", self.drop_rate, 0 <= self.drop_rate < 1, "in [0, 1)")])

    def resolved(self) -> "ModelSettings":
        """The settings with the preset's architecture filled in."""
        if self.preset == "custom" or self.backbone is not None:
            return self
        if self.preset not in PRESETS:
            raise InputError(f"model.preset is {self.preset!r}; allowed: {', '.join(PRESETS)}, custom")
        return replace(self, **PRESETS[self.preset])

    def architecture(self, num_classes: int) -> dict[str, object]:
        """What rebuilds the network (stored in checkpoints): the DenseNet's fields, or the backbone, its
        input adaptation and where it is frozen (the weight file itself is not part of it)."""
        if self.backbone is not None:
            return {"backbone": self.backbone, "num_classes": num_classes, "drop_rate": self.drop_rate,
                    "input_size": self.input_size, "mean": self.mean and list(self.mean),
                    "std": self.std and list(self.std), "mpp": self.mpp, "freeze": self.freeze}
        arch = {key: value for key, value in asdict(self.resolved()).items() if key in DENSENET_KEYS}
        arch["block_config"] = list(arch["block_config"])
        arch["num_classes"] = num_classes
        if self.drop_path:  # only when on: checkpoints and fingerprints without it stay as they were
            arch["drop_path"] = self.drop_path
        return arch


DENSENET_KEYS = ("preset", "growth_rate", "block_config", "num_init_features", "bn_size", "drop_rate")


BACKENDS = ("auto", "dali", "torch", "batch")


@dataclass
class AugmentSettings:
    """Training augmentation (evaluation takes a centre crop).

    Ranges follow the tutorial: hue is a fraction of the hue circle (0.5 = anywhere), rotation in degrees.

    ``rotate90`` adds a lossless rotation by a random multiple of 90 degrees (no filled corners).
    ``hed_scale`` / ``hed_shift``: HED stain jitter (Tellez et al. 2019), each stain's optical density scaled
    by U(1 - hed_scale, 1 + hed_scale) and shifted by U(-hed_shift, hed_shift) (scikit-image HED units)."""

    backend: str = "auto"          # auto (DALI if installed, else batch on GPUs, torch on CPUs) | dali | torch | batch
    crop: int = 112                # random crop (train) / centre crop (evaluation), pixels
    hflip: float = 0.5             # probabilities
    vflip: float = 0.5
    rotate: float = 180.0          # uniform angle in [-rotate, rotate] degrees (corners filled with black)
    rotate90: bool = True          # also a lossless rotation by a random multiple of 90 degrees
    hue: float = 0.0               # hue shift, a fraction of the circle (the tutorial's 0.5 makes colours no H&E has)
    saturation: float = 0.0        # factor in [1 - s, 1 + s]
    brightness: float = 0.0
    contrast: float = 0.0
    grayscale_p: float = 0.1
    hed_scale: float = 0.05        # HED stain jitter: 0.05 light, 0.2 strong
    hed_shift: float = 0.05
    mean: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # after scaling to [0, 1]
    std: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(f"augment.backend is {self.backend!r}; allowed: {', '.join(BACKENDS)}")
        if not 0 <= self.hue <= 0.5:
            raise InputError(f"augment.hue must be in [0, 0.5] (a fraction of the hue circle), got {self.hue}")
        if not 0 <= self.hed_scale < 1 or self.hed_shift < 0:
            raise InputError(f"augment.hed_scale must be in [0, 1) and augment.hed_shift >= 0 (Tellez et al.: 0.05 "
                             f"light, 0.2 strong), got {self.hed_scale} and {self.hed_shift}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise InputError("augment.mean and augment.std need 3 values each, std > 0")
        require([("augment.crop", self.crop, self.crop >= 1, ">= 1 pixel")]
                + [(f"augment.{key}", getattr(self, key), 0 <= getattr(self, key) <= 1, "a probability in [0, 1]")
                   for key in ("hflip", "vflip", "grayscale_p")])

    @property
    def hed_jitter(self) -> bool:
        """Whether training jitters the stains (either HED range above zero)."""
        return self.hed_scale > 0 or self.hed_shift > 0


EVAL_PHASES = ("train", "val", "test")  # lymphoma.split's phases
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "step")
SELECTIONS = ("balanced_accuracy", "loss", "last")
SAMPLINGS = ("tiles", "cases")
CACHES = ("auto", "device", "memory", "none")
MIXES = ("none", "mixup", "cutmix")


@dataclass
class TrainSettings:
    """Training: optimiser, schedule, sampling, weight averaging and the epoch kept.

    ``select``: what picks best.pt and stops early: ``balanced_accuracy`` on the eval phase (a model that
    predicts one class scores 1/classes, so it cannot win; val loss breaks ties), ``loss``, or ``last`` (a
    fixed schedule: the last epoch, no early stopping); only epochs from ``min_epochs`` on are candidates (the last
    epoch of a shorter run).
    ``ema``: decay of an exponential moving average of the weights (and batch-norm statistics), updated every
    step; evaluated and saved instead of the raw weights. ``sampling``: ``tiles`` draws every tile once per
    epoch; ``cases`` draws ``samples_per_epoch`` tiles with replacement, every class equally often and, within
    a class, every case equally often (patients with many images do not dominate; class weights are then 1)."""

    epochs: int = 12
    batch_size: int = 32           # per process (twice the steps of 64 for the same compute, which this small
    #                                cohort needs to learn within 12 epochs on a CPU)
    eval_batch_size: int = 128
    optimizer: str = "adamw"       # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9          # sgd only
    scheduler: str = "cosine"      # none | cosine | step (learning rate per epoch, after the warm-up)
    warmup_epochs: int = 1         # linear warm-up of the learning rate over this many epochs
    step_size: int = 10            # step only
    gamma: float = 0.1
    num_workers: Optional[int] = None  # loader processes per training process; null: 1 on a CPU (best with DALI
    #                                    on 2 cores), on a GPU its share of the node's cores, at most 8
    amp: bool | str = False        # bf16 autocast: true, false, or auto: on a CPU with bf16 units (avx512_bf16,
    #                                AMX; a step 1.75x here), float32 elsewhere and on GPUs (H100: 1.06x for the
    #                                reduced net, 0.82x for DenseNet-121 against TF32)
    channels_last: bool = True     # NHWC memory format: faster on GPUs and on CPUs (1.6x a CPU step here)
    seed: int = 0
    deterministic: bool = False
    max_steps_per_epoch: Optional[int] = None  # cap steps per epoch (quick runs); null: the whole phase
    checkpoint_every_min: Optional[float] = 30.0  # also save inside an epoch every this many minutes, and once
    #                                before a SLURM time limit (checkpoints/partial.pt, lymphoma.mid_epoch): a rerun
    #                                or requeue goes on from that step; null: at the ends of epochs only
    class_weighted: bool = True    # cross-entropy weighted by 1 - class share (the tutorial's)
    label_smoothing: float = 0.1   # in [0, 1)
    patience: Optional[int] = None  # stop when the selection metric has not improved for this many epochs; null: never
    select: str = "last"           # last (a fixed schedule; measured best here, see README) | balanced_accuracy | loss
    min_epochs: int = 4            # epochs before any can be kept or training stop early (the last of a shorter run)
    ema: Optional[float] = 0.99    # decay of the weights' moving average (e.g. 0.99); null: off
    sampling: str = "cases"        # tiles: every tile once per epoch | cases: drawn evenly by class and by case
    samples_per_epoch: Optional[int] = 2048  # with sampling: cases; null: as many as there are training tiles
    clip_grad_norm: Optional[float] = None  # clip the gradient norm to this value; null: no clipping
    mix: str = "none"              # none | mixup | cutmix: each training tile blended with (or a box pasted from)
    #                                another of its batch, the loss mixed alike (lymphoma.mixing)
    mix_alpha: float = 0.4         # the mixing weight ~ Beta(alpha, alpha) (mixup: 0.2-0.4; cutmix: 1.0)
    case_adversary: Optional[float] = None  # weight of a case adversary (lymphoma.adversary): a head telling
    #                                apart the training cases of each class through reversed gradients, so the
    #                                features forget the patient; e.g. 0.1 to 1; null: off
    case_adversary_lr: float = 1.0  # the adversary's head learns at train.lr times this (at 1.0 it stays at
    #                                chance; at 3 and 10 the figures fall: README, levers table)
    distill: Optional[float] = None  # weight in (0, 1] of the reference's cross-fitted probabilities of each
    #                                training tile as a second target (lymphoma.distill); null: off
    eval_phase: str = "val"        # the phase that selects the checkpoint
    cache: str = "auto"            # auto | device | memory | none: where the loaders hold the tiles for batch
    #                                augmenters (lymphoma.tile_cache); auto: on the GPU or in memory where they fit

    def _check_numbers(self) -> None:
        """The optimiser's and the schedule's numbers, and the phase that selects."""
        steps = self.max_steps_per_epoch
        require([("train.lr", self.lr, self.lr > 0, "> 0 (e.g. 1e-3)"),
                 ("train.weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
                 ("train.momentum", self.momentum, 0 <= self.momentum < 1, "in [0, 1)"),
                 ("train.gamma", self.gamma, self.gamma > 0, "> 0 (the step scheduler's factor, e.g. 0.1)"),
                 ("train.step_size", self.step_size, self.step_size >= 1, ">= 1 epoch"),
                 ("train.eval_batch_size", self.eval_batch_size, self.eval_batch_size >= 1, ">= 1"),
                 ("train.max_steps_per_epoch", steps, steps is None or steps >= 1, ">= 1 or null"),
                 ("train.checkpoint_every_min", self.checkpoint_every_min,
                  self.checkpoint_every_min is None or self.checkpoint_every_min >= 0, ">= 0 minutes or null"),
                 ("train.eval_phase", self.eval_phase, self.eval_phase in EVAL_PHASES,
                  f"one of {', '.join(EVAL_PHASES)}")])

    @property
    def first_candidate(self) -> int:
        """The first epoch (1-based) that may be kept: min_epochs, or the last epoch of a shorter run."""
        return min(self.min_epochs, self.epochs)

    @property
    def warmup(self) -> int:
        """Warm-up epochs, leaving at least one epoch after them."""
        return min(self.warmup_epochs, self.epochs - 1)

    def __post_init__(self) -> None:
        self._check_numbers()
        if not 0.0 <= self.label_smoothing < 1.0:
            raise InputError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.patience is not None and self.patience < 1:
            raise InputError(f"train.patience must be >= 1 epoch or null (no early stopping), got {self.patience}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"train.optimizer is {self.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise InputError(f"train.scheduler is {self.scheduler!r}; allowed: {', '.join(SCHEDULERS)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise InputError("train.epochs and train.batch_size must be >= 1")
        if self.select not in SELECTIONS:
            raise InputError(f"train.select is {self.select!r}; allowed: {', '.join(SELECTIONS)}")
        if self.sampling not in SAMPLINGS:
            raise InputError(f"train.sampling is {self.sampling!r}; allowed: {', '.join(SAMPLINGS)}")
        if self.cache not in CACHES:
            raise InputError(f"train.cache is {self.cache!r}; allowed: {', '.join(CACHES)}")
        if self.min_epochs < 1 or self.warmup_epochs < 0:
            raise InputError(f"train.min_epochs must be >= 1 and train.warmup_epochs >= 0, got {self.min_epochs} and "
                             f"{self.warmup_epochs}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise InputError(f"train.ema must be in (0, 1) (e.g. 0.99) or null (no weight averaging), got {self.ema}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise InputError(f"train.samples_per_epoch must be >= 1 or null, got {self.samples_per_epoch}")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise InputError(f"train.clip_grad_norm must be > 0 or null, got {self.clip_grad_norm}")
        if self.mix not in MIXES:
            raise InputError(f"train.mix is {self.mix!r}; allowed: {', '.join(MIXES)}")
        if not isinstance(self.amp, bool) and self.amp != "auto":
            raise InputError(f"train.amp is {self.amp!r}; allowed: true, false, auto")
        if self.mix_alpha <= 0:
            raise InputError(f"train.mix_alpha must be > 0 (e.g. 0.4 for mixup, 1.0 for cutmix), got {self.mix_alpha}")
        if self.case_adversary_lr <= 0:
            raise InputError(f"train.case_adversary_lr must be > 0 (e.g. 10), got {self.case_adversary_lr}")
        if self.case_adversary is not None and (self.case_adversary <= 0 or self.mix != "none"):
            raise InputError(f"train.case_adversary must be > 0 (e.g. 1.0) or null, and needs train.mix=none (a mixed "
                             f"tile has two cases); got {self.case_adversary} with train.mix={self.mix}")
        if self.distill is not None and (not 0 < self.distill <= 1 or self.mix != "none" or self.case_adversary):
            raise InputError(f"train.distill must be in (0, 1] (e.g. 0.5) or null, and needs train.mix=none and "
                             f"train.case_adversary=null; got {self.distill} with train.mix={self.mix}, "
                             f"train.case_adversary={self.case_adversary}")


AGGREGATES = ("vote", "mean")


@dataclass
class PredictSettings:
    """Tile-vote prediction of whole images.

    batch_size: tiles per forward pass; slides_per_task: slides per array task; prefetch: slides decoded
    and tiled ahead of the model; heatmaps: a PNG of tile classes per slide; tta: average each tile's
    probabilities over its 8 flips and right-angle rotations; aggregate: an image's (and case's) class by
    majority ``vote`` of its tiles or by ``mean`` tile probability."""

    batch_size: int = 32           # tiles per forward pass (CPU: 32 is fastest here; GPUs want 256+)
    slides_per_task: int = 64      # at most this many slides per array task (the model is loaded once per task)
    prefetch: int = 4              # tile batches each reader keeps ready ahead of the model
    readers: int = 1               # slides read, tiled and stain-normalised at once, each by its own thread (a GPU
    #                                node wants several: one thread feeds about 1,200 tiles/s, the GPU takes 10x more)
    read_timeout_min: Optional[float] = 10.0  # a slide read this long without a tile fails (a decoder that hangs, a
    #                                filesystem that stopped answering) and the next slides go on; null: wait for ever
    heatmaps: bool = True          # a PNG of tile classes over a thumbnail, per slide
    geojson: bool = True           # per slide, the tiles as QuPath detections (GeoJSON) and CLAM-style coords (HDF5)
    probability_maps: bool = False  # per slide, one probability map per class over the thumbnail (matplotlib, ~0.2 s)
    tta: bool = False              # average over the 8 flips / right-angle rotations of each tile (8x cost)
    aggregate: str = "vote"        # vote (majority of tile classes) | mean (mean probability)
    engine: str = "torch"          # torch | compile (torch.compile: once per task, ~40 s cold; the bare model 1.1x
    #                                fp32, 1.4x bf16 on this CPU) | onnxruntime (exported to ONNX, run by ONNX Runtime)
    #                                | openvino (the ONNX export run by OpenVINO on the CPU; no compiler needed)
    precision: str = "fp32"        # fp32 | bf16 (torch, compile: autocast, on GPUs and on CPUs with bf16 units; fp32,
    #                                with a warning, where PyTorch would emulate it, 9x slower: lymphoma.precision;
    #                                openvino: bf16 inference where the CPU has bf16 instructions, else fp32)
    scale: str = "match"           # match | keep: plain images more than 1.5x off the size of a pixel-tile model's
    #                                training images, with their width:height (the same field at another resolution),
    #                                are resized to the training scale (match) or taken as they are (keep); either
    #                                way a warning names them (lymphoma.image_scale)
    regions: Optional[str] = None  # a folder of <slide name>.geojson region files (the file's stem; a DICOM
    #                                slide's folder name): only the tiles inside
    #                                (tiles.region_mode of the model) are predicted; slides without one, all

    def __post_init__(self) -> None:
        if self.read_timeout_min is not None and not self.read_timeout_min > 0:
            raise InputError(f"predict.read_timeout_min must be > 0 or null (wait for ever), got {self.read_timeout_min}")
        if min(self.batch_size, self.slides_per_task, self.prefetch, self.readers) < 1:
            raise InputError("predict.batch_size, predict.slides_per_task, predict.prefetch and predict.readers must "
                             "be >= 1")
        if self.aggregate not in AGGREGATES:
            raise InputError(f"predict.aggregate is {self.aggregate!r}; allowed: {', '.join(AGGREGATES)}")
        if self.engine not in ENGINES:
            raise InputError(f"predict.engine is {self.engine!r}; allowed: {', '.join(ENGINES)}")
        if self.precision not in PRECISIONS:
            raise InputError(f"predict.precision is {self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if self.scale not in SCALES:
            raise InputError(f"predict.scale is {self.scale!r}; allowed: {', '.join(SCALES)}")
        if self.engine == "onnxruntime" and self.precision != "fp32":
            raise InputError("predict.engine=onnxruntime runs fp32: set predict.precision=fp32 (bf16 is for engines "
                             "torch, compile and openvino)")


ENGINES = ("torch", "compile", "onnxruntime", "openvino")
EXPORTED_ENGINES = ("onnxruntime", "openvino")  # run from the model's ONNX export
PRECISIONS = ("fp32", "bf16")


CV_CHECKPOINTS = ("best", "last")


@dataclass
class CVSettings:
    """``lymphoma cv``: cross-validation grouped by case (patient), stratified by class. ``folds`` test folds; inside each, a share
    ``inner_val_fraction`` of the other cases (per class) picks the checkpoint and stops early (with
    ``inner_val_trains``, its cases train too, and it only watches training and gates the ensemble); intervals
    from ``bootstrap`` resamples of the cases at ``confidence``; ``checkpoint``: each fold predicts with its
    ``best`` (kept by train.select) or its ``last`` epoch (a rerun with the other reuses the trained folds);
    ``repeats``: fold assignments (seeds ``seed``, ``seed + 1``, ...); ``baseline``: also run the reference
    linear model in the same folds, with a null of ``permutations`` case-label permutations, and alone over
    ``baseline_assignments`` fold assignments; ``grid``:
    settings to try in every fold (``{"train.lr": [0.001, 0.003]}``), the point chosen on the fold's inner val
    alone."""

    folds: int = 4                 # test folds; every case is tested once, by the one fold model that never saw it
    inner_val_fraction: float = 0.2  # per class, this share of a fold's other cases picks the checkpoint
    inner_val_trains: bool = False  # the inner val's cases train too (3 more patients a fold here); it then chooses
    #                                nothing (needs train.select=last or cv.checkpoint=last, no grid), and still
    #                                watches training and gates the ensemble (one class scores chance on any cases)
    seed: int = 0
    bootstrap: int = 2000          # case resamples for the confidence intervals (of cv, mil and `predict` with classes)
    confidence: float = 0.95
    checkpoint: str = "best"       # best (train.select) | last; a rerun with the other reuses the trained folds
    repeats: int = 1               # fold assignments (seeds seed, seed+1, ...): mean +- sd across them; 3+ for a figure
    baseline: bool = True          # the reference logistic regression on colour/texture features, in the same folds
    permutations: int = 50         # case-label permutations of the baseline's null (its p-value); 0: none
    baseline_assignments: int = 30  # the baseline alone over this many fold assignments (the run's first; about 2 s
    #                                each on 300 images): how much the dealing of cases moves a figure, and how hard
    #                                the run's own assignments are within that spread; 0: none
    grid: Dict[str, List[Any]] = field(default_factory=dict)  # e.g. {train.lr: [0.001, 0.003]}: every fold trains
    #                                each combination and keeps the best on its inner val

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.permutations < 0 or self.baseline_assignments < 0:
            raise InputError(f"cv.repeats must be >= 1, cv.permutations and cv.baseline_assignments >= 0, got "
                             f"{self.repeats}, {self.permutations} and {self.baseline_assignments}")
        if self.checkpoint not in CV_CHECKPOINTS:
            raise InputError(f"cv.checkpoint is {self.checkpoint!r}; allowed: {', '.join(CV_CHECKPOINTS)}")
        if self.folds < 2:
            raise InputError(f"cv.folds must be >= 2, got {self.folds}")
        if not 0.0 < self.inner_val_fraction < 1.0:
            raise InputError(f"cv.inner_val_fraction must be in (0, 1): the checkpoint is chosen on those cases, "
                             f"never on the test fold; got {self.inner_val_fraction}")
        if not 0.5 <= self.confidence < 1.0 or self.bootstrap < 100:
            raise InputError("cv.confidence must be in [0.5, 1) and cv.bootstrap >= 100")


MIL_BAGS = ("slide", "case")


@dataclass
class MILSettings:
    """``lymphoma mil``: attention-MIL (gated attention) on the tile embeddings of ``lymphoma features``, in the
    folds of ``lymphoma cv`` (cv.folds, cv.seed, cv.repeats)."""

    features: Optional[str] = None  # the folder `lymphoma features` wrote; null: <run folder>/features
    bag: str = "slide"             # slide: one bag per slide | case: every tile of a patient in one bag
    hidden: int = 256              # width of the tile embedding inside the model
    attention: int = 128           # width of the gated attention
    dropout: float = 0.25
    epochs: int = 20
    lr: float = 2e-4
    weight_decay: float = 1e-4
    seed: int = 0
    heatmaps: bool = True          # an attention map over each test slide's thumbnail (first repeat)

    def __post_init__(self) -> None:
        if self.bag not in MIL_BAGS:
            raise InputError(f"mil.bag is {self.bag!r}; allowed: {', '.join(MIL_BAGS)}")
        if self.epochs < 1 or self.hidden < 1 or self.attention < 1 or not 0 <= self.dropout < 1:
            raise InputError("mil.epochs, mil.hidden and mil.attention must be >= 1 and mil.dropout in [0, 1)")
        require([("mil.lr", self.lr, self.lr > 0, "> 0 (e.g. 2e-4)"),
                 ("mil.weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")])


@dataclass(frozen=True)
class FitSettings:
    """What one training reads from the config: its sections, the tile size the stores must hold (None: any)
    and the whole config as plain data, recorded in every checkpoint."""

    train: TrainSettings = field(default_factory=TrainSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    stain: StainSettings = field(default_factory=StainSettings)
    tile_size: Optional[int] = None
    config: dict[str, Any] = field(default_factory=dict)
