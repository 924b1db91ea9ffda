"""Training, evaluation and BatchNorm statistics: the loops every mode shares.

The centralised baseline, the federated clients and the server's evaluation
all call these functions, so the three differ only in who holds which data.
"""

from __future__ import annotations

import copy
import importlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedkws.data.augment import Augmenter
from fedkws.data.cache import CachedDataset
from fedkws.data.features import FeatureExtractor
from fedkws.data.loader import iterate_batches
from fedkws.data.pipeline import augment_config, feature_config
from fedkws.models import bn_layers


def stream_seed(*parts: int) -> int:
    """A 63-bit seed for one (seed, round, client, ...) stream, independent of the others."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def make_generator(*parts: int) -> torch.Generator:
    """A ``torch.Generator`` for one stream; also seeds torch's global RNG (dropout)."""
    seed = stream_seed(*parts)
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def optimizer_factory(spec: Mapping[str, Any]) -> Callable[..., torch.optim.Optimizer]:
    """``params -> optimizer`` from ``{"_target_": "torch.optim.AdamW", "lr": ...}``."""
    target = str(spec["_target_"])
    module, _, name = target.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    kwargs = {k: v for k, v in spec.items() if not k.startswith("_")}
    return lambda params: cls(params, **kwargs)


def training_augmentation(
    task: Mapping[str, Any], data: CachedDataset
) -> tuple[Augmenter | None, FeatureExtractor | None]:
    """The augmenter of a task and, when it works on waveforms, the feature extractor."""
    augment = augment_config(task["augment"])
    augmenter = Augmenter(augment, data.noise_bank()) if augment.any else None
    extractor = FeatureExtractor(feature_config(task["features"])) if augment.needs_waves else None
    return augmenter, extractor


@dataclass
class TrainStats:
    """Mean training loss/accuracy over the examples seen (train-mode forward)."""

    loss: float
    acc: float
    num_examples: int
    seconds: float


def train_epochs(
    model: nn.Module,
    data: CachedDataset,
    rows: np.ndarray,
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    augmenter: Augmenter | None = None,
    extractor: FeatureExtractor | None = None,
    prox_mu: float = 0.0,
) -> TrainStats:
    """Train in place for ``epochs`` over ``rows``.

    With ``prox_mu > 0`` the FedProx term ``mu/2 * ||w - w_start||^2`` ties the
    parameters to their values at the start of the call (the global model).
    """
    start = time.perf_counter()
    anchor = [p.detach().clone() for p in model.parameters()] if prox_mu > 0 else None
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    # A batch of one breaks BatchNorm in train mode; drop a last batch that small.
    drop_last = len(rows) % batch_size == 1 and len(rows) > 1
    for _ in range(epochs):
        for x, y in iterate_batches(
            data,
            rows,
            batch_size,
            generator,
            shuffle=True,
            augmenter=augmenter,
            extractor=extractor,
            drop_last=drop_last,
        ):
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            objective = loss
            if anchor is not None:
                prox = sum(
                    (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
                )
                objective = loss + 0.5 * prox_mu * prox
            objective.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
    return TrainStats(
        loss=loss_sum / max(seen, 1),
        acc=correct / max(seen, 1),
        num_examples=len(rows),
        seconds=time.perf_counter() - start,
    )


@dataclass
class EvalStats:
    """Loss, accuracy and confusion matrix (rows: true label, columns: predicted)."""

    loss: float
    acc: float
    num_examples: int
    confusion: np.ndarray

    def per_class_acc(self) -> np.ndarray:
        """Recall of each class (NaN for a class with no example)."""
        totals = self.confusion.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.diag(self.confusion) / totals


def norm_mode_model(model: nn.Module, mode: str) -> nn.Module:
    """The model as evaluated in ``mode``.

    ``eval``: ``model.eval()``, BatchNorm uses its running statistics.
    ``train``: BatchNorm normalises with the evaluation batch's own statistics
    (the 2020 workaround). Done on a copy so the running statistics are not
    touched; dropout stays off, so only the normalisation differs from ``eval``.
    """
    if mode == "eval":
        model.eval()
        return model
    if mode == "train":
        twin = copy.deepcopy(model).eval()
        for module in twin.modules():
            if isinstance(module, _BatchNorm):
                module.train()
        return twin
    raise ValueError(f"Unknown evaluation mode '{mode}'. Valid modes: eval, train")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: CachedDataset,
    rows: np.ndarray,
    batch_size: int,
    mode: str = "eval",
) -> EvalStats:
    """Evaluate on ``rows`` in their stored order (fixed batches: train mode depends on them)."""
    net = norm_mode_model(model, mode)
    k = data.num_classes
    confusion = np.zeros((k, k), dtype=np.int64)
    loss_sum = 0.0
    for x, y in iterate_batches(data, np.sort(rows), batch_size):
        logits = net(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        np.add.at(confusion, (y.numpy(), logits.argmax(1).numpy()), 1)
    n = int(confusion.sum())
    model.eval()
    return EvalStats(loss_sum / max(n, 1), float(np.trace(confusion)) / max(n, 1), n, confusion)


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
    moments_of: Callable[[nn.Module, int], list[tuple[float, torch.Tensor, torch.Tensor]]],
) -> nn.Module:
    """Set every BatchNorm's running statistics to the exact pooled ones, layer by layer.

    ``moments_of(model, layer)`` returns the (n, sum, sum of squares) of layer
    ``layer``'s input from each data holder, computed with the model as it is
    now, i.e. with the layers before ``layer`` already recalibrated. Returns a
    recalibrated copy; ``model`` itself is unchanged.
    """
    twin = copy.deepcopy(model).eval()
    for layer, (_, bn) in enumerate(bn_layers(twin)):
        mean, var = pooled_statistics(moments_of(twin, layer))
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
    return twin
