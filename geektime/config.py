"""Where the Hydra configs live, and the checks that turn a bad value into a message naming the key."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what would."""


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


def _launch_rank() -> int:
    from geektime.distributed import launch_rank  # here: distributed imports this module

    return launch_rank()


def _run_dir(resume: Any, fresh_dir: str) -> str:
    """A resumed run continues in its own folder; any other run gets a fresh one, and so does a resume
    from a path that does not exist (a typo must not create that folder; the run then stops with the error).

    Under torchrun only rank 0 gets one: the other ranks' clocks may read another second, so they
    get "." (nothing to create) and take rank 0's folder when they join its process group.
    """
    if _launch_rank() != 0:
        return "."
    if resume in (None, "", "null"):
        return fresh_dir
    path = Path(str(resume)).expanduser()
    if not path.exists():
        return fresh_dir
    return str(path.parent if path.is_file() else path)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("geektime.run_dir"):
        OmegaConf.register_new_resolver("geektime.run_dir", _run_dir)
    if not OmegaConf.has_resolver("geektime.rank0"):
        # ${geektime.rank0:a,b}: a in a single process and on rank 0 of torchrun's processes, b on the others
        OmegaConf.register_new_resolver("geektime.rank0", lambda main, other=None: main if _launch_rank() == 0 else other)


MODEL_NAMES = sorted(p.stem for p in (find_conf_dir() / "model").glob("*.yaml"))
TRANSFORMS = ("resize", "letterbox", "center_crop")
SCHEDULERS = ("none", "step", "cosine")
BAD_IMAGE_POLICIES = ("error", "skip")
DIGITS_IMAGE_SIZE = (32, 32)


def choose(key: str, value: Any, choices: Iterable[str]) -> str:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")
    return value


def auto_or_bool(key: str, value: Any) -> bool | None:
    """A `true | false | auto` setting: the forced choice, or None for auto."""
    setting = choose(key, str(value).lower(), ("auto", "true", "false"))
    return None if setting == "auto" else setting == "true"


def image_size(key: str, value: Any) -> tuple[int, int]:
    """(H, W) from an int or a pair; one number means a square."""
    if isinstance(value, (list, tuple, ListConfig)):
        sizes = list(value)
    else:
        sizes = [value, value]
    if len(sizes) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ConfigError(f"{key}={value!r}: give one positive int or [H, W] of positive ints, e.g. {key}=[224,224]")
    return int(sizes[0]), int(sizes[1])


def positive(key: str, value: Any, allow_zero: bool = False) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")
    return value


def existing_dir(key: str, value: Any) -> Path:
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{key}={value}: no such folder (absolute: {path.resolve()}). "
                          f"Point {key} at a folder with one sub-folder per class.")
    return path


def validate_train_config(cfg: DictConfig) -> None:
    """Fail before any work with a message for the first wrong value."""
    choose("model.name", cfg.model.name, MODEL_NAMES)
    choose("model.normalization", cfg.model.normalization, ("imagenet", "advprop"))
    choose("transforms.name", cfg.transforms.name, TRANSFORMS)
    choose("scheduler.name", cfg.scheduler.name, SCHEDULERS)
    choose("data.on_bad_image", cfg.data.on_bad_image, BAD_IMAGE_POLICIES)
    auto_or_bool("data.cache", cfg.data.cache)
    auto_or_bool("trainer.channels_last", cfg.trainer.channels_last)
    if cfg.data.image_size is not None:
        image_size("data.image_size", cfg.data.image_size)
    positive("data.batch_size", cfg.data.batch_size)
    if cfg.data.num_workers != "auto":
        positive("data.num_workers", cfg.data.num_workers, allow_zero=True)
    positive("optimizer.lr", cfg.optimizer.lr)
    positive("optimizer.momentum", cfg.optimizer.momentum, allow_zero=True)
    positive("optimizer.weight_decay", cfg.optimizer.weight_decay, allow_zero=True)
    if cfg.optimizer.nesterov and cfg.optimizer.momentum == 0:
        raise ConfigError("optimizer.nesterov=true needs optimizer.momentum > 0")
    positive("trainer.epochs", cfg.trainer.epochs)
    positive("trainer.save_interval", cfg.trainer.save_interval)
    positive("trainer.log_interval", cfg.trainer.log_interval)
    if cfg.trainer.threads is not None:
        positive("trainer.threads", cfg.trainer.threads)
    if cfg.transforms.augment.enabled and cfg.transforms.augment.random_resized_crop:
        low, high = cfg.transforms.augment.scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"transforms.augment.scale={list(cfg.transforms.augment.scale)} must satisfy 0 < low <= high <= 1")
    for key in ("train_dir", "val_dir"):
        if cfg.data[key] is not None:
            existing_dir(f"data.{key}", cfg.data[key])
    if (cfg.data.train_dir is None) != (cfg.data.val_dir is None):
        raise ConfigError("give both data.train_dir and data.val_dir (or neither, for the embedded digits)")


def resolved_image_size(cfg: DictConfig) -> tuple[int, int]:
    if cfg.data.image_size is not None:
        return image_size("data.image_size", cfg.data.image_size)
    if cfg.data.train_dir is None:
        return DIGITS_IMAGE_SIZE
    return image_size("model.image_size", cfg.model.image_size)


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain Python types, safe for `torch.load(weights_only=True)`."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def cpu_count() -> int:
    """Cores this process may use (respects affinity masks and containers better than os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
