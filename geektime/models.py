"""Config -> model: our EfficientNet or a torchvision ResNet, sized for the data's classes."""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
import torchvision
from torch import nn

from efficientnet_pytorch import EfficientNet
from geektime.config import ConfigError, auto_or_bool

log = logging.getLogger(__name__)


def _refused(pretrained, err: Exception) -> ConfigError:
    first_line = str(err).split("\n")[0]
    return ConfigError(f"model.pretrained={pretrained}: refused to load: it holds Python objects other than tensors "
                       "and plain types (torch.load weights_only=True), so it may run code. Use a weights file you "
                       f"trust. ({first_line})")


def _resnet_weights_file(arch: str) -> tuple[str, str]:
    """(file name, url) of torchvision's ImageNet weights for a ResNet."""
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    return weights.url.rsplit("/", 1)[-1], weights.url


def _load_resnet_weights(arch: str, pretrained) -> dict:
    if pretrained is True:
        filename, url = _resnet_weights_file(arch)
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        try:
            return torch.hub.load_state_dict_from_url(url, model_dir=str(cache), map_location="cpu",
                                                      weights_only=True, progress=False)
        except OSError as err:  # offline: URLError is an OSError
            raise ConfigError(
                f"model.pretrained=true: {filename} is not in {cache} and could not be downloaded ({err}). "
                f"Put the file there, or pass model.pretrained=path/to/{filename}.") from None
    path = Path(str(pretrained)).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.pretrained={pretrained}: no such file. Give a path to a .pth state dict, "
                          "or model.pretrained=true for the torch hub cache.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refused(pretrained, err) from None
    return state.get("model", state)  # a geektime checkpoint works too


def _build_resnet(mcfg, num_classes: int) -> nn.Module:
    model = getattr(torchvision.models, mcfg.arch)(weights=None)
    if mcfg.pretrained is not False and mcfg.pretrained is not None:
        state = _load_resnet_weights(mcfg.arch, mcfg.pretrained)
        if state.get("fc.weight") is not None and state["fc.weight"].shape[0] != num_classes:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ConfigError(f"model.pretrained={mcfg.pretrained} does not fit {mcfg.arch}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    if model.fc.out_features != num_classes:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def _build_efficientnet(mcfg, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    overrides = {"drop_connect_rate": mcfg.drop_connect_rate, "batch_norm_momentum": mcfg.bn_momentum,
                 "image_size": list(image_size)}
    if mcfg.dropout_rate is not None:
        overrides["dropout_rate"] = mcfg.dropout_rate
    pretrained = mcfg.pretrained
    if pretrained is False or pretrained is None:
        return EfficientNet.from_name(mcfg.arch, num_classes=num_classes, **overrides)
    weights_path = None if pretrained is True else str(Path(str(pretrained)).expanduser())
    try:
        return EfficientNet.from_pretrained(mcfg.arch, weights_path=weights_path, num_classes=num_classes,
                                            advprop=mcfg.normalization == "advprop", **overrides)
    except pickle.UnpicklingError as err:
        raise _refused(pretrained, err) from None
    except (FileNotFoundError, RuntimeError) as err:
        raise ConfigError(f"model.pretrained={pretrained}: {err}") from None


def build_model(mcfg, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    if mcfg.family == "efficientnet":
        return _build_efficientnet(mcfg, num_classes, image_size)
    if mcfg.family == "resnet":
        return _build_resnet(mcfg, num_classes)
    raise ConfigError(f"model.family={mcfg.family!r} is not one of: efficientnet, resnet")


def channels_last_pays(setting, family: str, image_size: tuple[int, int], device: torch.device) -> bool:
    """`trainer.channels_last` resolved: `auto` is channels-last except for a ResNet on a CPU below 96 px.

    Measured on 2 CPU cores (training steps, batch 16): EfficientNet-B0 gains 1.6x at 32 px and 1.3x
    at 224; ResNet-18 loses 0.8x at 32 and 0.9x at 64 but gains 1.1x at 112 and 1.25x at 224.
    """
    forced = auto_or_bool("trainer.channels_last", setting)
    if forced is not None:
        return forced
    return not (family == "resnet" and device.type == "cpu" and min(image_size) < 96)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP / torch.compile wrappers: what a checkpoint must hold."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
