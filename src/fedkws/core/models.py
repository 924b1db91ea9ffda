"""Keyword-spotting networks with a pluggable normalisation layer.

Every model takes a ``(batch, 1, H, W)`` feature map (40 mel/MFCC bins by 101
frames for one-second Speech Commands clips, frequency first, time second) and
returns ``(batch, num_classes)`` logits. Nothing depends on ``H`` and ``W``
beyond a minimum size, because each network ends in a global or adaptive pool.

The normalisation after every convolution is chosen by one argument, ``norm``,
so the same architecture can be trained with BatchNorm (whose running
statistics are what collapses in eval mode under federated averaging) and with
batch-independent alternatives:

``"batch"``
    :class:`torch.nn.BatchNorm2d` with running statistics and affine params.
``"group"``
    :class:`torch.nn.GroupNorm` with ``groups`` groups (see :func:`group_count`).
``"layer"``
    ``GroupNorm(1, C)``: normalises over channels, height and width per sample,
    which is LayerNorm for conv features without fixing the spatial shape.
``"instance"``
    ``GroupNorm(C, C)``: per-sample, per-channel statistics. Chosen over
    :class:`torch.nn.InstanceNorm2d` because it always has affine params and
    never keeps running statistics, so it has the same state-dict layout as the
    other GroupNorm variants.
``"none"``
    :class:`torch.nn.Identity`.
``"ws"``
    Normalisation-free with weight-standardised convolutions (FedWon, Zhuang &
    Lyu, ICLR 2024, arXiv 2306.05879): no norm layer (:class:`torch.nn.Identity`)
    and every convolution is a :class:`WSConv2d`, whose weight is standardised
    per output channel at every forward pass. Unlike ``"none"``, the
    standardisation keeps the signal's scale fixed through depth without any
    statistics of the data.

Every norm with parameters is affine, including the BatchNorm in ``res8`` and
``res15`` where Tang & Lin (2018) used BatchNorm without affine params: FedBN
and similar methods keep the norm's affine params local, so they must exist.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "MODEL_NAMES",
    "NORM_KINDS",
    "KWSCNN",
    "WSConv2d",
    "ResKWS",
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "bn_layers",
    "bn_state_keys",
    "build_model",
    "conv_type",
    "count_parameters",
    "group_count",
    "is_bn_key",
    "make_norm",
    "res8",
    "res15",
]

NORM_KINDS: tuple[str, ...] = ("batch", "group", "layer", "instance", "none", "ws")

RESNET_DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}

MODEL_NAMES: tuple[str, ...] = (
    "cnn",
    "res8",
    "res15",
    "resnet",
    *(f"resnet{d}" for d in RESNET_DEPTHS),
)

NormFactory = Callable[[int], nn.Module]
ConvType = type[nn.Conv2d]


# --------------------------------------------------------------------------- norms


def group_count(channels: int, groups: int) -> int:
    """Number of GroupNorm groups actually used for ``channels`` channels.

    Parameters
    ----------
    channels : int
        Number of channels to normalise.
    groups : int
        Requested number of groups.

    Returns
    -------
    int
        ``groups`` if it divides ``channels``, otherwise the largest divisor of
        ``channels`` that is at most ``groups`` (at least 1). For example 45
        channels with 8 requested groups gives 5 groups.

    Raises
    ------
    ValueError
        If ``channels`` or ``groups`` is not positive.
    """
    if channels < 1 or groups < 1:
        raise ValueError(f"channels and groups must be positive, got {channels} and {groups}")
    for g in range(min(groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1  # unreachable: 1 divides everything


class ChannelsFirstGroupNorm(nn.GroupNorm):
    """GroupNorm whose training pass runs on a channels-first copy of a channels-last input.

    On CPU, torch's GroupNorm backward with more than one group is several times
    slower on channels-last inputs (see ``channels_last`` of :func:`build_model`), so
    while autograd records, a channels-last input is normalised channels first and
    the output turned back to channels last (the next convolution then reads the
    layout its weights have instead of converting its input). Without autograd
    (evaluation, statistics) torch's channels-last forward kernel is the fast one
    and runs on the input as it is. On a channels-first input this is
    ``nn.GroupNorm`` exactly (no copy is made).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous() or not torch.is_grad_enabled():
            return super().forward(x)
        out = super().forward(x.contiguous())
        if x.is_contiguous(memory_format=torch.channels_last):
            return out.contiguous(memory_format=torch.channels_last)
        return out


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools a channels-first CPU input in the channels-last layout.

    On CPU, torch's channels-first max-pool kernel is several times slower than
    its channels-last one at these models' shapes: for a batch of 256 ResNet-10
    stem outputs (32 x 20 x 51) in one thread, 48 ms against 14 ms with both
    layout copies included (``benchmarks/run.py --only evaluation`` measures what
    it does to a round). A maximum is not rounded, and both kernels keep the
    first maximum of a window in the same scan order, so the output and the
    gradient are bitwise ``nn.MaxPool2d``'s (tests/test_models.py). Other devices,
    unbatched (3-D) and channels-last inputs, and ``return_indices``, take
    ``nn.MaxPool2d``'s own path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type != "cpu"
            or x.dim() != 4
            or self.return_indices
            or x.is_contiguous(memory_format=torch.channels_last)
        ):
            return super().forward(x)
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


