"""Training configuration: YAML files → typed, validated dataclasses.

Experiments are files (`training/configs/*.yaml`), as in the SIIM winner's pipeline, and are read into one
typed object: a misspelt key is an error that names its path (`segmenter.optim.lrr`), never a silently
ignored setting.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.augment import AugmentConfig


@dataclass(frozen=True)
class InputConfig:
    size: int = 256
    mean: float = 0.5
    std: float = 0.25
    channels: int = 1


@dataclass(frozen=True)
class NetworkConfig:
    encoder: str = "resnet"  # resnet (torchvision's ResNet-18/34/50) | seresnext (timm's SE-ResNeXt-50 32x4d)
    encoder_depth: int = 18
    width: int = 16
    scse: bool = False
    aux_segmentation: bool = False
    decoder_blocks: int = 5  # segmenter: 3 stops the decoder at 1/4 resolution (CPU budget), 5 = full
    # A local pretrained file (torchvision or timm layout, .pth or .safetensors; see
    # service.models.networks.weights); never downloaded. A named file that is missing stops the run.
    encoder_weights: str | None = None
    # Segmenter: start from the trained classifier's encoder, which already responds to lesions (a shared
    # encoder, as in the two-stage literature); needs the same depth, width and channels.
    encoder_from_classifier: bool = False


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | onecycle | constant
    epochs: int = 10
    batch_size: int = 16
    accumulate: int = 1
    minutes: float | None = None  # wall-clock budget: training stops at the end of the epoch that passes it
    early_stopping: int = 4  # epochs without improvement of the validation metric
    average_top_k: int = 3  # average the weights of the best k checkpoints (SWA of the best epochs)
    amp: bool = True  # on CUDA only
    workers: int = 0
    # Staged training: the encoder frozen (weights and BatchNorm statistics) for the first epochs, so that
    # randomly initialised heads do not wreck pretrained or earlier-stage features with large gradients.
    freeze_encoder_epochs: int = 0
    clip_grad_norm: float | None = None  # max global gradient norm (after AMP unscaling); None: no clipping
    deterministic: bool = False  # CUDA: deterministic kernels (slower); False lets cuDNN pick the fastest

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "onecycle", "constant"):
            raise ValueError(f"optim.schedule must be cosine, onecycle or constant, got {self.schedule!r}")
        for name in ("epochs", "batch_size", "accumulate", "average_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"optim.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.freeze_encoder_epochs < 0:
            raise ValueError(f"optim.freeze_encoder_epochs must be >= 0, got {self.freeze_encoder_epochs}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"optim.clip_grad_norm must be positive or null, got {self.clip_grad_norm}")


@dataclass(frozen=True)
class LossConfig:
    kind: str = "bce"  # classifier: bce | focal | bce+fbeta
    weights: tuple[float, float, float] = (3.0, 1.0, 4.0)  # segmenter: BCE, Dice, focal (the SIIM winner's)
    aux_weight: float = 1.0  # classifier: weight of the auxiliary segmentation loss


@dataclass(frozen=True)
class SamplingConfig:
    """Share of positive images per epoch: fixed, or annealed linearly from `start` to `end` over training.

    The segmenter of a two-stage cascade only ever sees gated (likely positive) images, so it trains mostly
    on positives ("one case"); annealing towards the natural rate teaches it to return empty masks too.
    None keeps the data set's natural rate.
    """

    positive_rate_start: float | None = None
    positive_rate_end: float | None = None


@dataclass(frozen=True)
class ModelConfig:
    input: InputConfig = field(default_factory=InputConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Staged training: start from this model of a previous run (its folder or its cascade.pt), e.g. the
    # 1024 px stage from the 512 px run, or a low-learning-rate final stage from the 1024 px run. Applied
    # after `encoder_weights` and `encoder_from_classifier`, so it wins; the architecture must match.
    init_from: str | None = None


@dataclass(frozen=True)
class DataConfig:
    folder: str = "data/train"
    cache: str = ".cache/ptx"
    folds: int = 5
    fold: int = 0
    # Share of the films (whole patients, stratified, seeded by `seed`) set aside *before* the folds are made
    # and never used for any choice: no training, no early stopping, no threshold. `cv` evaluates the final
    # ensemble on them; every stage of a recipe must hold out the same films (same seed and share).
    holdout: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout < 0.5:
            raise ValueError(f"data.holdout must be a share in [0, 0.5), got {self.holdout!r}")
        if self.folds < 2 or not 0 <= self.fold < self.folds:
            raise ValueError(f"data.fold must be one of the data.folds >= 2 folds, got fold {self.fold} of "
                             f"{self.folds}")


@dataclass(frozen=True)
class EvaluationConfig:
    target_sensitivity: float = 0.95
    tta_hflip: bool = True
    triplet_tops: tuple[float, ...] = (0.5, 0.6, 0.7, 0.75, 0.8, 0.9)
    triplet_areas: tuple[int, ...] = (0, 250, 500, 1000, 2000, 3000)  # pixels at 1024², scaled to the mask size
    triplet_bottoms: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5)


@dataclass(frozen=True)
class DemoConfig:
    """What `python -m training demo` generates: a training set and a separately seeded evaluation set."""

    train_images: int = 3000
    train_prevalence: float = 0.5  # enriched: the classifier sees enough lesions; the test set keeps 0.22
    eval_images: int = 600
    eval_prevalence: float = 0.22
    eval_seed: int = 9001
    image_size: int = 1024
    cache_size: int = 256


@dataclass(frozen=True)
class TrainConfig:
    name: str = "demo"
    version: str = "0.1.0"
    seed: int = 1
    intended_use: str = "demo: trained on synthetic radiographs, not for clinical use"
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ModelConfig = field(default_factory=ModelConfig)
    segmenter: ModelConfig = field(default_factory=ModelConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


def _build(cls: type, values: Any, path: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, recursively, refusing unknown keys."""
    if not isinstance(values, dict):
        # ValueError, not TypeError: every config mistake reaches the user as one line (see __main__).
        raise ValueError(f"{path or 'config'} must be a mapping, got {type(values).__name__}")  # noqa: TRY004
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        named = ", ".join(f"{path}.{k}".lstrip(".") for k in unknown)
        raise ValueError(f"unknown key(s) {named}; known: {', '.join(sorted(known))}")
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{path}.{key}")
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path or 'config'}: {exc}") from exc


def load(path: Path | str) -> TrainConfig:
    """Read and validate a YAML training config."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} not found")
    return from_dict(yaml.safe_load(path.read_text()) or {})


def from_dict(values: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, values, "")


def named_files(config: TrainConfig) -> dict[str, str]:
    """Every file the config names (`classifier.network.encoder_weights`, `segmenter.init_from`, ...) by key."""
    files = {}
    for section in ("classifier", "segmenter"):
        model: ModelConfig = getattr(config, section)
        if model.network.encoder_weights:
            files[f"{section}.network.encoder_weights"] = model.network.encoder_weights
        if model.init_from:
            files[f"{section}.init_from"] = model.init_from
    return files


def check_files(config: TrainConfig) -> None:
    """Refuse, before any data is cached or trained on, a config naming a file that is not there.

    Why up front: a missing weights file found after an hour of caching, or worse silently replaced by a
    random initialisation, costs a GPU day and is easy to miss in the final numbers.
    """
    missing = [f"{key}: {path}" for key, path in named_files(config).items() if not Path(path).exists()]
    if missing:
        raise ValueError(f"file(s) named in the config not found: {'; '.join(missing)}")


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain data for manifests and checkpoints (tuples as lists, as YAML/JSON write them)."""
    return dataclasses.asdict(config)
