"""The config's schema: every user-facing key with its type, default and range, declared once.

The dataclasses are registered in Hydra's ConfigStore and head `conf/train.yaml` and `conf/evaluate.yaml`,
so Hydra itself refuses a wrong type or an unknown choice with the key named (`trainer.epochs=1.5`,
`data.on_bad_image=maybe`) before any work. Ranges ride along as field metadata (`min`, `max`) and
`check_ranges` walks them; only rules that tie several keys together are written by hand (config.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, Optional, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from geektime.errors import ConfigError


class Choice(str, Enum):
    """A closed set of strings that compares, prints and serializes as the plain string."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Family(Choice):
    efficientnet = "efficientnet"
    resnet = "resnet"


class Normalization(Choice):
    imagenet = "imagenet"
    advprop = "advprop"
    tflite = "tflite"


class Transform(Choice):
    resize = "resize"
    letterbox = "letterbox"
    center_crop = "center_crop"


class Scheduler(Choice):
    none = "none"
    step = "step"
    cosine = "cosine"
    onecycle = "onecycle"


class Optimizer(Choice):
    sgd = "sgd"
    adamw = "adamw"


class BadImagePolicy(Choice):
    error = "error"
    skip = "skip"


class SelectMetric(Choice):
    precision = "precision"
    recall = "recall"
    f1 = "f1"
    accuracy = "accuracy"


class FinetuneMode(Choice):
    none = "none"
    staged = "staged"


def _range(default: Any, low: float | None = None, high: float | None = None, exclusive_low: bool = False):
    return field(default=default, metadata={"min": low, "max": high, "exclusive_min": exclusive_low})


@dataclass
class ModelConfig:
    name: str = "efficientnet_b0"
    family: Family = Family.efficientnet
    arch: str = "efficientnet-b0"
    image_size: list[int] = field(default_factory=lambda: [224, 224])
    normalization: Normalization = Normalization.imagenet
    pretrained: Any = False  # false | true (find the published weights) | path/to/weights.pth
    dropout_rate: Optional[float] = _range(None, 0.0, 1.0)
    drop_connect_rate: Optional[float] = _range(None, 0.0, 1.0)
    bn_momentum: Optional[float] = _range(None, 0.0, 1.0)


@dataclass
class SplitConfig:
    """What training and evaluation share about reading a split."""

    val_dir: Optional[str] = None
    test_dir: Optional[str] = None
    image_size: Any = None  # one int or [H, W]; checked by config.image_size
    num_workers: Any = "auto"  # auto | an int >= 0
    cache: str = "auto"  # auto | true | false
    cache_max_gb: float = _range(4.0, 0.0)
    on_bad_image: BadImagePolicy = BadImagePolicy.error
    disk_cache: bool = True  # decoded views kept in cache_dir, reused by every later process (geektime.cache)
    cache_dir: Optional[str] = None  # null: $GEEKTIME_CACHE, else ~/.cache/geektime/views
    cache_dir_max_gb: float = _range(20.0, 0.0)


@dataclass
class DataConfig(SplitConfig):
    train_dir: Optional[str] = None
    valid_pct: float = _range(0.0, 0.0, 0.9)  # > 0: hold out this share of train_dir (per class) as val
    batch_size: int = _range(16, 1)


@dataclass
class AugmentConfig:
    enabled: bool = False
    hflip: bool = True
    random_resized_crop: bool = True
    scale: list[float] = field(default_factory=lambda: [0.35, 1.0])
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])


@dataclass
class TransformsConfig:
    name: Transform = Transform.resize
    fill: list[int] = field(default_factory=lambda: [124, 116, 104])
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimizerConfig:
    name: Optimizer = Optimizer.sgd
    lr: float = _range(0.01, 0.0, exclusive_low=True)
    momentum: float = _range(0.9, 0.0, 1.0)
    weight_decay: float = _range(1e-4, 0.0)
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = _range(1e-5, 0.0, exclusive_low=True)


@dataclass
class SchedulerConfig:
    name: Scheduler = Scheduler.cosine
    warmup_epochs: int = _range(0, 0)
    warmup_start_factor: float = _range(0.1, 0.0, 1.0)
    min_lr: float = _range(0.0, 0.0)
    step_size: int = _range(30, 1)
    gamma: float = _range(0.1, 0.0, exclusive_low=True)
    pct_start: float = _range(0.25, 0.0, 1.0)
    div: float = _range(25.0, 0.0, exclusive_low=True)
    div_final: float = _range(1e5, 0.0, exclusive_low=True)
    moms: list[float] = field(default_factory=lambda: [0.95, 0.85, 0.95])