def make_norm(kind: str, channels: int, groups: int = 8) -> nn.Module:
    """Build the normalisation layer that follows a convolution.

    Parameters
    ----------
    kind : str
        One of :data:`NORM_KINDS`: ``"batch"``, ``"group"``, ``"layer"``,
        ``"instance"``, ``"none"`` or ``"ws"`` (no norm layer: the convolutions
        are standardised instead, see :func:`conv_type`).
    channels : int
        Number of channels of the feature map being normalised.
    groups : int, optional
        Groups for ``kind="group"``; reduced to the largest divisor of
        ``channels`` not above it (see :func:`group_count`). Ignored otherwise.

    Returns
    -------
    torch.nn.Module
        The norm layer; affine whenever it has parameters at all.

    Raises
    ------
    ValueError
        If ``kind`` is not one of :data:`NORM_KINDS`.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels, affine=True, track_running_stats=True)
    if kind == "group":
        return ChannelsFirstGroupNorm(group_count(channels, groups), channels, affine=True)
    if kind == "layer":
        return nn.GroupNorm(1, channels, affine=True)
    if kind == "instance":
        return ChannelsFirstGroupNorm(channels, channels, affine=True)
    if kind in ("none", "ws"):
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; valid kinds: {', '.join(NORM_KINDS)}")


def _norm_factory(kind: str, groups: int) -> NormFactory:
    # Validate once up front so a bad kind fails before any layer is built.
    make_norm(kind, 8, groups)
    return lambda channels: make_norm(kind, channels, groups)


def _conv_bias(norm: str) -> bool:
    # A bias directly before a mean-subtracting norm is cancelled by it; without
    # a norm the conv needs its own bias.
    return norm in ("none", "ws")


# The gain that gives ReLU(z), z ~ N(0, 1), unit variance: sqrt(2 / (1 - 1/pi)).
RELU_GAIN = (2.0 / (1.0 - 1.0 / math.pi)) ** 0.5


class WSConv2d(nn.Conv2d):
    """A convolution with a scaled, weight-standardised kernel (FedWon's reparameterisation).

    At every forward pass each output channel's kernel is standardised over its
    fan-in ``N = in_channels / groups * kh * kw`` (zero mean, unit variance, the
    biased variance plus ``eps``) and then scaled::

        W_hat[i] = gain[i] * gamma / sqrt(N) * (W[i] - mean(W[i])) / sqrt(var(W[i]) + eps)

    so the pre-activation keeps the variance of the input, whatever the weights
    and the data (the scaled weight standardisation of Brock et al., 2021,
    arXiv 2101.08692, that FedWon, arXiv 2306.05879, uses in place of every norm
    layer). ``gain`` is a learnable per-channel scale (initialised to 1);
    ``gamma`` is fixed, :data:`RELU_GAIN` by default, because every convolution
    here is followed by a ReLU. The stored ``weight`` is left as it is; only the
    kernel used by the forward pass is standardised. Nothing depends on the
    batch, so train and eval mode give the same output.

    Parameters
    ----------
    *args, **kwargs
        As for :class:`torch.nn.Conv2d`.
    eps : float, optional
        Added to each channel's variance.
    gamma : float, optional
        Fixed gain on top of the ``1 / sqrt(N)`` scale.
    """

    def __init__(self, *args, eps: float = 1e-5, gamma: float = RELU_GAIN, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps, self.gamma = eps, gamma
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def standardized_weight(self) -> torch.Tensor:
        """The kernel the forward pass uses."""
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        fan_in = self.weight[0].numel()
        scale = self.gain * (self.gamma / math.sqrt(fan_in)) * torch.rsqrt(var + self.eps)
        return (self.weight - mean) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` with the standardised kernel."""
        return self._conv_forward(x, self.standardized_weight(), self.bias)


def conv_type(norm: str) -> ConvType:
    """The convolution class of every conv of a model with norm ``norm``.

    :class:`WSConv2d` for ``"ws"``, :class:`torch.nn.Conv2d` otherwise.
    """
    return WSConv2d if norm == "ws" else nn.Conv2d


# --------------------------------------------------------------------------- cnn


class KWSCNN(nn.Module):
    """Two-convolution network after the TensorFlow speech-commands ``conv`` model.

    conv(8x20) -> norm -> ReLU -> max-pool 2 -> conv(4x10) -> norm -> ReLU ->
    max-pool 2 -> adaptive average pool to ``pooled`` -> dropout -> linear.

    The kernels are the tutorial's 20x8 (time x frequency) and 10x4, transposed
    because features here are laid out frequency first. The tutorial flattens
    the whole second feature map into the dense layer; the adaptive pool
    instead fixes the dense layer's input size whatever the input size, and
    keeps that layer (and the federated payload) small. Padding is half the
    (even) kernel size, which grows each map by one row and column rather than
    paying for the asymmetric padding that exact "same" output would need.

    Parameters
    ----------
    num_classes : int
        Number of output classes.
    norm : str, optional
        Norm kind, see :func:`make_norm`.
    groups : int, optional
        GroupNorm groups for ``norm="group"``.
    channels : tuple of int, optional
        Output channels of the two convolutions.
    pooled : tuple of int, optional
        (height, width) of the adaptive pool before the dense layer.
    dropout : float, optional
        Dropout probability before the dense layer.
    in_channels : int, optional
        Input channels.
    """

    def __init__(
        self,
        num_classes: int,
        norm: str = "batch",
        groups: int = 8,
        channels: tuple[int, int] = (64, 64),
        pooled: tuple[int, int] = (4, 8),
        dropout: float = 0.0,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        make = _norm_factory(norm, groups)
        bias, conv = _conv_bias(norm), conv_type(norm)
        c1, c2 = channels
        self.features = nn.Sequential(
            conv(in_channels, c1, kernel_size=(8, 20), padding=(4, 10), bias=bias),
            make(c1),
            nn.ReLU(inplace=True),
            MaxPool2d(2, ceil_mode=True),
            conv(c1, c2, kernel_size=(4, 10), padding=(2, 5), bias=bias),
            make(c2),
            nn.ReLU(inplace=True),
            MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(pooled),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(c2 * pooled[0] * pooled[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, W)`` features to ``(N, num_classes)`` logits."""
        x = self.features(x)
        return self.classifier(self.dropout(torch.flatten(x, 1)))


# --------------------------------------------------------------------------- res8/res15


class ResKWS(nn.Module):
    """Residual keyword-spotting network of Tang & Lin (2018), ``res8``/``res15``.

    A bias-free 3x3 conv to ``maps`` channels and ReLU (optionally followed by
    average pooling), then ``layers`` 3x3 convs, each followed by ReLU and the
    norm. Every second layer adds the output of the layer two back (the first
    conv's output for the first pair), giving ``layers // 2`` residual blocks;
    an odd trailing layer has no shortcut. The output is globally average
    pooled and fed to a linear layer.

    As in the paper's reference implementation, there is no norm after the
    first conv, the norm of a block's second layer comes after the addition,
    and the shortcut carries that sum before it is normalised, so the residual
    stream itself is never normalised. Unlike the paper, the norm is affine
    (see the module docstring).

    Parameters
    ----------
    num_classes : int
        Number of output classes.
    norm : str, optional
        Norm kind, see :func:`make_norm`.
    groups : int, optional
        GroupNorm groups for ``norm="group"``; 45 maps with 8 groups gives 5.
    maps : int, optional
        Feature maps in every layer.
    layers : int, optional
        Convolutions after the first one.
    pool : tuple of int or None, optional
        Average-pool size after the first conv, (frequency, time).
    dilated : bool, optional
        Use dilation ``2 ** (i // 3)`` for the ``i``-th layer (0-based).
    in_channels : int, optional
        Input channels.
    """

    def __init__(
        self,
        num_classes: int,
        norm: str = "batch",
        groups: int = 8,
        maps: int = 45,
        layers: int = 13,
        pool: tuple[int, int] | None = None,
        dilated: bool = True,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        make = _norm_factory(norm, groups)
        # The paper's convs are bias-free even though the paper's BN has no
        # shift; with norm="none" a bias is the only offset left.
        bias, conv = _conv_bias(norm), conv_type(norm)
        self.stem = conv(in_channels, maps, 3, padding=1, bias=bias)
        self.pool = nn.AvgPool2d(pool) if pool is not None else nn.Identity()
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(layers):
            d = 2 ** (i // 3) if dilated else 1
            self.convs.append(conv(maps, maps, 3, padding=d, dilation=d, bias=bias))
            self.norms.append(make(maps))
        self.classifier = nn.Linear(maps, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, W)`` features to ``(N, num_classes)`` logits."""
        x = self.pool(torch.relu(self.stem(x)))
        shortcut = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            y = torch.relu(conv(x))
            if i % 2 == 1:
                y = y + shortcut
                shortcut = y
            x = norm(y)
        return self.classifier(x.mean(dim=(2, 3)))


def res8(num_classes: int, norm: str = "batch", groups: int = 8, **kwargs) -> ResKWS:
    """Build ``res8``: 45 maps, 6 layers, 4x3 (time x frequency) average pool first.

    The paper pools 4 frames by 3 coefficients; with features laid out
    frequency first that is a ``(3, 4)`` pool here.

    Parameters
    ----------
    num_classes : int
        Number of output classes.
    norm : str, optional
        Norm kind, see :func:`make_norm`.
    groups : int, optional
        GroupNorm groups for ``norm="group"``.
    **kwargs
        Overrides for :class:`ResKWS` arguments.

    Returns
    -------
    ResKWS
        The network (about 110k parameters for 12 classes).
    """
    args = {"maps": 45, "layers": 6, "pool": (3, 4), "dilated": False, **kwargs}
    return ResKWS(num_classes, norm=norm, groups=groups, **args)


def res15(num_classes: int, norm: str = "batch", groups: int = 8, **kwargs) -> ResKWS:
    """Build ``res15``: 45 maps, 13 dilated layers, no pooling.

    Parameters
    ----------
    num_classes : int
        Number of output classes.
    norm : str, optional
        Norm kind, see :func:`make_norm`.
    groups : int, optional
        GroupNorm groups for ``norm="group"``.
    **kwargs
        Overrides for :class:`ResKWS` arguments.

    Returns
    -------
    ResKWS
        The network (about 238k parameters for 12 classes).
    """
    args = {"maps": 45, "layers": 13, "pool": None, "dilated": True, **kwargs}
    return ResKWS(num_classes, norm=norm, groups=groups, **args)


# --------------------------------------------------------------------------- resnet


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity or projected shortcut (ResNet-10/18/34).

    Parameters
    ----------
    in_channels : int
        Input channels.
    planes : int
        Channels of both convs.
    stride : int
        Stride of the first conv and of the projection.
    make_norm_layer : callable
        Maps a channel count to a norm module.
    bias : bool
        Whether convs have a bias.
    conv : type, optional
        The convolution class (:func:`conv_type`).
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int,
        make_norm_layer: NormFactory,
        bias: bool,
        conv: ConvType = nn.Conv2d,
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv(in_channels, planes, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = make_norm_layer(planes)
        self.conv2 = conv(planes, out_channels, 3, padding=1, bias=bias)
        self.norm2 = make_norm_layer(out_channels)
        self.shortcut = _projection(in_channels, out_channels, stride, make_norm_layer, bias, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        y = torch.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a shortcut (ResNet-50).

    The stride sits on the 3x3 conv rather than the first 1x1 conv, so no
    input positions are skipped outright.

    Parameters
    ----------
    in_channels : int
        Input channels.
    planes : int
        Channels of the inner convs; the block outputs ``4 * planes``.
    stride : int
        Stride of the 3x3 conv and of the projection.
    make_norm_layer : callable
        Maps a channel count to a norm module.
    bias : bool
        Whether convs have a bias.
    conv : type, optional
        The convolution class (:func:`conv_type`).
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int,
        make_norm_layer: NormFactory,
        bias: bool,
        conv: ConvType = nn.Conv2d,
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv(in_channels, planes, 1, bias=bias)
        self.norm1 = make_norm_layer(planes)
        self.conv2 = conv(planes, planes, 3, stride=stride, padding=1, bias=bias)
        self.norm2 = make_norm_layer(planes)
        self.conv3 = conv(planes, out_channels, 1, bias=bias)
        self.norm3 = make_norm_layer(out_channels)
        self.shortcut = _projection(in_channels, out_channels, stride, make_norm_layer, bias, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        y = torch.relu(self.norm1(self.conv1(x)))
        y = torch.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return torch.relu(y + self.shortcut(x))


def _projection(
    in_channels: int,
    out_channels: int,
    stride: int,
    make_norm_layer: NormFactory,
    bias: bool,
    conv: ConvType = nn.Conv2d,
) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        conv(in_channels, out_channels, 1, stride=stride, bias=bias),
        make_norm_layer(out_channels),
    )


class ResNet(nn.Module):
    """ResNet-10/18/34/50 for one-channel spectro-temporal input.

    With ``stem="standard"`` this is the usual 7x7 stride-2 conv and 3x3
    stride-2 max-pool; a 40x101 input then reaches the last stage as a 2x4 map,
    which is still enough for the final global average pool. ``stem="light"``
    (a 3x3 stride-1 conv, no pool) keeps 4x the resolution in every stage at
    about 16x the compute, for small inputs.

    Parameters
    ----------
    num_classes : int
        Number of output classes.
    depth : int, optional
        One of 10, 18, 34 (basic blocks) or 50 (bottleneck blocks).
    norm : str, optional
        Norm kind, see :func:`make_norm`.
    groups : int, optional
        GroupNorm groups for ``norm="group"``.
    width : int, optional
        Channels of the stem and first stage, doubled at each later stage;
        64 is the standard network, 16 or 32 give CPU-sized variants.
    stem : {"standard", "light"}, optional
        Input stem, see above.
    in_channels : int, optional
        Input channels.
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 18,
        norm: str = "batch",
        groups: int = 8,
        width: int = 64,
        stem: str = "standard",
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(
                f"unsupported resnet depth {depth}; valid depths: "
                f"{', '.join(map(str, RESNET_DEPTHS))}"
            )
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        make = _norm_factory(norm, groups)
        bias, conv = _conv_bias(norm), conv_type(norm)
        kind, counts = RESNET_DEPTHS[depth]
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if kind == "basic" else Bottleneck
        self.depth = depth

        if stem == "standard":
            self.stem = nn.Sequential(
                conv(in_channels, width, 7, stride=2, padding=3, bias=bias),
                make(width),
                nn.ReLU(inplace=True),
                MaxPool2d(3, stride=2, padding=1),
            )
        elif stem == "light":
            self.stem = nn.Sequential(
                conv(in_channels, width, 3, padding=1, bias=bias),
                make(width),
                nn.ReLU(inplace=True),
            )
        else:
            raise ValueError(f"unknown stem {stem!r}; valid stems: standard, light")

        channels = width
        stages = []
        for i, n in enumerate(counts):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(channels, planes, stride, make, bias, conv))
                channels = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, W)`` features to ``(N, num_classes)`` logits."""
        x = self.stages(self.stem(x))
        return self.classifier(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- builder


def build_model(
    name: str,
    num_classes: int,
    norm: str = "batch",
    groups: int = 8,
    channels_last: bool = False,
    **kwargs,
) -> nn.Module:
    """Build a model by name.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES`: ``"cnn"``, ``"res8"``, ``"res15"``,
        ``"resnet"`` (depth from ``depth=``, default 18) or ``"resnet10"``,
        ``"resnet18"``, ``"resnet34"``, ``"resnet50"``.
    num_classes : int
        Number of output classes.
    norm : str, optional
        Norm kind, one of :data:`NORM_KINDS`.
    groups : int, optional
        GroupNorm groups for ``norm="group"``.
    channels_last : bool, optional
        Lay the 4-D weights out channels last (NHWC), so that the convolutions
        run in that layout: on CPU the study CNN's training steps and evaluation
        are faster with each norm ``benchmarks/run.py --only layout`` measures
        (batch, group, layer, ws; RESULTS.md). Sums then
        run in another order, so the results differ from the default layout's
        in the last bits and, through training, in the last digits of accuracies.
    **kwargs
        Model-specific arguments: ``channels``, ``pooled``, ``dropout`` for
        ``cnn`` (:class:`KWSCNN`); ``maps``, ``layers``, ``pool``, ``dilated``
        for ``res8``/``res15`` (:class:`ResKWS`); ``depth``, ``width``,
        ``stem`` for the resnets (:class:`ResNet`); ``in_channels`` for all.

    Returns
    -------
    torch.nn.Module
        The model, in training mode.

    Raises
    ------
    ValueError
        For an unknown model name or norm kind, a non-positive ``num_classes``,
        or a ``depth=`` that contradicts a ``resnetNN`` name.
    """
    model = _build(name, num_classes, norm, groups, **kwargs)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _build(name: str, num_classes: int, norm: str, groups: int, **kwargs) -> nn.Module:
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if norm not in NORM_KINDS:
        raise ValueError(f"unknown norm {norm!r}; valid kinds: {', '.join(NORM_KINDS)}")
    key = name.lower()
    if key == "cnn":
        return KWSCNN(num_classes, norm=norm, groups=groups, **kwargs)
    if key == "res8":
        return res8(num_classes, norm=norm, groups=groups, **kwargs)
    if key == "res15":
        return res15(num_classes, norm=norm, groups=groups, **kwargs)
    if key == "resnet":
        return ResNet(num_classes, norm=norm, groups=groups, **kwargs)
    if key in MODEL_NAMES and key.startswith("resnet"):
        depth = int(key.removeprefix("resnet"))
        if kwargs.setdefault("depth", depth) != depth:
            raise ValueError(f"model {name!r} has depth {depth}, got depth={kwargs['depth']}")
        return ResNet(num_classes, norm=norm, groups=groups, **kwargs)
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as running stats excluded).

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    trainable_only : bool, optional
        Count only parameters with ``requires_grad``.

    Returns
    -------
    int
        Total element count.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------- BN helpers


def bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """All BatchNorm modules of ``model`` with their qualified names.

    Parameters
    ----------
    model : torch.nn.Module
        The model.

    Returns
    -------
    list of (str, torch.nn.modules.batchnorm._BatchNorm)
        In module registration order, which for every model here is forward
        order. Empty when the model has no BatchNorm.
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def bn_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys that belong to BatchNorm modules.

    Parameters
    ----------
    model : torch.nn.Module
        The model.

    Returns
    -------
    set of str
        ``weight``, ``bias``, ``running_mean``, ``running_var`` and
        ``num_batches_tracked`` (whichever exist) of every BatchNorm module,
        qualified as in ``model.state_dict()``.
    """
    return {
        f"{name}.{key}" if name else key
        for name, module in bn_layers(model)
        for key in module.state_dict()
    }


def is_bn_key(state_dict_key: str, model: nn.Module) -> bool:
    """Whether a state-dict key belongs to a BatchNorm module of ``model``.

    Parameters
    ----------
    state_dict_key : str
        A key of ``model.state_dict()``.
    model : torch.nn.Module
        The model.

    Returns
    -------
    bool
        True for BatchNorm params and buffers. Call :func:`bn_state_keys` once
        instead when testing many keys.
    """
    return state_dict_key in bn_state_keys(model)
