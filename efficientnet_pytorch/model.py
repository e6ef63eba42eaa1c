"""EfficientNet B0-B8 and Lite0-4 with the module and state-dict layout of lukemelas/EfficientNet-PyTorch."""

from typing import Optional

import torch
from torch import Tensor, nn

from .utils import (
    Conv2dSame,
    Swish,
    activation,
    adapt_stem,
    check_model_name,
    drop_connect,
    get_model_params,
    load_pretrained_weights,
    output_image_size,
    resolve_weights,
    round_filters,
    round_repeats,
)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck: 1x1 expand, depthwise conv, squeeze-excite (not in Lite), 1x1 project.

    The nonlinearity is held in ``_swish`` whatever it is (ReLU6 in Lite), as the published code does.

    Args:
        block_args: a :class:`~efficientnet_pytorch.utils.BlockArgs` (already width-scaled).
        global_params: a :class:`~efficientnet_pytorch.utils.GlobalParams`.
        image_size: input size of this block for static "SAME" padding; None for dynamic.
    """

    def __init__(self, block_args, global_params, image_size=None):
        super().__init__()
        self._block_args = block_args
        # TF momentum m keeps m of the old running stat; PyTorch momentum is the new share.
        bn = dict(momentum=1 - global_params.batch_norm_momentum, eps=global_params.batch_norm_epsilon)
        inp, k, s = block_args.input_filters, block_args.kernel_size, block_args.stride
        s = s if isinstance(s, int) else s[0]
        mid = inp * block_args.expand_ratio
        out = block_args.output_filters

        self._expand_conv: Optional[nn.Module] = None
        if block_args.expand_ratio != 1:
            self._expand_conv = nn.Conv2d(inp, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **bn)
        self._depthwise_conv = Conv2dSame(mid, mid, k, stride=s, groups=mid, image_size=image_size)
        self._bn1 = nn.BatchNorm2d(mid, **bn)
        se = block_args.se_ratio
        self.has_se = se is not None and 0 < se <= 1
        self._se_reduce: Optional[nn.Module] = None
        if self.has_se:
            squeezed = max(1, int(inp * se))
            self._se_reduce = nn.Conv2d(mid, squeezed, 1)
            self._se_expand = nn.Conv2d(squeezed, mid, 1)
        self._project_conv = nn.Conv2d(mid, out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out, **bn)
        self.id_skip = bool(block_args.id_skip) and s == 1 and inp == out
        self._swish = activation(global_params)

    def forward(self, inputs: Tensor, drop_connect_rate: Optional[float] = None) -> Tensor:
        x = inputs
        if self._expand_conv is not None:
            x = self._swish(self._bn0(self._expand_conv(x)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        if self._se_reduce is not None:
            s = x.mean((2, 3), keepdim=True)
            s = self._se_expand(self._swish(self._se_reduce(s)))
            x = torch.sigmoid(s) * x
        x = self._bn2(self._project_conv(x))
        if self.id_skip:
            if drop_connect_rate is not None and drop_connect_rate > 0.0:
                x = drop_connect(x, drop_connect_rate, self.training)
            x = x + inputs
        return x

    def set_swish(self, memory_efficient: bool = True) -> None:
        """Choose the swish flavour (see :class:`~efficientnet_pytorch.utils.Swish`); ReLU6 stays."""
        if isinstance(self._swish, Swish):
            self._swish = Swish(memory_efficient, inplace=True)


class EfficientNet(nn.Module):
    """EfficientNet (Tan & Le, 2019) compatible with lukemelas/EfficientNet-PyTorch.

    Built from a small table of B0 stages scaled by width/depth coefficients; modules,
    parameter names and numerics match the published implementation, so its
    checkpoints load unchanged. ``efficientnet-lite0`` ... ``lite4`` (TF-Lite's variants,
    layout of the efficientnet-lite-pytorch fork) drop squeeze-excitation, use ReLU6 and
    keep the stem, the head and the first and last stages' repeats unscaled. Differences
    that only affect speed: "SAME" padding is folded into the convolutions, swish is the
    fused ``F.silu`` (exportable), and the model works well in ``channels_last``.

    Args:
        blocks_args: list of :class:`~efficientnet_pytorch.utils.BlockArgs` (unscaled).
        global_params: :class:`~efficientnet_pytorch.utils.GlobalParams`.
        in_channels: number of input channels.

    Example:
        >>> import torch
        >>> from efficientnet_pytorch import EfficientNet
        >>> model = EfficientNet.from_name("efficientnet-b0", num_classes=10, image_size=64).eval()
        >>> model.to(memory_format=torch.channels_last)  # faster on CPU and GPU  # doctest: +ELLIPSIS
        EfficientNet(...)
        >>> x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
        >>> model(x).shape
        torch.Size([2, 10])
        >>> model.extract_features(x).shape
        torch.Size([2, 1280, 2, 2])
    """

    __jit_ignored_attributes__ = ["_global_params", "_blocks_args"]

    def __init__(self, blocks_args=None, global_params=None, in_channels: int = 3):
        super().__init__()
        if not blocks_args or global_params is None:
            raise ValueError(
                "blocks_args (non-empty list) and global_params are required; use EfficientNet.from_name(...)"
            )
        self._global_params = global_params
        self._blocks_args = blocks_args
        gp = global_params
        bn = dict(momentum=1 - gp.batch_norm_momentum, eps=gp.batch_norm_epsilon)
        image_size = gp.image_size

        fixed = bool(gp.fixed_stem_head)
        stem = 32 if fixed else round_filters(32, gp)
        self._conv_stem = Conv2dSame(in_channels, stem, 3, stride=2, image_size=image_size)
        self._bn0 = nn.BatchNorm2d(stem, **bn)
        image_size = output_image_size(image_size, 2)

        blocks = []
        for stage, args in enumerate(blocks_args):
            edge = fixed and stage in (0, len(blocks_args) - 1)
            args = args._replace(
                input_filters=stem if stage == 0 else round_filters(args.input_filters, gp),
                output_filters=round_filters(args.output_filters, gp),
                num_repeat=args.num_repeat if edge else round_repeats(args.num_repeat, gp),
            )
            for i in range(args.num_repeat):
                if i == 1:  # repeats keep the stage's output width and resolution
                    args = args._replace(input_filters=args.output_filters, stride=1)
                blocks.append(MBConvBlock(args, gp, image_size=image_size))
                image_size = output_image_size(
                    image_size, args.stride if isinstance(args.stride, int) else args.stride[0]
                )
        self._blocks = nn.ModuleList(blocks)

        head = 1280 if fixed else round_filters(1280, gp)
        self._conv_head = nn.Conv2d(args.output_filters, head, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(head, **bn)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._include_top = bool(gp.include_top)
        if self._include_top:
            self._dropout = nn.Dropout(gp.dropout_rate or 0.0)
            self._fc = nn.Linear(head, gp.num_classes)
        self._drop_connect_rate = float(gp.drop_connect_rate or 0.0)
        self._swish = activation(gp)

    # ------------------------------------------------------------------ forward
    def _block_rate(self, idx: int) -> float:
        """Drop-connect grows linearly with depth (block 0 is never dropped)."""
        return self._drop_connect_rate * float(idx) / len(self._blocks)

    def extract_features(self, inputs: Tensor) -> Tensor:
        """Output of the final 1x1 conv + BN + activation, shape (N, C_head, H/32, W/32)."""
        x = self._swish(self._bn0(self._conv_stem(inputs)))
        for idx, block in enumerate(self._blocks):
            x = block(x, self._block_rate(idx))
        return self._swish(self._bn1(self._conv_head(x)))

    def extract_endpoints(self, inputs: Tensor) -> dict[str, Tensor]:
        """Last feature map of every resolution: ``reduction_1`` (stride 2) ... ``reduction_6`` (head)."""
        endpoints: dict[str, Tensor] = {}
        x = self._swish(self._bn0(self._conv_stem(inputs)))
        prev = x
        for idx, block in enumerate(self._blocks):
            x = block(x, self._block_rate(idx))
            if prev.shape[2] > x.shape[2]:
                endpoints[f"reduction_{len(endpoints) + 1}"] = prev
            elif idx == len(self._blocks) - 1:
                endpoints[f"reduction_{len(endpoints) + 1}"] = x
            prev = x
        x = self._swish(self._bn1(self._conv_head(x)))
        endpoints[f"reduction_{len(endpoints) + 1}"] = x
        return endpoints

    def forward(self, inputs: Tensor) -> Tensor:
        x = self._avg_pooling(self.extract_features(inputs))
        if self._include_top:
            x = self._fc(self._dropout(x.flatten(1)))
        return x

    def set_swish(self, memory_efficient: bool = True) -> None:
        """Use fused ``F.silu`` (True, default) or plain ``x * sigmoid(x)`` (False) everywhere.

        Both train, script and export; the published implementation needed False for export.
        Lite models keep their ReLU6.
        """
        if isinstance(self._swish, Swish):
            self._swish = Swish(memory_efficient, inplace=True)
        for block in self._blocks:
            block.set_swish(memory_efficient)

    def _change_in_channels(self, in_channels: int) -> None:
        """Replace the stem for ``in_channels`` inputs, adapting its current weights."""
        if in_channels == self._conv_stem.in_channels:
            return
        old = self._conv_stem
        self._conv_stem = Conv2dSame(
            in_channels, old.out_channels, 3, stride=2, image_size=self._global_params.image_size
        ).to(old.weight)
        with torch.no_grad():
            self._conv_stem.weight.copy_(adapt_stem(old.weight, in_channels))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_name(cls, model_name: str, in_channels: int = 3, **override_params) -> "EfficientNet":
        """Build a randomly initialised ``efficientnet-b0`` ... ``b7`` (or b8) or ``efficientnet-lite0`` ... ``lite4``.

        Args:
            model_name: variant name; an unknown name raises a ValueError listing valid ones.
            in_channels: input channels of the stem.
            **override_params: any :class:`~efficientnet_pytorch.utils.GlobalParams` field,
                e.g. ``num_classes``, ``image_size`` (None: dynamic padding),
                ``dropout_rate``, ``drop_connect_rate``, ``include_top``.
        """
        blocks_args, global_params = get_model_params(model_name, override_params)
        return cls(blocks_args, global_params, in_channels=in_channels)

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        weights_path: Optional[str] = None,
        advprop: bool = False,
        in_channels: int = 3,
        num_classes: int = 1000,
        **override_params,
    ) -> "EfficientNet":
        """Build a model and load a published (or same-layout) checkpoint.

        Args:
            model_name: variant name.
            weights_path: local checkpoint; default ``<torch.hub.get_dir()>/checkpoints/<published
                file name>``, else (lite0-2) the installed weights package, else (B0-B8) downloaded
                into the hub cache once if possible.
            advprop: use the AdvProp weights (expect inputs scaled to [-1, 1], not ImageNet mean/std).
            in_channels: input channels; the pretrained RGB stem is adapted, not discarded.
            num_classes: classifier size; re-initialised when it differs from the checkpoint's.
            **override_params: as in :meth:`from_name`.

        Raises:
            FileNotFoundError: no local file and no download possible (names the package to install,
                or the file and directory).
            ValueError: no weights are published for the variant (lite3, lite4, b8 without advprop).
            RuntimeError: the checkpoint has missing or unexpected keys.
        """
        try:  # fail fast, before building
            path = resolve_weights(model_name, weights_path, advprop)
        except FileNotFoundError as err:
            if weights_path is not None:
                raise
            raise FileNotFoundError(f"{err} Or pass weights_path= with a local file.") from None
        model = cls.from_name(model_name, in_channels=in_channels, num_classes=num_classes, **override_params)
        load_pretrained_weights(model, path, in_channels=in_channels)
        return model

    @classmethod
    def get_image_size(cls, model_name: str) -> int:
        """Native input resolution of a variant (e.g. 224 for b0)."""
        _, gp = get_model_params(model_name)
        return gp.image_size

    @classmethod
    def _check_model_name_is_valid(cls, model_name: str) -> None:
        check_model_name(model_name)
