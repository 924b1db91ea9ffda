"""Training and evaluation loops: what every recipe and every client runs.

The centralised baseline, the federated clients and the server's evaluation
all call these functions, so the three differ only in who holds which data.
Each takes the ``device`` it runs on as an argument; the model must already be
there. Batches come from the cache on the CPU (the same on every device) and
are moved per batch.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedkws import lifecycle
from fedkws.core.seeding import evaluation_rng
from fedkws.data.augment import AugmentConfig, Augmenter, noise_mel_power
from fedkws.data.cache import CachedDataset
from fedkws.data.features import FeatureConfig, FeatureExtractor
from fedkws.data.loader import iterate_batches


def device_name(device: torch.device | str) -> str:
    """The device's name: the CUDA card's (e.g. ``NVIDIA H100 80GB HBM3``) or ``cpu``."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def set_determinism(on: bool) -> bool:
    """Deterministic algorithms on or off for this process; returns the previous setting.

    On: ``torch.use_deterministic_algorithms(True)`` (an operation without a
    deterministic implementation raises), cuDNN autotuning off, and cuBLAS told
    to use a fixed workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which it reads
    when it starts: call this before the first CUDA operation of the process).
    """
    before = torch.are_deterministic_algorithms_enabled()
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = on
    torch.use_deterministic_algorithms(on)
    return before


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """The training forward's mixed precision (``none``: no autocast at all)."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(params: Any, target: str, kwargs: Mapping[str, Any]) -> torch.optim.Optimizer:
    """An optimiser by class path, e.g. ``make_optimizer(p, "torch.optim.AdamW", {"lr": 1e-3})``."""
    module, _, name = target.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(params, **kwargs)


def training_augmentation(
    augment: AugmentConfig, features: FeatureConfig, data: CachedDataset
) -> tuple[Augmenter | None, FeatureExtractor | None]:
    """The augmenter for ``augment`` and, when it works on waveforms, the feature extractor."""
    if not augment.any:  # (nor waveform augmentation: no extractor either)
        return None, None
    noise_power = None
    if augment.domain == "mel" and augment.noise_prob > 0 and features.kind == "logmel":
        noise_power = _noise_power(data, features)
    augmenter = Augmenter(augment, data.noise_bank(), features, noise_power)
    extractor = FeatureExtractor(features) if augment.needs_waves else None
    return augmenter, extractor


# Mel power of a cache entry's noise bank, per process: a client builds its augmenter every
# round, and the bank's STFT costs as much as a few hundred clips' (augment.domain=mel).
_noise_powers: dict[tuple, torch.Tensor] = {}


def _noise_power(data: CachedDataset, features: FeatureConfig) -> torch.Tensor:
    key = (str(data.path), str(data.manifest["files"]["noise.npy"]["sha1"]), features)
    if key not in _noise_powers:
        if len(_noise_powers) >= 2:
            _noise_powers.clear()
        _noise_powers[key] = noise_mel_power(data.noise_bank(), features)
    return _noise_powers[key]


@dataclass
class TrainStats:
    """Mean training loss/accuracy over the examples seen (train-mode forward)."""

    loss: float
    acc: float
    num_examples: int
    seconds: float
    seen: int = 0  # examples trained on in this call (epochs x rows, or a visit's batches)
    batches: int = 0  # optimiser steps taken in this call


class EpochCursor:
    """A client's place in its shuffled local epochs, kept between visits (``strategy=cyclic``).

    It draws from ``generator`` exactly what :func:`train_epochs` draws (each epoch's
    permutation of ``rows``, then each batch's augmentation), so a client visited one
    batch at a time goes through the batches one call of :func:`train_epochs` would
    give it, each of its rows once per epoch. :meth:`state_dict` (tensors only) lets
    the position survive between messages and processes.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, epochs: int, generator: torch.Generator):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size, self.epochs, self.generator = batch_size, epochs, generator
        self.epoch, self.position, self.order = 0, 0, self.rows
        # As train_epochs: a last batch of one would break BatchNorm in train mode.
        drop_last = len(rows) % batch_size == 1 and len(rows) > 1
        self.stop = len(rows) - (len(rows) % batch_size if drop_last else 0)

    @property
    def done(self) -> bool:
        """Whether every epoch has been gone through."""
        return self.epoch >= self.epochs or self.stop == 0

    @property
    def batches_left(self) -> int:
        """Batches still to come before :attr:`done`."""
        per_epoch = -(-self.stop // self.batch_size)
        return max(0, (self.epochs - self.epoch) * per_epoch - self.position // self.batch_size)

    def batches(
        self, data: CachedDataset, count: int | None, augmenter=None, extractor=None, device=None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The next ``count`` batches (``None``: all that are left), across epoch boundaries."""
        taken = 0
        while not self.done and (count is None or taken < count):
            if self.position == 0:  # a new epoch: its order, drawn as iterate_batches does
                perm = torch.randperm(len(self.rows), generator=self.generator).numpy()
                self.order = self.rows[perm]
            end = min(self.position + self.batch_size, self.stop)
            idx = self.order[self.position : end]
            yield from iterate_batches(
                data, idx, self.batch_size, self.generator,
                augmenter=augmenter, extractor=extractor, device=device,
            )  # fmt: skip
            taken += 1
            self.position = end
            if self.position >= self.stop:
                self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The position (epoch, row, this epoch's order) and the generator's state."""
        return {
            "epoch": torch.tensor(self.epoch),
            "position": torch.tensor(self.position),
            "order": torch.from_numpy(self.order.copy()),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Continue from what :meth:`state_dict` returned."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.order = state["order"].numpy().astype(np.int64)
        self.generator.set_state(state["generator"].to(torch.uint8))


def _epoch_batches(data, rows, epochs, batch_size, generator, augmenter, extractor, device):
    """``epochs`` shuffled passes over ``rows``."""
    # A batch of one breaks BatchNorm in train mode; drop a last batch that small.
    drop_last = len(rows) % batch_size == 1 and len(rows) > 1
    for _ in range(epochs):
        yield from iterate_batches(
            data,
            rows,
            batch_size,
            generator,
            shuffle=True,
            augmenter=augmenter,
            extractor=extractor,
            drop_last=drop_last,
            device=device,
        )


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
    should_stop: Callable[[], None] | None = None,
    device: torch.device | str = "cpu",
    amp: str = "none",
    frozen_bn: bool = False,
    cursor: EpochCursor | None = None,
    max_batches: int | None = None,
) -> TrainStats:
    """Train in place for ``epochs`` over ``rows``, on ``device`` (where ``model`` is).

    With a ``cursor`` (``strategy=cyclic``): the cursor's next ``max_batches`` batches
    instead (all it has left: ``None``); ``epochs`` and ``generator`` are the cursor's.

    With ``prox_mu > 0`` the FedProx term ``mu/2 * ||w - w_start||^2`` ties the
    parameters to their values at the start of the call (the global model).
    ``should_stop()`` is called before every batch; it raises to end training.
    With ``frozen_bn`` every BatchNorm normalises with its running statistics and
    leaves them alone (FixBN after its warm-up); the affine parameters still learn.

    ``amp`` (``none``, ``bf16``, ``fp16``) runs the forward pass under autocast;
    the loss, the FedProx term and the optimiser step stay float32, and
    ``fp16`` scales the loss (a ``GradScaler`` per call). BatchNorm is not on
    autocast's lower-precision list: its parameters and running statistics stay
    float32 and are updated in float32.
    """
    start = time.perf_counter()
    device = torch.device(device)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    anchor = [p.detach().clone() for p in model.parameters()] if prox_mu > 0 else None
    model.train()
    if frozen_bn:
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.eval()
    # Sums kept on the device (no synchronisation per batch); float64 as Python floats were.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = steps = 0
    if cursor is None:
        batches = _epoch_batches(data, rows, epochs, batch_size, generator, augmenter,
                                 extractor, device)  # fmt: skip
    else:
        batches = cursor.batches(data, max_batches, augmenter, extractor, device)
    for x, y in batches:
        if should_stop is not None:
            should_stop()
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        objective = loss
        if anchor is not None:
            prox = sum(
                (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
            )
            objective = loss + 0.5 * prox_mu * prox
        if scaler is None:
            objective.backward()
            optimizer.step()
        else:
            scaler.scale(objective).backward()
            scaler.step(optimizer)
            scaler.update()
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        steps += 1
    return TrainStats(
        loss=float(loss_sum) / max(seen, 1),
        acc=int(correct) / max(seen, 1),
        num_examples=len(rows),
        seconds=time.perf_counter() - start,
        seen=seen,
        batches=steps,
    )


@dataclass
class EvalStats:
    """Loss, accuracy and confusion matrix (rows: true label, columns: predicted)."""

    loss: float
    acc: float
    num_examples: int
    confusion: np.ndarray
    rows: np.ndarray  # the dataset rows, in evaluation order
    correct: np.ndarray  # per row (same order): was the prediction right

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


def evaluation_order(rows: np.ndarray, seed: int | None) -> np.ndarray:
    """The order in which ``rows`` are evaluated.

    A seeded shuffle (the same for every arm of a seed), so the batches of
    train-mode evaluation mix the classes as a random test batch would. The
    cache stores examples grouped by class: ``seed=None`` gives that stored
    order, whose class-pure batches make train-mode accuracy meaningless; it
    is kept only to show that effect.
    """
    ordered = np.sort(np.asarray(rows))
    return ordered if seed is None else evaluation_rng(seed).permutation(ordered)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: CachedDataset,
    rows: np.ndarray,
    batch_size: int,
    mode: str = "eval",
    *,
    order_seed: int | None,
    device: torch.device | str = "cpu",
    keep_order: bool = False,
) -> EvalStats:
    """Evaluate on ``rows`` in :func:`evaluation_order` (train mode depends on the batches).

    On ``device``, where ``model`` is; predictions come back to the host once, at the end.
    ``keep_order``: evaluate ``rows`` in the order given instead (``order_seed`` unused).

    Raises
    ------
    ValueError
        If ``rows`` is empty: an accuracy of nothing is not 0.
    """
    if len(rows) == 0:
        raise ValueError("no examples to evaluate")
    net = norm_mode_model(model, mode)
    ordered = np.asarray(rows) if keep_order else evaluation_order(rows, order_seed)
    k = data.num_classes
    confusion = np.zeros((k, k), dtype=np.int64)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    predictions = []
    for x, y in iterate_batches(data, ordered, batch_size, device=device):
        lifecycle.raise_if_aborting()  # a run's final evaluation runs in a thread of its own
        logits = net(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        predictions.append(logits.argmax(1))
    predicted = torch.cat(predictions).cpu().numpy()
    labels = np.asarray(data.labels)[ordered]
    np.add.at(confusion, (labels, predicted), 1)
    n = int(confusion.sum())
    model.eval()
    acc = float(np.trace(confusion)) / n
    return EvalStats(float(loss_sum) / n, acc, n, confusion, ordered, predicted == labels)
