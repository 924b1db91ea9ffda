"""The Flower ``ClientApp``: decode the message, call the core, encode the reply.

Every message carries a :class:`~fedkws.fl.messages.ClientTask` in
``content["config"]`` and, for train/evaluate/moments, the global model's
shared entries in ``content["model"]``. The app object captures nothing:
Flower sends it to the Ray actor with every message, so the data (the
memory-mapped cache and the client index file) is opened from paths named in
the task, once per worker process. The model runs on the task's ``device``;
what goes into a message or a file is always CPU tensors.

Message types:

``train``             local epochs from the global model; replies the shared keys.
                      Under ``strategy=cyclic``: one visit (its local epochs, or one
                      batch), continuing the client's own optimiser and epoch cursor.
``evaluate``          the global model on the client's local test split.
``query.hello``       the client's partition id (the server orders clients by it).
``query.bn_moments``  per-channel (count, sum, sum of squares) of one BatchNorm
                      layer's input over the local training data (a shared node:
                      of each client it serves, in one message).

Which client a message is for: the SuperNode's ``node_config["partition-id"]``
(one SuperNode per client), or, when a simulation runs fewer SuperNodes than
clients (``federation.supernodes``), the task's ``pid``. A node then serves many
clients in turn, so a client's own state lives in the run folder only, never
in the node's ``Context.state``.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedkws.core import loops, seeding
from fedkws.core.aggregation import keeps_client_state, key_plan
from fedkws.core.bn import ActivationCache, bn_input_moments
from fedkws.core.models import bn_layers, bn_state_keys, build_model
from fedkws.data.cache import CachedDataset, open_current, release_mapped_pages
from fedkws.fileio import torch_save
from fedkws.fl.arrays import to_record, to_state
from fedkws.fl.messages import ClientTask


def _release_pages_after(message: Message, context: Context, call_next) -> Message:
    """Answer the message, then unmap the cache pages it read (see ``release_pages``).

    A worker serves many clients in turn; without this its resident set grows with
    every client's rows it has ever read.
    """
    try:
        return call_next(message, context)
    finally:
        release_mapped_pages()


app = ClientApp(mods=[_release_pages_after])


def _not_routine(record: logging.LogRecord) -> bool:
    # Every simulation ends its Ray actors, and each then warns "Manually terminating
    # ClientAppActor" (forwarded to the run's console): nothing has gone wrong.
    return not record.getMessage().startswith("Manually terminating")


# This module is what every actor process imports to run fedkws's clients.
logging.getLogger("flwr").addFilter(_not_routine)

FEDBN_STATE = "fedbn"
CYCLIC_STATE = "cyclic"  # strategy=cyclic: own keys, optimiser state, epoch cursor


def cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as CPU tensors: what crosses the wire and what is saved, whatever the device."""
    return {k: v.detach().cpu() for k, v in state.items()}


def content(task: ClientTask | None, state: dict[str, torch.Tensor] | None) -> RecordDict:
    """Message content: the task and, optionally, model entries (as CPU tensors)."""
    records: dict = {}
    if task is not None:
        records["config"] = task.to_record()
    if state is not None:
        records["model"] = to_record(state)
    return RecordDict(records)


@lru_cache(maxsize=4)
def _client_rows_of(clients_file: str, stamp: tuple) -> dict[str, np.ndarray]:
    with np.load(clients_file) as npz:
        return {k: npz[k] for k in npz.files}


def _client_rows(clients_file: str) -> dict[str, np.ndarray]:
    """The partition file's rows; read again if the file was written since (another run's)."""
    st = os.stat(clients_file)
    return _client_rows_of(clients_file, (st.st_ino, st.st_size, st.st_mtime_ns))


def _data(task: ClientTask) -> CachedDataset:
    return open_current(task.cache_entry, task.feature_key)


def _rows(task: ClientTask, pid: int, which: str) -> np.ndarray:
    return _client_rows(task.clients_file)[f"{which}_{pid}"]


def _pid(task: ClientTask, context: Context) -> int:
    """The client this message is for: the task's ``pid``, else the node's partition."""
    if task.pid >= 0:
        return task.pid
    return int(context.node_config["partition-id"])


def client_state_file(state_dir: Path | str, pid: int | str, round_: int, name: str = FEDBN_STATE):
    """Where client ``pid`` keeps its own state ``name`` after round ``round_``."""
    return Path(state_dir) / f"client{pid}" / f"{name}_round{round_}.pt"


def _fedbn_file(task: ClientTask, pid: int, round_: int, name: str = FEDBN_STATE) -> Path:
    return client_state_file(task.state_dir, pid, round_, name)


