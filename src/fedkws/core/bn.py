"""BatchNorm statistics: per-layer input moments, exact pooling, layer-by-layer recalibration."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from fedkws.core.models import bn_layers
from fedkws.data.cache import CachedDataset
from fedkws.data.loader import iterate_batches

# (count, per-channel sum, per-channel sum of squares) of one layer's input on one holder
Moments = tuple[float, torch.Tensor, torch.Tensor]


class _StopForward(Exception):
    pass


@torch.no_grad()
def bn_input_moments(
    model: nn.Module, data: CachedDataset, rows: np.ndarray, layer: int, batch_size: int
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Per-channel count, sum and sum of squares of the input of BatchNorm ``layer``.

    The model runs in eval mode, so the BatchNorm layers before ``layer``
    normalise with whatever running statistics they hold (the pooled ones, in
    layer-by-layer recalibration). The forward pass stops at ``layer``.
    """
    name, bn = bn_layers(model)[layer]
    acc: dict[str, Any] = {"n": 0.0, "s": None, "ss": None}

    def grab(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].to(torch.float64)
        dims = [d for d in range(x.dim()) if d != 1]
        acc["n"] += float(x.numel() // x.shape[1])
        s, ss = x.sum(dims), (x * x).sum(dims)
        acc["s"] = s if acc["s"] is None else acc["s"] + s
        acc["ss"] = ss if acc["ss"] is None else acc["ss"] + ss
        raise _StopForward

    model.eval()
    handle = bn.register_forward_pre_hook(grab)
    try:
        for x, _ in iterate_batches(data, np.sort(rows), batch_size):
            try:
                model(x)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if acc["s"] is None:
        zeros = torch.zeros(bn.num_features, dtype=torch.float64)
        return 0.0, zeros, zeros.clone()
    return acc["n"], acc["s"], acc["ss"]


def pooled_statistics(
    moments: list[tuple[float, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and unbiased variance of the union, from per-part (n, sum, sum of squares).

    Unlike averaging per-client variances, this includes the spread of the
    client means around the global mean.
    """
    n = sum(m[0] for m in moments)
    if n < 2:
        raise ValueError("need at least two values per channel to estimate a variance")
    s = sum(m[1] for m in moments)
    ss = sum(m[2] for m in moments)
    mean = s / n
    var = (ss - n * mean * mean) / (n - 1)
    return mean, var.clamp_min(0.0)


def recalibrate(
    model: nn.Module,
    moments_of: Callable[[nn.Module, int], list[Moments]],
    record: list[list[Moments]] | None = None,
) -> nn.Module:
    """Set every BatchNorm's running statistics to the exact pooled ones, layer by layer.

    ``moments_of(model, layer)`` returns the (n, sum, sum of squares) of layer
    ``layer``'s input from each data holder, computed with the model as it is
    now, i.e. with the layers before ``layer`` already recalibrated. Returns a
    recalibrated copy; ``model`` itself is unchanged. Each layer's per-holder
    moments are appended to ``record`` when one is given.
    """
    twin = copy.deepcopy(model).eval()
    for layer, (_, bn) in enumerate(bn_layers(twin)):
        moments = moments_of(twin, layer)
        if record is not None:
            record.append(moments)
        mean, var = pooled_statistics(moments)
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
    return twin


def averaged_statistics(moments: list[Moments]) -> tuple[torch.Tensor, torch.Tensor]:
    """Example-weighted average of each holder's own mean and unbiased variance.

    What averaging the holders' freshly computed running statistics gives: the
    mean equals the pooled mean, the variance misses the spread of the holder
    means around it (:func:`pooled_statistics` includes it). Holders with fewer
    than two values are left out of the variance.
    """
    n = sum(m[0] for m in moments)
    mean = sum(m[1] for m in moments) / n
    var_weights = [m[0] for m in moments if m[0] >= 2]
    var = sum(m[0] * (m[2] - m[1] * m[1] / m[0]) / (m[0] - 1) for m in moments if m[0] >= 2) / sum(
        var_weights
    )
    return mean, var.clamp_min(0.0)


def averaged_twin(model: nn.Module, recorded: list[list[Moments]]) -> nn.Module:
    """A copy of ``model`` with :func:`averaged_statistics` of ``recorded`` in every BatchNorm.

    ``recorded`` holds the per-layer, per-holder moments that :func:`recalibrate` recorded.
    """
    twin = copy.deepcopy(model).eval()
    for (_, bn), moments in zip(bn_layers(twin), recorded, strict=True):
        mean, var = averaged_statistics(moments)
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
    return twin
