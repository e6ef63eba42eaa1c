"""EfficientNet B0-B7 (and AdvProp B8) and EfficientNet-Lite0-4, state-dict compatible with
lukemelas/EfficientNet-PyTorch (and its Lite fork)."""

from .model import EfficientNet, MBConvBlock
from .utils import (
    VALID_MODELS,
    WEIGHT_PACKAGES,
    BlockArgs,
    GlobalParams,
    get_model_params,
    packaged_weights,
    round_filters,
    round_repeats,
    weights_file_name,
)

__version__ = "0.7.1+geektime"
__all__ = [
    "EfficientNet",
    "MBConvBlock",
    "BlockArgs",
    "GlobalParams",
    "VALID_MODELS",
    "WEIGHT_PACKAGES",
    "get_model_params",
    "packaged_weights",
    "round_filters",
    "round_repeats",
    "weights_file_name",
]
