"""The settings of the model, augmentation and training: plain dataclasses (no torch import), so that
configs load and validate fast, also in tasks that never train."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional

from lymphoma.errors import InputError

PRESETS = {
    "densenet-reduced": {"growth_rate": 32, "block_config": [2, 2, 2, 2], "num_init_features": 64, "bn_size": 4},
    "densenet121": {"growth_rate": 32, "block_config": [6, 12, 24, 16], "num_init_features": 64, "bn_size": 4},
}


@dataclass
class ModelSettings:
    """A DenseNet: a preset, or ``custom`` with every field given."""

    preset: str = "densenet-reduced"
    growth_rate: int = 32
    block_config: List[int] = field(default_factory=lambda: [2, 2, 2, 2])
    num_init_features: int = 64
    bn_size: int = 4
    drop_rate: float = 0.2

    def resolved(self) -> "ModelSettings":
        """The settings with the preset's architecture filled in."""
        if self.preset == "custom":
            return self
        if self.preset not in PRESETS:
            raise InputError(f"model.preset is {self.preset!r}; allowed: {', '.join(PRESETS)}, custom")
        return replace(self, **PRESETS[self.preset])

    def architecture(self, num_classes: int) -> dict[str, object]:
        arch = asdict(self.resolved())
        arch["block_config"] = list(arch["block_config"])
        arch["num_classes"] = num_classes
        return arch


BACKENDS = ("auto", "dali", "torch")


@dataclass
class AugmentSettings:
    """Ranges follow the tutorial: hue is a fraction of the hue circle (0.5 = anywhere), rotation in degrees.

    ``rotate90`` adds a lossless rotation by a random multiple of 90 degrees (no filled corners).
    ``hed_scale`` / ``hed_shift``: HED stain jitter (Tellez et al. 2019), each stain's optical density scaled
    by U(1 - hed_scale, 1 + hed_scale) and shifted by U(-hed_shift, hed_shift) (scikit-image HED units)."""

    backend: str = "auto"
    crop: int = 112
    hflip: float = 0.5
    vflip: float = 0.5
    rotate: float = 180.0
    rotate90: bool = True
    hue: float = 0.0
    saturation: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    grayscale_p: float = 0.1
    hed_scale: float = 0.05
    hed_shift: float = 0.05
    mean: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
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

    @property
    def hed_jitter(self) -> bool:
        """Whether training jitters the stains (either HED range above zero)."""
        return self.hed_scale > 0 or self.hed_shift > 0


OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "step")
SELECTIONS = ("balanced_accuracy", "loss", "last")
SAMPLINGS = ("tiles", "cases")


