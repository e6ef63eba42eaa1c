"""Inference engines: a trained model as "uint8 NCHW images in, class probabilities out", whatever its form.

An `Engine` is what `geektime.predict` and `geektime.serve` run: an exported ONNX graph (onnxruntime), an
exported TorchScript file, or a training checkpoint run eagerly. All three take the deterministic view that
evaluation uses (`geektime.data.build_transform(train=False)`) as uint8 and apply the checkpoint's normalization
and the softmax themselves, so a caller never needs to know how the model was trained.

Eager checkpoints get their BatchNorm layers folded into the preceding convolutions (`fold_batchnorm`): in
evaluation a BatchNorm is a fixed per-channel affine map, so folding it removes one pass over every feature map
without changing the function (differences are float rounding, ~1e-7 in probabilities).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from geektime import checkpoint
from geektime.data import InputNormalizer, build_transform, decode_size
from geektime.images import load_rgb

INPUT_NAME, OUTPUT_NAME = "images", "probabilities"


class ModelFileError(ValueError):
    """A model file (or its model.json) that cannot be used; the message names the file and the fix."""


class Deployable(nn.Module):
    """uint8 NCHW images -> softmax probabilities: the normalization and the softmax travel with the model."""

    def __init__(self, model: nn.Module, normalization: str, channels_last: bool = False):
        super().__init__()
        normalizer = InputNormalizer(normalization, torch.device("cpu"), channels_last=False)
        self.model = model
        self.register_buffer("scale", normalizer.scale.clone())
        self.register_buffer("shift", normalizer.shift.clone())
        self.channels_last = channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() * self.scale - self.shift  # the same arithmetic as InputNormalizer, so equal results
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).softmax(1)


class _ConvLeafTracer(fx.Tracer):
    """Keeps every Conv2d (our Conv2dSame too) a leaf, so that conv -> BatchNorm pairs show in the graph."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.Conv2d) or super().is_leaf_module(m, qualname)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm2d that only follows a Conv2d into that conv, in place; returns the model.

    The pairs are found by tracing the forward pass (not by guessing from attribute names), so any
    architecture works; the folded BatchNorm becomes an Identity, the module tree keeps its names.
    """
    model.eval()
    graph = _ConvLeafTracer().trace(model)
    modules = dict(model.named_modules())
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0]
        if not (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and len(source.users) == 1
            and isinstance(modules[source.target], nn.Conv2d)
        ):
            continue
        conv, bn = modules[source.target], modules[node.target]
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        _set_submodule(model, source.target, fuse_conv_bn_eval(conv, bn))
        _set_submodule(model, node.target, nn.Identity())
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def model_info(ckpt: dict) -> dict:
    """What a caller must know to feed a checkpoint's model: classes, size, transform, normalization."""
    return {
        "classes": list(ckpt["classes"]),
        "image_size": list(ckpt["image_size"]),
        "transforms": ckpt["transforms"],
        "normalization": ckpt["normalization"],
        "model": ckpt.get("config", {}).get("model", {}).get("name"),
    }


def eager_model(ckpt: dict, fold: bool = True, channels_last: bool | None = None) -> Deployable:
    """The checkpoint's model in eval mode, wrapped as a Deployable; BatchNorm folded unless `fold` is False."""
    from geektime.models import (  # torchvision imports only when needed
        build_model,
        channels_last_pays,
    )

    mcfg = OmegaConf.create({**ckpt["config"]["model"], "pretrained": False})
    size = tuple(ckpt["image_size"])
    model = build_model(mcfg, len(ckpt["classes"]), size)
    model.load_state_dict(ckpt["model"])
    model.eval()
    if fold:
        fold_batchnorm(model)
    if channels_last is None:
        channels_last = channels_last_pays("auto", mcfg.family, size, torch.device("cpu"))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Deployable(model, ckpt["normalization"], channels_last).eval()


def sidecar(model_path: Path) -> Path:
    """model.onnx / model.pt -> the model.json next to it."""
    return model_path.with_suffix(".json")


class Engine:
    """One model, ready to predict: `predict(uint8 NCHW numpy) -> (N, C) float probabilities`.

    `info` holds classes, image_size, transforms and normalization; `load_image` turns an image file into the
    uint8 CHW view this model expects.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, fold: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: no such model file (give a model.onnx, model.pt or checkpoint .pth)")
        threads = threads or torch.get_num_threads()
        suffix = self.path.suffix.lower()
        if suffix in (".onnx", ".pt"):
            self.info = self._read_sidecar()
            self.backend = "onnxruntime" if suffix == ".onnx" else "torchscript"
        else:
            ckpt = checkpoint.load(self.path)
            self.info = model_info(ckpt)
            self.backend = "eager"
        if self.backend == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        else:
            torch.set_num_threads(threads)
            if self.backend == "torchscript":
                with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export; it still works
                    warnings.simplefilter("ignore", FutureWarning)
                    self._module = torch.jit.load(str(self.path), map_location="cpu").eval()
            else:
                self._module = eager_model(ckpt, fold=fold)
        self.classes: list[str] = list(self.info["classes"])
        self.image_size: tuple[int, int] = tuple(self.info["image_size"])
        self.tcfg = OmegaConf.create(self.info["transforms"])
        self.transform = build_transform(self.tcfg, self.image_size, train=False)
        self.min_size = decode_size(self.tcfg, self.image_size, train=False)

    def _read_sidecar(self) -> dict:
        meta = sidecar(self.path)
        try:
            info = json.loads(meta.read_text())
        except FileNotFoundError:
            raise ModelFileError(
                f"{meta}: missing; {self.path} needs the model.json written next to it by "
                "`python -m geektime.export` (classes, image size, transform)"
            ) from None
        except (OSError, json.JSONDecodeError) as err:
            raise ModelFileError(f"{meta}: not readable JSON ({err}); export the model again") from None
        missing = [k for k in ("classes", "image_size", "transforms", "normalization") if k not in info]
        if missing:
            raise ModelFileError(f"{meta}: lacks {', '.join(missing)}; export the model again")
        return info

    def load_image(self, source) -> np.ndarray:
        """An image file -> the uint8 CHW view (raises geektime.images.BadImageError)."""
        return self.transform(load_rgb(source, self.min_size)).numpy()

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a uint8 batch of shape (N, 3, H, W), got {images.shape}")
        if self.backend == "onnxruntime":
            return self._session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
        with torch.inference_mode():
            return self._module(torch.from_numpy(images)).numpy()

    def top_k(self, probs: np.ndarray, k: int) -> list[tuple[str, float]]:
        order = np.argsort(-probs, kind="stable")[:k]
        return [(self.classes[i], float(probs[i])) for i in order]
