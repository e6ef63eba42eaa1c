"""Tests for the top-level ``efficientnet_pytorch`` package (our EfficientNet).

The equivalence tests install the published ``efficientnet_pytorch==0.7.1`` into a
temporary directory and run it in a subprocess (the names clash), then load its
random state dict into ours with ``strict=True`` and compare outputs.
"""
import doctest
import json
import os
import subprocess
import sys
import textwrap
import urllib.error

import pytest
import torch

import efficientnet_pytorch
from efficientnet_pytorch import EfficientNet, VALID_MODELS
from efficientnet_pytorch import model as model_module
from efficientnet_pytorch import utils as utils_module
from efficientnet_pytorch.utils import Conv2dSame, get_model_params

B0_TO_B7 = [f"efficientnet-b{i}" for i in range(8)]

# Facts from the published implementation (1000 classes).
SCALING = {  # width, depth, resolution, dropout
    "efficientnet-b0": (1.0, 1.0, 224, 0.2), "efficientnet-b1": (1.0, 1.1, 240, 0.2),
    "efficientnet-b2": (1.1, 1.2, 260, 0.3), "efficientnet-b3": (1.2, 1.4, 300, 0.3),
    "efficientnet-b4": (1.4, 1.8, 380, 0.4), "efficientnet-b5": (1.6, 2.2, 456, 0.4),
    "efficientnet-b6": (1.8, 2.6, 528, 0.5), "efficientnet-b7": (2.0, 3.1, 600, 0.5),
}
PARAM_COUNTS = {
    "efficientnet-b0": 5_288_548, "efficientnet-b1": 7_794_184, "efficientnet-b2": 9_109_994,
    "efficientnet-b3": 12_233_232, "efficientnet-b4": 19_341_616, "efficientnet-b5": 30_389_784,
    "efficientnet-b6": 43_040_704, "efficientnet-b7": 66_347_960,
}
STATE_DICT_ENTRIES = {
    "efficientnet-b0": 360, "efficientnet-b1": 508, "efficientnet-b2": 508, "efficientnet-b3": 574,
    "efficientnet-b4": 706, "efficientnet-b5": 854, "efficientnet-b6": 986, "efficientnet-b7": 1200,
}

# Equivalence cases: static padding at the input size (even sizes: asymmetric pads),
# dynamic padding on an odd size, and static padding for 240 fed a smaller image.
EQUIV_CASES = {
    "b0-static96": dict(name="efficientnet-b0", overrides=dict(image_size=96, num_classes=17), size=96),
    "b3-dynamic75": dict(name="efficientnet-b3", overrides=dict(image_size=None), size=75),
    "b1-static240-on64": dict(name="efficientnet-b1", overrides=dict(num_classes=10), size=64),
    "b0-train": dict(name="efficientnet-b0", overrides=dict(image_size=64, num_classes=7,
                     dropout_rate=0.0, drop_connect_rate=0.0), size=64, train=True),
}
GRAD_KEYS = ["_conv_stem.weight", "_blocks.3._depthwise_conv.weight", "_blocks.5._se_reduce.bias",
             "_bn1.weight", "_fc.weight"]

_REFERENCE_CHILD = textwrap.dedent("""
    import json, sys
    target, cases, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    sys.path.insert(0, target)
    import torch
    torch.set_num_threads(1)
    import efficientnet_pytorch
    assert efficientnet_pytorch.__file__.startswith(target), efficientnet_pytorch.__file__
    from efficientnet_pytorch import EfficientNet
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
            r.update(y_train=y.detach(), grads={k: params[k].grad for k in %r})
        results[key] = r
    torch.save(results, out)
""" % (GRAD_KEYS,))


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small inputs gain nothing from more threads, and one thread cannot stall at a
    parallel barrier when other processes compete for the cores (seen: 50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def published_dir(tmp_path_factory):
    """The published efficientnet_pytorch 0.7.1, pip-installed into a temp dir (not importable here)."""
    target = str(tmp_path_factory.mktemp("published_efficientnet"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
         "--target", target, "efficientnet_pytorch==0.7.1"],
        capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip("cannot pip install efficientnet_pytorch==0.7.1 (no network/registry?): "
                    + proc.stderr.strip()[-500:])
    return target


@pytest.fixture(scope="session")
def reference(published_dir, tmp_path_factory):
    """Random state dicts and outputs of the published implementation, made in a subprocess."""
    out = str(tmp_path_factory.mktemp("reference") / "reference.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", _REFERENCE_CHILD, published_dir, json.dumps(EQUIV_CASES), out],
                   check=True, env=env, cwd=published_dir, timeout=600)
    return torch.load(out, map_location="cpu", weights_only=True)


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


def test_state_dict_key_names():
    keys = set(EfficientNet.from_name("efficientnet-b0").state_dict())
    expected = ["_conv_stem.weight", "_bn0.weight", "_bn0.bias", "_bn0.running_mean",
                "_bn0.running_var", "_bn0.num_batches_tracked", "_blocks.0._depthwise_conv.weight",
                "_blocks.0._bn1.weight", "_blocks.0._se_reduce.weight", "_blocks.0._se_reduce.bias",
                "_blocks.0._se_expand.weight", "_blocks.0._se_expand.bias",
                "_blocks.0._project_conv.weight", "_blocks.0._bn2.running_var",
                "_blocks.1._expand_conv.weight", "_blocks.1._bn0.weight", "_blocks.15._bn2.bias",
                "_conv_head.weight", "_bn1.running_mean", "_fc.weight", "_fc.bias"]
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
    model = EfficientNet.from_name("efficientnet-b0", num_classes=3, dropout_rate=0.1,
                                   drop_connect_rate=0.3, image_size=128)
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
                torch.nn.functional.pad(x, [pad // 2, pad - pad // 2] * 2), static.weight, None, s, 0, 1, 4)
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
        (16, 32, 32), (24, 16, 16), (40, 8, 8), (112, 4, 4), (320, 2, 2), (1280, 2, 2)]


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


@pytest.mark.skipif(os.environ.get("EFFICIENTNET_TEST_INDUCTOR") != "1",
                    reason="default torch.compile (inductor C++ codegen) of b0 takes 60-85 s on 2 CPU cores; "
                           "set EFFICIENTNET_TEST_INDUCTOR=1 to run")
def test_torch_compile_b0_default_inductor(b0_small):
    model, x = b0_small
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)
