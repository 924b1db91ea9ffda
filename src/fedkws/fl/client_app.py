"""The Flower ``ClientApp``: local training, local evaluation, BatchNorm moments.

Every message carries its task as JSON in ``content["config"]["task"]`` and,
for train/evaluate/moments, the global model's shared entries in
``content["model"]``. The app object captures nothing: Flower sends it to
the Ray actor with every message, so the data (the memory-mapped cache and
the client index file) is opened from paths named in the task, once per
worker process.

Message types:

``train``           local epochs from the global model; replies the shared keys.
``evaluate``        the global model on the client's local test split.
``query.hello``     the client's partition id (the server orders clients by it).
``query.bn_moments``  per-channel (count, sum, sum of squares) of one BatchNorm
                    layer's input over the local training data.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedkws.data.cache import CachedDataset, open_cache
from fedkws.fl import engine
from fedkws.fl.state import key_plan
from fedkws.models import bn_state_keys, build_model

app = ClientApp()

FEDBN_STATE = "fedbn"


def task_of(message: Message) -> dict[str, Any]:
    """The task dictionary sent by the server."""
    return json.loads(str(message.content["config"]["task"]))


def task_content(task: dict[str, Any], state: dict[str, torch.Tensor] | None) -> RecordDict:
    """Message content for ``task`` and, optionally, model entries."""
    records: dict[str, Any] = {"config": ConfigRecord({"task": json.dumps(task)})}
    if state is not None:
        records["model"] = ArrayRecord(torch_state_dict=state)
    return RecordDict(records)


@lru_cache(maxsize=4)
def _client_rows(clients_file: str) -> dict[str, np.ndarray]:
    with np.load(clients_file) as npz:
        return {k: npz[k] for k in npz.files}


def _data(task: dict[str, Any]) -> CachedDataset:
    return open_cache(task["cache"]["entry"], task["cache"]["feature_key"])


def _rows(task: dict[str, Any], pid: int, which: str) -> np.ndarray:
    return _client_rows(task["clients_file"])[f"{which}_{pid}"]


def _pid(context: Context) -> int:
    return int(context.node_config["partition-id"])


def _fedbn_file(task: dict[str, Any], pid: int, round_: int) -> Path:
    return Path(task["state_dir"]) / f"client{pid}" / f"fedbn_round{round_}.pt"


def _latest_fedbn_file(task: dict[str, Any], pid: int, up_to: int) -> Path | None:
    """The client's most recent saved FedBN state from a round <= ``up_to``."""
    for round_ in range(up_to, 0, -1):
        path = _fedbn_file(task, pid, round_)
        if path.is_file():
            return path
    return None


def _model(task: dict[str, Any], message: Message, context: Context) -> torch.nn.Module:
    """The global model, with this client's own BatchNorm state under FedBN."""
    torch.set_num_threads(int(task.get("threads", 1)))
    model = build_model(**task["model"])
    state = model.state_dict()
    state.update(message.content["model"].to_torch_state_dict())
    if task["bn_sync"] == "local":
        state.update(_fedbn_state(task, _pid(context), context))
    model.load_state_dict(state)
    return model


def _fedbn_state(task: dict[str, Any], pid: int, context: Context) -> dict[str, torch.Tensor]:
    """The client's own BatchNorm entries from its last round (none before its first)."""
    if FEDBN_STATE in context.state:
        return context.state[FEDBN_STATE].to_torch_state_dict()
    # A resumed run starts with empty node state: read what this client saved
    # last. A client never sampled so far still has its initial BatchNorm.
    path = _latest_fedbn_file(task, pid, int(task["round"]) - 1)
    return {} if path is None else torch.load(path, weights_only=True)


def _digest(state: dict[str, torch.Tensor]) -> float:
    """A scalar fingerprint of a set of tensors (to check persistence from outside)."""
    total = 0.0
    for position, key in enumerate(sorted(state), start=1):
        total += position * float(state[key].double().abs().sum())
    return total


@app.train()
def train(message: Message, context: Context) -> Message:
    """Local training from the global model."""
    task = task_of(message)
    pid = _pid(context)
    data = _data(task)
    model = _model(task, message, context)
    plan = key_plan(model, task["bn_sync"])
    bn_keys = sorted(bn_state_keys(model))
    digest_in = _digest({k: model.state_dict()[k] for k in bn_keys})

    augmenter, extractor = engine.training_augmentation(task, data)
    generator = engine.make_generator(int(task["seed"]), int(task["round"]), pid)
    optimizer = engine.optimizer_factory(task["optimizer"])(model.parameters())
    stats = engine.train_epochs(
        model,
        data,
        _rows(task, pid, "train"),
        epochs=int(task["local_epochs"]),
        batch_size=int(task["batch_size"]),
        optimizer=optimizer,
        generator=generator,
        augmenter=augmenter,
        extractor=extractor,
        prox_mu=float(task.get("prox_mu", 0.0)),
    )
    state = model.state_dict()
    if task["bn_sync"] == "local":
        own = {k: state[k] for k in plan.local}
        context.state[FEDBN_STATE] = ArrayRecord(torch_state_dict=own)
        path = _fedbn_file(task, pid, int(task["round"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(own, path)
    metrics = MetricRecord(
        {
            "num-examples": stats.num_examples,
            "pid": pid,
            "train_loss": stats.loss,
            "train_acc": stats.acc,
            "seconds": stats.seconds,
            "bn_digest_in": digest_in,
            "bn_digest_out": _digest({k: state[k] for k in bn_keys}),
        }
    )
    shared = ArrayRecord(torch_state_dict={k: state[k] for k in plan.shared})
    return Message(RecordDict({"model": shared, "metrics": metrics}), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """The global model (with this client's BN under FedBN) on the local test split."""
    task = task_of(message)
    pid = _pid(context)
    model = _model(task, message, context)
    rows = _rows(task, pid, "test")
    values: dict[str, float | int] = {"num-examples": len(rows), "pid": pid}
    for mode in task["eval_modes"]:
        stats = engine.evaluate(model, _data(task), rows, int(task["eval_batch_size"]), mode)
        values[f"{mode}_acc"] = stats.acc
        values[f"{mode}_loss"] = stats.loss
    return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=message)


@app.query("hello")
def hello(message: Message, context: Context) -> Message:
    """Tell the server which partition this node holds."""
    metrics = MetricRecord({"pid": _pid(context)})
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


@app.query("bn_moments")
def bn_moments(message: Message, context: Context) -> Message:
    """Moments of one BatchNorm layer's input over the local training data."""
    task = task_of(message)
    pid = _pid(context)
    model = _model(task, message, context)
    n, s, ss = engine.bn_input_moments(
        model,
        _data(task),
        _rows(task, pid, "train"),
        int(task["layer"]),
        int(task["eval_batch_size"]),
    )
    arrays = ArrayRecord(
        torch_state_dict={"count": torch.tensor([n], dtype=torch.float64), "sum": s, "sumsq": ss}
    )
    return Message(
        RecordDict({"moments": arrays, "metrics": MetricRecord({"pid": pid})}), reply_to=message
    )
