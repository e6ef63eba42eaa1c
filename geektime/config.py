"""Composing the config: where conf/ lives, what Hydra must know first, and the rules that tie keys together.

Types, choices and ranges of single keys are declared once in `geektime.schema`; this module checks only
what the schema cannot say (both data folders or neither, folders that exist, an image size that is a size).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from geektime.errors import ConfigError
from geektime.runs import register_resolvers as run_resolvers
from geektime.schema import TrainConfig, check_ranges, register_schemas

DIGITS_IMAGE_SIZE = (32, 32)


def find_conf_dir() -> Path:
    """The `conf/` folder: beside the package in a checkout or editable install, else installed data files."""
    candidates = [
        Path(__file__).resolve().parents[1] / "conf",
        Path(sys.prefix) / "share" / "geektime" / "conf",
    ]
    for candidate in candidates:
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        "geektime's config folder was not found in any of: "
        + ", ".join(str(c) for c in candidates)
        + ". Reinstall with `pip install -e .` from the repository root."
    )


def register_resolvers() -> None:
    """What conf/*.yaml refer to before Hydra can compose them: our resolvers and the schemas."""
    run_resolvers()
    register_schemas()


def model_names() -> list[str]:
    return sorted(p.stem for p in (find_conf_dir() / "model").glob("*.yaml") if not p.stem.startswith("_"))


def choose(key: str, value: Any, choices) -> str:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")
    return value


def positive(key: str, value: Any, allow_zero: bool = False) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")
    return value


def auto_or_bool(key: str, value: Any) -> bool | None:
    """A `true | false | auto` setting: the forced choice, or None for auto."""
    setting = str(value).lower()
    if setting not in ("auto", "true", "false"):
        raise ConfigError(f"{key}={value!r} is not one of: auto, true, false")
    return None if setting == "auto" else setting == "true"


def image_size(key: str, value: Any) -> tuple[int, int]:
    """(H, W) from an int or a pair; one number means a square."""
    sizes = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value, value]
    if len(sizes) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ConfigError(f"{key}={value!r}: give one positive int or [H, W] of positive ints, e.g. {key}=[224,224]")
    return int(sizes[0]), int(sizes[1])


def workers_setting(key: str, value: Any) -> int | None:
    """`auto` (None) or a worker count >= 0."""
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key}={value!r}: give auto or a number of worker processes >= 0")
    return value


def existing_dir(key: str, value: Any) -> Path:
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"{key}={value}: no such folder (absolute: {path.resolve()}). "
            f"Point {key} at a folder with one sub-folder per class."
        )
    return path


def validate_train_config(cfg: DictConfig) -> None:
    """Fail before any work with a message for the first wrong value (types were checked by Hydra)."""
    check_ranges(cfg, TrainConfig)
    if cfg.model.name not in model_names():
        raise ConfigError(f"model.name={cfg.model.name!r} is not one of: {', '.join(model_names())}")
    auto_or_bool("data.cache", cfg.data.cache)
    auto_or_bool("trainer.channels_last", cfg.trainer.channels_last)
    workers_setting("data.num_workers", cfg.data.num_workers)
    if cfg.data.image_size is not None:
        image_size("data.image_size", cfg.data.image_size)
    image_size("model.image_size", cfg.model.image_size)
    if cfg.optimizer.nesterov and cfg.optimizer.momentum == 0:
        raise ConfigError("optimizer.nesterov=true needs optimizer.momentum > 0")
    if cfg.transforms.augment.enabled and cfg.transforms.augment.random_resized_crop:
        low, high = cfg.transforms.augment.scale
        if not 0 < low <= high <= 1:
            raise ConfigError(
                f"transforms.augment.scale={list(cfg.transforms.augment.scale)} must satisfy 0 < low <= high <= 1"
            )
    resize = cfg.trainer.progressive_resize
    if resize.enabled and str(cfg.model.family) == "efficientnet" and resize.multiple % 32:
        raise ConfigError(
            f"trainer.progressive_resize.multiple={resize.multiple}: EfficientNet needs a multiple of 32 (its "
            "static 'SAME' padding holds for sizes that stay even through its five stride-2 layers); use 32"
        )
    for key in ("train_dir", "val_dir"):
        if cfg.data[key] is not None:
            existing_dir(f"data.{key}", cfg.data[key])
    if cfg.data.valid_pct:
        if cfg.data.train_dir is None or cfg.data.val_dir is not None:
            raise ConfigError(
                f"data.valid_pct={cfg.data.valid_pct} splits data.train_dir into train and val: give "
                "data.train_dir and leave data.val_dir unset"
            )
    elif (cfg.data.train_dir is None) != (cfg.data.val_dir is None):
        raise ConfigError(
            "give both data.train_dir and data.val_dir (or neither, for the embedded digits), or "
            "data.train_dir with data.valid_pct=0.2 to hold out a share of it"
        )


def resolved_image_size(cfg: DictConfig) -> tuple[int, int]:
    if cfg.data.image_size is not None:
        return image_size("data.image_size", cfg.data.image_size)
    if cfg.data.train_dir is None:
        return DIGITS_IMAGE_SIZE
    return image_size("model.image_size", cfg.model.image_size)


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain Python types (choices as strings), safe for `torch.load(weights_only=True)`."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False, enum_to_str=True)