@dataclass
class TrainSettings:
    """``select``: what picks best.pt and stops early: ``balanced_accuracy`` on the eval phase (a model that
    predicts one class scores 1/classes, so it cannot win; val loss breaks ties), ``loss``, or ``last`` (a
    fixed schedule: the last epoch, no early stopping); only epochs from ``min_epochs`` on are candidates (the last
    epoch of a shorter run).
    ``ema``: decay of an exponential moving average of the weights (and batch-norm statistics), updated every
    step; evaluated and saved instead of the raw weights. ``sampling``: ``tiles`` draws every tile once per
    epoch; ``cases`` draws ``samples_per_epoch`` tiles with replacement, every class equally often and, within
    a class, every case equally often (patients with many images do not dominate; class weights are then 1)."""

    epochs: int = 12
    batch_size: int = 32
    eval_batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    scheduler: str = "cosine"
    warmup_epochs: int = 1
    step_size: int = 10
    gamma: float = 0.1
    num_workers: Optional[int] = None
    amp: bool = False
    channels_last: bool = True
    seed: int = 0
    deterministic: bool = False
    max_steps_per_epoch: Optional[int] = None
    class_weighted: bool = True
    label_smoothing: float = 0.1
    patience: Optional[int] = None
    select: str = "last"
    min_epochs: int = 4
    ema: Optional[float] = 0.99
    sampling: str = "cases"
    samples_per_epoch: Optional[int] = 2048
    clip_grad_norm: Optional[float] = None
    eval_phase: str = "val"

    @property
    def first_candidate(self) -> int:
        """The first epoch (1-based) that may be kept: min_epochs, or the last epoch of a shorter run."""
        return min(self.min_epochs, self.epochs)

    @property
    def warmup(self) -> int:
        """Warm-up epochs, leaving at least one epoch after them."""
        return min(self.warmup_epochs, self.epochs - 1)

    def __post_init__(self) -> None:
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
        if self.min_epochs < 1 or self.warmup_epochs < 0:
            raise InputError(f"train.min_epochs must be >= 1 and train.warmup_epochs >= 0, got {self.min_epochs} and "
                             f"{self.warmup_epochs}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise InputError(f"train.ema must be in (0, 1) (e.g. 0.99) or null (no weight averaging), got {self.ema}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise InputError(f"train.samples_per_epoch must be >= 1 or null, got {self.samples_per_epoch}")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise InputError(f"train.clip_grad_norm must be > 0 or null, got {self.clip_grad_norm}")


AGGREGATES = ("vote", "mean")


@dataclass
class PredictSettings:
    """batch_size: tiles per forward pass; slides_per_task: slides per array task; prefetch: slides decoded
    and tiled ahead of the model; heatmaps: a PNG of tile classes per slide; tta: average each tile's
    probabilities over its 8 flips and right-angle rotations; aggregate: an image's (and case's) class by
    majority ``vote`` of its tiles or by ``mean`` tile probability."""

    batch_size: int = 32
    slides_per_task: int = 64
    prefetch: int = 4
    heatmaps: bool = True
    tta: bool = False
    aggregate: str = "vote"

    def __post_init__(self) -> None:
        if min(self.batch_size, self.slides_per_task, self.prefetch) < 1:
            raise InputError("predict.batch_size, predict.slides_per_task and predict.prefetch must be >= 1")
        if self.aggregate not in AGGREGATES:
            raise InputError(f"predict.aggregate is {self.aggregate!r}; allowed: {', '.join(AGGREGATES)}")


CV_CHECKPOINTS = ("best", "last")


@dataclass
class CVSettings:
    """Cross-validation grouped by case and stratified by class: ``folds`` test folds; inside each, a share
    ``inner_val_fraction`` of the other cases (per class) picks the checkpoint and stops early; intervals
    from ``bootstrap`` resamples of the cases at ``confidence``; ``checkpoint``: each fold predicts with its
    ``best`` (kept by train.select) or its ``last`` epoch (a rerun with the other reuses the trained folds);
    ``repeats``: fold assignments (seeds ``seed``, ``seed + 1``, ...); ``baseline``: also run the reference
    linear model in the same folds, with a null of ``permutations`` case-label permutations; ``grid``:
    settings to try in every fold (``{"train.lr": [0.001, 0.003]}``), the point chosen on the fold's inner val
    alone."""

    folds: int = 4
    inner_val_fraction: float = 0.2
    seed: int = 0
    bootstrap: int = 2000
    confidence: float = 0.95
    checkpoint: str = "best"
    repeats: int = 1
    baseline: bool = True
    permutations: int = 50
    grid: Dict[str, List[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.permutations < 0:
            raise InputError(f"cv.repeats must be >= 1 and cv.permutations >= 0, got {self.repeats} and "
                             f"{self.permutations}")
        if self.checkpoint not in CV_CHECKPOINTS:
            raise InputError(f"cv.checkpoint is {self.checkpoint!r}; allowed: {', '.join(CV_CHECKPOINTS)}")
        if self.folds < 2:
            raise InputError(f"cv.folds must be >= 2, got {self.folds}")
        if not 0.0 < self.inner_val_fraction < 1.0:
            raise InputError(f"cv.inner_val_fraction must be in (0, 1): the checkpoint is chosen on those cases, "
                             f"never on the test fold; got {self.inner_val_fraction}")
        if not 0.5 <= self.confidence < 1.0 or self.bootstrap < 100:
            raise InputError("cv.confidence must be in [0.5, 1) and cv.bootstrap >= 100")