@dataclass
class FinetuneConfig:
    name: FinetuneMode = FinetuneMode.none
    freeze_epochs: int = _range(1, 0)
    lr_mult: float = _range(100.0, 1.0)
    freeze_bn: bool = True
    unfrozen_lr_factor: float = _range(0.5, 0.0, exclusive_low=True)
    frozen_pct_start: float = _range(0.99, 0.0, 1.0)
    cache_features: bool = True


class Suggestion(Choice):
    valley = "valley"
    slide = "slide"
    minimum = "minimum"
    steep = "steep"


class Phase(Choice):
    frozen = "frozen"
    unfrozen = "unfrozen"


@dataclass
class LrFindConfig:
    start_lr: float = _range(1e-7, 0.0, exclusive_low=True)
    end_lr: float = _range(10.0, 0.0, exclusive_low=True)
    num_it: int = _range(100, 1)
    stop_factor: float = _range(4.0, 1.0, exclusive_low=True)
    suggestion: Suggestion = Suggestion.valley
    phase: Phase = Phase.frozen


@dataclass
class ProgressiveResizeConfig:
    """Train early epochs on smaller inputs (the batch resized on the device), full size at the end."""

    enabled: bool = False
    start_scale: float = _range(0.5, 0.0, 1.0, exclusive_low=True)  # first epoch's share of data.image_size
    full_size_epochs: int = _range(1, 1)  # the last epochs, at data.image_size
    multiple: int = _range(32, 1)  # sizes rounded to this (32: every EfficientNet/ResNet stride stays even)


@dataclass
class TrainerConfig:
    epochs: int = _range(10, 1)
    device: str = "auto"
    amp: bool = False
    channels_last: str = "auto"  # auto | true | false
    compile: bool = False
    sync_bn: bool = False
    save_interval: int = _range(1, 1)
    seed: int = _range(42, 0)
    threads: Optional[int] = _range(None, 1)
    log_interval: int = _range(10, 1)
    resume: Optional[str] = None
    overwrite: bool = False
    progressive_resize: ProgressiveResizeConfig = field(default_factory=ProgressiveResizeConfig)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    transforms: TransformsConfig = field(default_factory=TransformsConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sweep_metric: str = "val_acc"
    lr_find: LrFindConfig = field(default_factory=LrFindConfig)  # used by geektime.lr_find only


@dataclass
class EvalDataConfig(SplitConfig):
    batch_size: int = _range(32, 1)


@dataclass
class EvalTransformsConfig:
    name: Optional[Transform] = None


@dataclass
class SelectConfig:
    metric: SelectMetric = SelectMetric.accuracy
    positive: Optional[str] = None
    min_precision: Optional[float] = _range(None, 0.0, 1.0)
    min_recall: Optional[float] = _range(None, 0.0, 1.0)


@dataclass
class ThresholdConfig:
    target_recall: Optional[float] = _range(None, 0.0, 1.0, exclusive_low=True)
    target_precision: Optional[float] = _range(None, 0.0, 1.0, exclusive_low=True)


@dataclass
class EvalTrainerConfig:
    device: str = "auto"
    threads: Optional[int] = _range(None, 1)


@dataclass
class EvaluateConfig:
    checkpoint: Optional[str] = None
    predictions: Optional[str] = None
    out_dir: Optional[str] = None
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    transforms: EvalTransformsConfig = field(default_factory=EvalTransformsConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    trainer: EvalTrainerConfig = field(default_factory=EvalTrainerConfig)


def register_schemas() -> None:
    """Make `train_schema` and `evaluate_schema` available to the defaults lists of conf/*.yaml."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="evaluate_schema", node=EvaluateConfig)


def check_ranges(cfg: DictConfig, schema: type, prefix: str = "") -> None:
    """Every number in `cfg` within its field's declared range, or a ConfigError naming the key."""
    types = get_type_hints(schema)
    for spec in fields(schema):
        key, value = f"{prefix}{spec.name}", cfg.get(spec.name)
        if is_dataclass(types[spec.name]):
            if isinstance(value, DictConfig):
                check_ranges(value, types[spec.name], f"{key}.")
            continue
        low, high = spec.metadata.get("min"), spec.metadata.get("max")
        if value is None or (low is None and high is None):
            continue
        exclusive = spec.metadata.get("exclusive_min")
        if (low is not None and (value <= low if exclusive else value < low)) or (high is not None and value > high):
            bounds = []
            if low is not None:
                bounds.append(f"{'>' if exclusive else '>='} {low:g}")
            if high is not None:
                bounds.append(f"<= {high:g}")
            raise ConfigError(f"{key}={value!r} must be {' and '.join(bounds)}")