def _fedbn_state(
    task: ClientTask, pid: int, context: Context, name: str = FEDBN_STATE
) -> dict[str, torch.Tensor]:
    """The client's own entries ``name`` from its last round (none before its first).

    ``fedbn``: all of BatchNorm's keys under FedBN, its buffers only under SiloBN.
    ``cyclic``: what :func:`_keep_cyclic` keeps.
    """
    if task.pid < 0 and name in context.state:
        return to_state(context.state[name])
    # A resumed run starts with empty node state, and a node serving many clients keeps
    # none: read what this client saved last, before this round (one listing of its
    # folder). A client never sampled so far still has its initial BatchNorm.
    folder = _fedbn_file(task, pid, 0, name).parent
    saved = {}
    for path in folder.glob(f"{name}_round*.pt") if folder.is_dir() else ():
        round_ = path.stem.removeprefix(f"{name}_round")
        if round_.isdigit() and 0 < int(round_) < task.round:
            saved[int(round_)] = path
    if not saved:
        return {}
    path = saved[max(saved)]
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - named, as the client's failure of this round
        from fedkws.checkpoint import why_unreadable

        raise RuntimeError(
            f"client {pid}'s own state {path} cannot be read ({why_unreadable(path, err)})"
        ) from None


def _model(task: ClientTask, message: Message, context: Context) -> torch.nn.Module:
    """The global model (with this client's own BatchNorm under FedBN/SiloBN) on its device."""
    torch.set_num_threads(task.threads)
    loops.set_determinism(task.deterministic)  # before this process's first CUDA operation
    model = build_model(**task.model)
    state = model.state_dict()
    state.update(to_state(message.content["model"]))
    if keeps_client_state(task.bn_sync):
        state.update(_fedbn_state(task, _pid(task, context), context))
    model.load_state_dict(state)
    return model.to(task.device)


def _digest(state: dict[str, torch.Tensor]) -> float:
    """A scalar fingerprint of a set of tensors (to check persistence from outside)."""
    total = 0.0
    for position, key in enumerate(sorted(state), start=1):
        total += position * float(state[key].double().abs().sum())
    return total


