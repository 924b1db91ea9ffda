"""Centralised baseline: the same data, features, augmentation, model and optimiser, no federation.

The training rows are the union of the clients' local training rows, so the
baseline sees exactly the examples the federation sees. One "round" is
``local_epochs`` epochs, so its curve lines up with the federated ones.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from torch import nn

from fedkws.data.cache import CachedDataset
from fedkws.fl import engine
from fedkws.fl.evaluation import GlobalEvaluator
from fedkws.fl.server_app import RoundCallback


def train_central(
    model: nn.Module,
    data: CachedDataset,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    task: dict[str, Any],
    evaluator: GlobalEvaluator,
    rounds: int,
    start_round: int,
    on_round: RoundCallback,
    optimizer_state: dict[str, Any] | None = None,
    stop_after_round: int | None = None,
) -> None:
    """Train and evaluate ``rounds`` times; ``on_round`` records and checkpoints."""
    optimizer = engine.optimizer_factory(task["optimizer"])(model.parameters())
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    augmenter, extractor = engine.training_augmentation(task, data)
    last = rounds if stop_after_round is None else min(rounds, stop_after_round)
    for round_ in range(start_round, last + 1):
        start = time.perf_counter()
        stats = engine.train_epochs(
            model,
            data,
            train_rows,
            epochs=int(task["local_epochs"]),
            batch_size=int(task["batch_size"]),
            optimizer=optimizer,
            generator=engine.make_generator(int(task["seed"]), round_, 0xCE47),
            augmenter=augmenter,
            extractor=extractor,
        )
        metrics = {"train/loss": stats.loss, "train/acc": stats.acc}
        metrics["time/train_s"] = time.perf_counter() - start
        eval_start = time.perf_counter()
        metrics.update(evaluator.run(model, val_rows, "val")[0])
        metrics["time/eval_s"] = time.perf_counter() - eval_start
        on_round(round_, metrics, {}, model, optimizer)
