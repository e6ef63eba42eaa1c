"""EfficientNet B0-B7 (and AdvProp B8), state-dict compatible with lukemelas/EfficientNet-PyTorch."""
from .model import EfficientNet, MBConvBlock
from .utils import (BlockArgs, GlobalParams, VALID_MODELS, get_model_params, round_filters,
                    round_repeats, weights_file_name)

__version__ = "0.7.1+geektime"
__all__ = ["EfficientNet", "MBConvBlock", "BlockArgs", "GlobalParams", "VALID_MODELS",
           "get_model_params", "round_filters", "round_repeats", "weights_file_name"]