def _keep_fedbn(
    task: ClientTask, pid: int, context: Context, own: dict, name: str = FEDBN_STATE
) -> None:
    if task.pid < 0:  # the node is this client's alone
        context.state[name] = to_record(own)
    path = _fedbn_file(task, pid, task.round, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch_save(path, own)


def _cyclic_start(
    task: ClientTask,
    pid: int,
    context: Context,
    model: torch.nn.Module,
    optimizer,
    rows,
    generator: torch.Generator,
) -> loops.EpochCursor:
    """strategy=cyclic: this client's own keys, optimiser state and epoch cursor, installed.

    The keys that do not travel (``key_plan(...).local``: BatchNorm's buffers under
    ``params_only``, its every key under FedBN) are the client's own: as it ended its
    last visit, or the model's initial ones before its first. A round starts a new
    cursor on ``generator`` (seeded as any client's local training,
    ``client_training_generator``); a later visit of the round sets it where the
    last one left it.
    """
    saved = _fedbn_state(task, pid, context, CYCLIC_STATE)
    state = model.state_dict()
    state.update({k.removeprefix("model/"): v for k, v in saved.items() if k.startswith("model/")})
    model.load_state_dict(state)
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in saved.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            moments.setdefault(int(index), {})[name] = value
    if moments:
        full = optimizer.state_dict()
        optimizer.load_state_dict({**full, "state": moments})
    cursor = loops.EpochCursor(rows, task.batch_size, task.local_epochs, generator)
    if int(saved.get("cursor/round", -1)) == task.round:  # the same round: carry on
        cursor.load_state_dict({k.removeprefix("cursor/"): v for k, v in saved.items()
                                if k.startswith("cursor/")})  # fmt: skip
    return cursor


def _keep_cyclic(task, pid, context, own: dict, optimizer, cursor: loops.EpochCursor) -> None:
    """What a client carries from one visit to its next: own keys, optimiser, cursor.

    In ``Context.state`` after every visit; mirrored to ``client_state/`` once the
    client is through its round (a resumed run restarts at a round's start). Only
    the two newest files are kept: the newest may be of a round the server never
    checkpointed.
    """
    saved = {f"model/{k}": v for k, v in own.items()}
    for index, values in optimizer.state_dict()["state"].items():
        saved.update({f"optim/{index}/{name}": v.detach().cpu()
                      for name, v in values.items() if torch.is_tensor(v)})  # fmt: skip
    saved.update({f"cursor/{k}": v for k, v in cursor.state_dict().items()})
    saved["cursor/round"] = torch.tensor(task.round)
    if not cursor.done:
        context.state[CYCLIC_STATE] = to_record(saved)
        return
    _keep_fedbn(task, pid, context, saved, CYCLIC_STATE)
    folder = _fedbn_file(task, pid, task.round, CYCLIC_STATE).parent
    files = sorted(folder.glob(f"{CYCLIC_STATE}_round*.pt"),
                   key=lambda f: int(f.stem.rsplit("round", 1)[1]))  # fmt: skip
    for old in files[:-2]:
        old.unlink()


@app.train()
def train(message: Message, context: Context) -> Message:
    """Local training from the global model."""
    task = ClientTask.from_record(message.content["config"])
    pid, data = _pid(task, context), _data(task)
    model = _model(task, message, context)
    plan = key_plan(model, task.bn_sync)
    rows = _rows(task, pid, "train")
    optimizer = loops.make_optimizer(model.parameters(), task.optimizer_target,
                                     task.optimizer_kwargs)  # fmt: skip
    cursor = None
    generator = seeding.client_training_generator(task.seed, task.round, pid)
    if task.visit:  # strategy=cyclic: the cursor's generator, wherever it is in the round
        cursor = _cyclic_start(task, pid, context, model, optimizer, rows, generator)
    bn_keys = sorted(bn_state_keys(model))
    digest_in = _digest({k: model.state_dict()[k] for k in bn_keys})
    augmenter, extractor = loops.training_augmentation(task.augment, task.features, data)
    stats = loops.train_epochs(
        model,
        data,
        rows,
        epochs=task.local_epochs,
        batch_size=task.batch_size,
        optimizer=optimizer,
        generator=generator,
        augmenter=augmenter,
        extractor=extractor,
        prox_mu=task.prox_mu,
        frozen_bn=task.bn_frozen,
        device=task.device,
        amp=task.amp,
        cursor=cursor,
        max_batches=1 if task.visit == "batch" else None,
    )
    state = cpu_state(model.state_dict())
    if keeps_client_state(task.bn_sync):
        _keep_fedbn(task, pid, context, {k: state[k] for k in plan.local})
    if cursor is not None:
        _keep_cyclic(task, pid, context, {k: state[k] for k in plan.local}, optimizer, cursor)
    metrics = MetricRecord(
        {
            "num-examples": stats.num_examples,
            "pid": pid,
            "train_loss": stats.loss,
            "train_acc": stats.acc,
            "seconds": stats.seconds,
            "bn_digest_in": digest_in,
            "bn_digest_out": _digest({k: state[k] for k in bn_keys}),
            "seen": stats.seen,  # examples trained on by this call (cyclic: this visit)
            "batches": stats.batches,
            "batches_left": 0 if cursor is None else cursor.batches_left,
        }
    )
    shared = to_record({k: state[k] for k in plan.shared})
    return Message(RecordDict({"model": shared, "metrics": metrics}), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """The global model (with this client's BN under FedBN/SiloBN) on its local or the test split.

    A client without local test rows replies ``num-examples`` 0 and no accuracy.
    """
    task = ClientTask.from_record(message.content["config"])
    pid, data = _pid(task, context), _data(task)
    model = _model(task, message, context)
    if task.eval_split == "local":
        rows = _rows(task, pid, "test")
    else:
        rows = data.split_indices(task.eval_split)
    values: dict[str, float | int] = {"num-examples": len(rows), "pid": pid}
    for mode in task.eval_modes if len(rows) else ():
        stats = loops.evaluate(
            model, data, rows, task.eval_batch_size, mode, order_seed=task.seed, device=task.device
        )
        values[f"{mode}_acc"] = stats.acc
        values[f"{mode}_loss"] = stats.loss
    return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=message)


@app.query("hello")
def hello(message: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (-1: none; fine for a shared node)."""
    metrics = MetricRecord({"pid": int(context.node_config.get("partition-id", -1))})
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


@app.query("bn_moments")
def bn_moments(message: Message, context: Context) -> Message:
    """Moments of one BatchNorm layer's input over the local training data.

    For the message's client, or for each of ``task.pids`` (a shared node answers
    for all the clients it serves in one message): rows of ``count`` ``(clients,)``,
    ``sum`` and ``sumsq`` ``(clients, channels)``, in the order of ``pids``.
    """
    task = ClientTask.from_record(message.content["config"])
    if task.pids and keeps_client_state(task.bn_sync):  # one model for all: no own BatchNorm
        raise ValueError(f"a moments query for several clients under bn.sync={task.bn_sync}")
    pids = task.pids or (_pid(task, context),)
    model = _model(task, message, context)
    data, last = _data(task), task.layer == len(bn_layers(model)) - 1
    counts, sums, sumsqs = [], [], []
    for pid in pids:
        # Segment inputs are kept between this client's layer queries (in the run folder,
        # so whichever worker process gets the next query resumes from them); the last
        # layer drops them.
        cache = ActivationCache(Path(task.state_dir) / "activations" / f"client{pid}")
        try:
            n, s, ss = bn_input_moments(
                model, data, _rows(task, pid, "train"), task.layer, task.eval_batch_size, cache,
                device=task.device,
            )  # fmt: skip
        except Exception as err:
            raise RuntimeError(f"client {pid}: {type(err).__name__}: {err}") from err
        if last:
            cache.clear()
        if len(pids) > 1:
            release_mapped_pages()  # one client's rows at a time stay mapped, as per message
        counts.append(n)
        sums.append(s.cpu())
        sumsqs.append(ss.cpu())
    moments = {
        "count": torch.tensor(counts, dtype=torch.float64),
        "sum": torch.stack(sums),
        "sumsq": torch.stack(sumsqs),
    }
    arrays = to_record(moments)
    reply = RecordDict({"moments": arrays, "metrics": MetricRecord({"pids": list(pids)})})
    return Message(reply, reply_to=message)
