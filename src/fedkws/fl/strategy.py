"""Flower's own strategies as the server rule of a federated run.

fedkws keeps its round loop (seeded sampling by partition id, failures,
resume) and asks a strategy of :mod:`flwr.serverapp.strategy` for the
parameter update only, through the strategy's public API, exactly as
``Strategy.start`` drives it: ``configure_train`` with the current global
arrays (the strategy records them: FedOpt's ``current_arrays``, FedAvgM's,
QFedAvg's), then ``aggregate_train`` with one reply ``Message`` per client,
in partition-id order, carrying that client's floating-point parameters and
a ``MetricRecord`` with ``num-examples``, ``train_loss`` and ``train_acc``.

What reaches the strategy is decided in the Flower-free core
(:func:`fedkws.core.aggregation.aggregate`): ``KeyPlan.params`` only. BatchNorm
running statistics and ``num_batches_tracked`` never do; fedkws combines them
itself (:func:`fedkws.core.aggregation.combine_buffers`).

The strategy's server state (FedAdam/FedYogi/FedAdagrad ``m_t``/``v_t``,
FedAvgM's ``momentum_vector``, ...) lives in attributes of the strategy
object; :meth:`FlowerServerRule.state_dict` saves every attribute that is not
a constructor argument as tensors and plain values (checkpoints are read with
``weights_only=True``), :meth:`FlowerServerRule.load_state_dict` puts them back.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import random
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower
from flwr.serverapp.strategy import Strategy
from flwr.supercore.task_identity import TaskIdentity

from fedkws.fl.arrays import to_record, to_state

log = logging.getLogger(__name__)

# Constructor arguments fedkws sets itself: it samples the clients (strategy.fraction_train,
# strategy.min_train_clients) and builds the replies; none of them is the user's to set.
MANAGED = {
    "fraction_train": 1.0,
    "fraction_evaluate": 1.0,
    "min_train_nodes": 1,
    "min_evaluate_nodes": 1,
    "min_available_nodes": 1,
    "weighted_by_key": "num-examples",
    "arrayrecord_key": "arrays",
    "configrecord_key": "config",
    "train_metrics_aggr_fn": None,
    "evaluate_metrics_aggr_fn": None,
}

UNSUPPORTED = {
    "Strategy": "the abstract base class",
    "FedXgbBagging": "aggregates XGBoost models (bytes), not tensors",
    "FedXgbCyclic": "aggregates XGBoost models (bytes), not tensors",
    **{
        name: "a wrapper around another strategy object (not constructible from config)"
        for name in dir(flower)
        if name.startswith("DifferentialPrivacy")
    },
}

# State attributes that are the global model itself, which ``configure_train`` records
# again from fedkws's model every round (FedAvgM: whenever it holds none, i.e. after a
# restore); saving them would store a second copy of the model in every checkpoint.
_NOT_STATE = ("current_arrays",)


def available() -> tuple[str, ...]:
    """Names of the strategy classes of ``flwr.serverapp.strategy`` fedkws can drive."""
    return tuple(
        name
        for name in sorted(dir(flower))
        if inspect.isclass(obj := getattr(flower, name))
        and issubclass(obj, Strategy)
        and name not in UNSUPPORTED
    )


def strategy_class(name: str) -> type[Strategy]:
    """The class ``flwr.serverapp.strategy.<name>``; ValueError if fedkws cannot drive it."""
    if name in UNSUPPORTED:
        raise ValueError(f"{name} is not supported: {UNSUPPORTED[name]}")
    if name not in available():
        raise ValueError(f"must be one of {', '.join(available())}")
    return getattr(flower, name)


def _constructor_params(cls: type) -> dict[str, inspect.Parameter]:
    """Every named constructor argument along the class's MRO (the subclass's first)."""
    out: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        for name, param in inspect.signature(klass.__init__).parameters.items():
            if name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                out.setdefault(name, param)
    return out


def kwargs_problems(class_name: str, kwargs: Mapping[str, Any]) -> list[str]:
    """One line per bad ``strategy.kwargs`` entry for ``class_name`` (empty: all fine).

    Checked against the constructor signature: unknown arguments, arguments
    fedkws manages, missing required ones; then the class is built once, so
    its own checks (e.g. FedTrimmedAvg's ``beta`` range) are reported too.
    """
    try:
        cls = strategy_class(class_name)
    except ValueError as err:
        return [f"strategy.class_name={class_name!r}: {err}"]
    own = inspect.signature(cls.__init__).parameters
    lines = []
    for key, value in kwargs.items():
        if key in MANAGED:
            lines.append(
                f"strategy.kwargs.{key}={value!r}: set by fedkws, which samples the clients "
                "itself (use strategy.fraction_train, strategy.min_train_clients)"
            )
        elif key not in own:
            allowed = ", ".join(k for k in own if k != "self" and k not in MANAGED)
            lines.append(
                f"strategy.kwargs.{key}={value!r}: not an argument of {class_name} "
                f"(its arguments: {allowed or 'none beyond those fedkws sets'})"
            )
        elif wrong := _wrong_kind(value, own[key].default) or _out_of_range(key, value):
            lines.append(f"strategy.kwargs.{key}={value!r}: {wrong}")
    for key, param in own.items():
        if key != "self" and param.default is param.empty and key not in kwargs:
            lines.append(f"strategy.kwargs.{key}=None: required by {class_name}")
    if not lines:
        try:
            build_strategy(class_name, kwargs)
        except (TypeError, ValueError) as err:
            lines.append(f"strategy.kwargs={dict(kwargs)!r}: {class_name} refused them: {err}")
    return lines


# The server optimisers' (FedAdam, FedYogi, FedAdagrad, FedAvgM) step sizes and moment
# decays, which their constructors take as given: a negative step size ascends the loss.
_POSITIVE_ARGS = ("eta", "eta_l", "tau", "server_learning_rate")
_DECAY_ARGS = ("beta_1", "beta_2", "server_momentum")


def _out_of_range(key: str, value: Any) -> str | None:
    """Why a step size or decay is out of its range (None: in range, or not one of them)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # a wrong kind is _wrong_kind's to say
    if key in _POSITIVE_ARGS and not (math.isfinite(value) and value > 0):
        return "must be a finite number > 0"
    if key in _DECAY_ARGS and not 0 <= value < 1:
        return "must be in [0, 1)"
    return None


def _wrong_kind(value: Any, default: Any) -> str | None:
    """Why ``value`` cannot stand where the constructor's ``default`` is (None: it can).

    A number's place takes a number, a flag's a true/false, a string's a string; other
    defaults (None, objects) are not judged here. The class itself is not built with a
    wrong kind: a few of them (FedAdam's ``eta``) accept a string and fail only when
    they aggregate, after the first round.
    """
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(default, int):  # 2.0 too: Krum's counts slice arrays, after round 1
        return None if isinstance(value, int) and not isinstance(value, bool) else (
            "must be an integer")  # fmt: skip
    if isinstance(default, float):
        return None if is_number else "must be a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "must be a string"
    return None


def build_strategy(class_name: str, kwargs: Mapping[str, Any]) -> Strategy:
    """``flwr.serverapp.strategy.<class_name>(**kwargs)`` with fedkws's managed arguments."""
    cls = strategy_class(class_name)
    own = inspect.signature(cls.__init__).parameters
    managed = {k: v for k, v in MANAGED.items() if k in own and v is not None}
    with _quiet():
        return cls(**managed, **dict(kwargs))


class _Nodes:
    """What ``configure_train`` needs of a Grid: the node ids (here: partition ids)."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Flower's per-call INFO lines off (warnings stay); Python's global RNG untouched.

    ``configure_train`` samples nodes with ``random.sample``; fedkws has already
    chosen the clients, so that draw must not move the global stream.
    """
    flwr_log = logging.getLogger("flwr")
    level, rng = flwr_log.level, random.getstate()
    flwr_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        flwr_log.setLevel(level)
        random.setstate(rng)


def _ensure_task_identity() -> None:
    # Messages read the sender's identity from this process-wide record; Flower sets
    # it in a real ServerApp process, tests and offline use have none.
    for name in ("_run_id", "_node_id", "_task_id"):
        if getattr(TaskIdentity, name) is None:
            setattr(TaskIdentity, name, 0)


class FlowerServerRule:
    """A Flower strategy as :data:`fedkws.core.aggregation.ParamUpdate`, with its state."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.skipped_rounds: list[int] = []  # rounds the strategy returned no arrays for

    @classmethod
    def from_spec(cls, class_name: str, kwargs: Mapping[str, Any]) -> FlowerServerRule:
        """Build ``flwr.serverapp.strategy.<class_name>(**kwargs)``."""
        return cls(build_strategy(class_name, kwargs))

    def update(
        self,
        server_round: int,
        global_params: Mapping[str, torch.Tensor],
        client_params: list[Mapping[str, torch.Tensor]],
        num_examples: list[int],
        *,
        node_ids: list[int] | None = None,
        metrics: list[Mapping[str, float]] | None = None,
    ) -> dict[str, torch.Tensor] | None:
        """New parameters from the strategy, or None when it returns no arrays.

        ``client_params`` (and ``node_ids``, ``metrics``) are in partition-id
        order; the replies reach ``aggregate_train`` in that order.
        """
        _ensure_task_identity()
        node_ids = list(range(len(client_params))) if node_ids is None else list(node_ids)
        metrics = metrics or [{} for _ in client_params]
        with _quiet():
            sent = self.strategy.configure_train(
                server_round, to_record(global_params), ConfigRecord(), _Nodes(node_ids)
            )
            instruction = {m.metadata.dst_node_id: m for m in sent}
            replies = []
            for node, params, n, extra in zip(
                node_ids, client_params, num_examples, metrics, strict=True
            ):
                values = {**{k: float(v) for k, v in extra.items()}, "num-examples": int(n)}
                content = RecordDict({"arrays": to_record(params), "metrics": MetricRecord(values)})
                replies.append(Message(content, reply_to=instruction[node]))
            arrays, _ = self.strategy.aggregate_train(server_round, replies)
        if arrays is None:
            self.skipped_rounds.append(server_round)
            log.debug(
                "round %d: %s returned no model; the global model is kept",
                server_round, type(self.strategy).__name__,
            )  # fmt: skip
            return None
        return dict(to_state(arrays))

    # -- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The strategy's server state as tensors and plain values (``weights_only`` safe)."""
        params = _constructor_params(type(self.strategy))
        state = {}
        for name, value in vars(self.strategy).items():
            if name in params or name in _NOT_STATE:
                continue
            encoded = _encode(value)
            if encoded is not None:
                state[name] = encoded
        return {"class_name": type(self.strategy).__name__, "state": state}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (an empty mapping: a fresh strategy)."""
        if not saved:
            return
        name = type(self.strategy).__name__
        if saved.get("class_name") != name:
            raise ValueError(f"checkpoint holds {saved.get('class_name')}'s state, not {name}'s")
        for attr, encoded in saved["state"].items():
            setattr(self.strategy, attr, _decode(encoded))


def _encode(value: Any) -> dict[str, Any] | None:
    """A strategy attribute as tensors and plain values; None for what is not state."""
    if isinstance(value, np.ndarray | np.generic):  # (before float: np.float64 is a float)
        return {"kind": "ndarray", "value": torch.from_numpy(np.array(value, copy=True))}
    if value is None or isinstance(value, bool | int | float | str):
        return {"kind": "plain", "value": value}
    if isinstance(value, ArrayRecord):
        keys = list(value.keys())
        return {
            "kind": "arrayrecord",
            "keys": keys,
            "value": _tensors(value[k].numpy() for k in keys),
        }
    if isinstance(value, dict) and all(isinstance(v, np.ndarray) for v in value.values()):
        return {"kind": "dict", "keys": list(value), "value": _tensors(value.values())}
    if isinstance(value, list | tuple) and all(isinstance(v, np.ndarray) for v in value):
        return {"kind": "list", "value": _tensors(value)}
    return None


def _tensors(arrays) -> list[torch.Tensor]:
    return [torch.from_numpy(np.array(a, copy=True)) for a in arrays]


def _decode(encoded: Mapping[str, Any]) -> Any:
    kind, value = encoded["kind"], encoded["value"]
    if kind == "plain":
        return value
    if kind == "ndarray":
        array = value.numpy().copy()
        return array if array.ndim else array[()]
    arrays = [t.numpy().copy() for t in value]
    if kind == "list":
        return arrays
    if kind == "dict":
        return dict(zip(encoded["keys"], arrays, strict=True))
    return ArrayRecord(
        OrderedDict((k, Array(a)) for k, a in zip(encoded["keys"], arrays, strict=True))
    )
