"""geektime.export end to end: ONNX and TorchScript files that agree with eager PyTorch, and refusals."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from conftest import REPO, make_folders, train_tiny
from efficientnet_pytorch import EfficientNet
from geektime.data import InputNormalizer, build_transform, decode_all, decode_size
from geektime.export import export
from geektime.images import list_images
from geektime.inference import fold_batchnorm
from geektime.models import build_model

MODELS = ["resnet18", "efficientnet_b0", "efficientnet_lite0"]


def _has_model(name: str) -> bool:
    return (REPO / "conf" / "model" / f"{name}.yaml").is_file()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("export") / "data")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """One 1-epoch run per model at 32x32 (lazily: only the models a test asks for)."""
    made = {}

    def run(name: str):
        if not _has_model(name):
            pytest.skip(f"conf/model/{name}.yaml does not exist in this tree")
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            train_tiny(folder, *data, "trainer.epochs=1", f"model={name}")
            made[name] = folder / "last.pth"
        return made[name]

    return run


def export_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "geektime.export", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"export {args} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def eager_probs(ckpt_path, images: torch.Tensor) -> np.ndarray:
    """The reference, written as evaluate does it: build_model + InputNormalizer + softmax, no export code."""
    ckpt = torch.load(ckpt_path, weights_only=True)
    model = build_model(
        OmegaConf.create({**ckpt["config"]["model"], "pretrained": False}),
        len(ckpt["classes"]),
        tuple(ckpt["image_size"]),
    )
    model.load_state_dict(ckpt["model"])
    model.eval()
    with torch.inference_mode():
        return model(InputNormalizer(ckpt["normalization"], torch.device("cpu"), False)(images)).softmax(1).numpy()


def views(ckpt_path, folder) -> torch.Tensor:
    ckpt = torch.load(ckpt_path, weights_only=True)
    tcfg, size = OmegaConf.create(ckpt["transforms"]), tuple(ckpt["image_size"])
    images, bad = decode_all(
        [str(p) for p in list_images(folder)],
        build_transform(tcfg, size, False),
        decode_size(tcfg, size, False),
        size,
        workers=1,
        progress=False,
    )
    assert not bad
    return images


def run_exported(path, images: np.ndarray) -> np.ndarray:
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].type == "tensor(uint8)"
        return session.run(None, {session.get_inputs()[0].name: images})[0]
    module = torch.jit.load(str(path))
    with torch.inference_mode():
        return module(torch.from_numpy(images)).numpy()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", MODELS)
def test_export_matches_eager_at_batch_1_and_5(runs, data, tmp_path, name, fmt):
    ckpt_path = runs(name)
    out = tmp_path / "out"
    if name == "resnet18" and fmt == "onnx":  # the command line once; in process otherwise (no import cost)
        export_cli(str(ckpt_path), "--format", fmt, "--out", str(out))
    else:
        export(ckpt_path, fmt, out)
    model_file = out / ("model.onnx" if fmt == "onnx" else "model.pt")
    meta = json.loads((out / "model.json").read_text())
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert meta["classes"] == ckpt["classes"] and meta["image_size"] == list(ckpt["image_size"])
    assert meta["transforms"] == ckpt["transforms"] and meta["normalization"] == ckpt["normalization"]
    assert meta["source"]["sha256"] == hashlib.sha256(ckpt_path.read_bytes()).hexdigest()
    assert meta["versions"]["torch"] == torch.__version__
    assert 0 <= meta["check"]["max_abs_diff"] <= 1e-4
    assert str(data[1]) in meta["check"]["images"]  # the checkpoint's own val folder, not random pixels
    assert sorted(p.name for p in out.iterdir()) == sorted(["model.json", model_file.name])

    images = views(ckpt_path, data[1])
    for batch in (images[:1], images[1:6]):
        expected = eager_probs(ckpt_path, batch)
        got = run_exported(model_file, batch.numpy())
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got.sum(1), 1, atol=1e-5)


@pytest.mark.slow
def test_export_over_tolerance_fails_and_writes_nothing(runs, tmp_path):
    out = tmp_path / "out"
    proc = export_cli(str(runs("resnet18")), "--out", str(out), "--tolerance", "1e-15", check=False)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "disagrees with eager PyTorch" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_export_of_a_missing_or_foreign_file_is_a_usage_error(tmp_path):
    proc = export_cli(str(tmp_path / "nope.pth"), check=False)
    assert proc.returncode == 2 and "no such checkpoint file" in proc.stderr
    foreign = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, foreign)
    proc = export_cli(str(foreign), check=False)
    assert proc.returncode == 2 and "not a geektime checkpoint" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "efficientnet-b0"])
def test_fold_batchnorm_keeps_the_function(name):
    torch.manual_seed(0)
    if name == "resnet18":
        model = torchvision.models.resnet18(num_classes=3)
    else:
        model = EfficientNet.from_name(name, num_classes=3, image_size=[64, 64])
    for module in model.modules():  # non-trivial statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
    batchnorms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    fold_batchnorm(model)
    assert batchnorms > 0 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)
