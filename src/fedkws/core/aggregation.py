"""What crosses the wire under each BatchNorm handling, and how it is aggregated.

``bn_sync``:

``full``
    Every state-dict entry (parameters and buffers) travels both ways.
``params_only``
    Only ``nn.Parameter`` entries travel. The server's BatchNorm buffers are
    never updated: they stay at mean 0 / var 1, which is the bug behind the
    2020 tutorial's 16 % eval-mode accuracy.
``local``
    FedBN: no key of a BatchNorm module (affine parameters, running
    statistics, ``num_batches_tracked``) travels in either direction.
``silo``
    SiloBN (Andreux et al., 2020, arXiv 2008.07424): BatchNorm's affine
    parameters travel and are aggregated like every other parameter; its
    buffers (running statistics, ``num_batches_tracked``) never leave the
    client.

Under ``local`` and ``silo`` each client keeps its own BatchNorm state across
rounds (:func:`keeps_client_state`).

The server rule (a Flower strategy, :mod:`fedkws.fl.strategy`) acts on
floating-point *parameters* only: :func:`aggregate` splits a model state and
hands it ``plan.params``. Running statistics are replaced by the
example-weighted average of the clients' values (never pushed through
momentum, Adam or a robust aggregator, which can drive ``running_var``
negative or pick one client's statistics), and integer buffers
(``num_batches_tracked``) stay integers (:func:`combine_buffers`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fedkws.core.models import bn_state_keys

BN_SYNC_MODES = ("full", "params_only", "local", "silo", "fixbn")
EVAL_MODES = ("eval", "train", "recalibrated")


@dataclass(frozen=True)
class KeyPlan:
    """The state-dict keys of one model, sorted by how they are aggregated."""

    params: tuple[str, ...]  # trainable floating-point parameters: the server rule
    stats: tuple[str, ...]  # floating-point buffers (running stats): weighted average
    counters: tuple[str, ...]  # integer buffers (num_batches_tracked): rounded average
    local: tuple[str, ...]  # never leave the client

    @property
    def shared(self) -> tuple[str, ...]:
        """Every key that crosses the wire."""
        return self.params + self.stats + self.counters


def keeps_client_state(bn_sync: str) -> bool:
    """Whether each client keeps BatchNorm state of its own across rounds (FedBN, SiloBN).

    Such a model is evaluated per client (its local test split, and at the end
    each client's personalised model on the shared test split), never with
    the server's BatchNorm buffers.
    """
    return bn_sync in ("local", "silo")


def _client_bn_keys(model: nn.Module, bn_sync: str, param_names: set[str]) -> set[str]:
    """The BatchNorm keys each client keeps for itself under ``bn_sync``."""
    if bn_sync == "local":
        return bn_state_keys(model)
    if bn_sync == "silo":
        return bn_state_keys(model) - param_names
    return set()


def key_plan(model: nn.Module, bn_sync: str) -> KeyPlan:
    """Classify ``model``'s state-dict keys for ``bn_sync``."""
    if bn_sync not in BN_SYNC_MODES:
        raise ValueError(f"Unknown bn_sync '{bn_sync}'. Valid modes: {', '.join(BN_SYNC_MODES)}")
    state = model.state_dict()
    param_names = {name for name, _ in model.named_parameters()}
    own = _client_bn_keys(model, bn_sync, param_names)
    params, stats, counters, local = [], [], [], []
    for key, value in state.items():
        if key in own:
            local.append(key)
        elif key in param_names:
            params.append(key)
        elif bn_sync == "params_only":
            local.append(key)
        elif value.is_floating_point():
            stats.append(key)
        else:
            counters.append(key)
    return KeyPlan(tuple(params), tuple(stats), tuple(counters), tuple(local))


def select(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The entries of ``state`` named by ``keys`` (detached copies)."""
    return {k: state[k].detach().clone() for k in keys}


def weighted_average(
    states: list[Mapping[str, torch.Tensor]], weights: list[float], keys: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Example-weighted average, accumulated in float64 in the given (fixed) order."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("cannot average states with zero total weight")
    out = {}
    for key in keys:
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for state, w in zip(states, weights, strict=True):
            acc += state[key].to(torch.float64) * (w / total)
        out[key] = acc
    return out


ParamUpdate = Callable[
    [dict[str, torch.Tensor], list[dict[str, torch.Tensor]], list[int]],
    Mapping[str, torch.Tensor] | None,
]
"""The server rule on parameters: ``(global, clients, num_examples) -> new`` (None: keep)."""


def average_params(
    global_params: Mapping[str, torch.Tensor],
    client_params: list[Mapping[str, torch.Tensor]],
    num_examples: list[int],
) -> dict[str, torch.Tensor]:
    """The plain FedAvg rule (example-weighted mean), for tests and as a reference."""
    return weighted_average(client_params, [float(n) for n in num_examples], global_params)


def combine_buffers(
    global_state: Mapping[str, torch.Tensor],
    client_states: list[Mapping[str, torch.Tensor]],
    num_examples: list[int],
    plan: KeyPlan,
) -> dict[str, torch.Tensor]:
    """The non-parameter entries that cross the wire, combined by fedkws itself.

    Running statistics (``plan.stats``): the example-weighted average, in the
    global dtype. Integer buffers (``plan.counters``): the rounded weighted
    average, still integers. Whatever the server rule is (a momentum, Adam, a
    median, Krum), statistics never go through it.
    """
    weights = [float(n) for n in num_examples]
    avg = weighted_average(client_states, weights, plan.stats + plan.counters)
    out = {key: avg[key].to(global_state[key].dtype) for key in plan.stats}
    for key in plan.counters:
        out[key] = torch.round(avg[key]).to(global_state[key].dtype)
    return out


def aggregate(
    global_state: Mapping[str, torch.Tensor],
    client_states: list[Mapping[str, torch.Tensor]],
    num_examples: list[int],
    plan: KeyPlan,
    update_params: ParamUpdate,
) -> dict[str, torch.Tensor]:
    """New global state from client replies given in a fixed (partition-id) order.

    ``update_params`` (the server rule, e.g. a Flower strategy) sees the
    floating-point parameters ``plan.params`` only, copies of them; buffers are
    combined by :func:`combine_buffers`; keys outside ``plan.shared`` keep their
    global value. If the rule returns None (it declined the round, as Flower's
    Bulyan does with too few replies) the whole global state is kept.
    """
    new = {k: v.clone() for k, v in global_state.items()}
    params = update_params(
        select(global_state, plan.params),
        [select(state, plan.params) for state in client_states],
        list(num_examples),
    )
    if params is None:
        return new
    if set(params) != set(plan.params):
        raise ValueError(
            f"the server rule returned keys {sorted(set(params) ^ set(plan.params))[:5]}"
        )
    for key in plan.params:
        ref = global_state[key]
        new[key] = torch.as_tensor(params[key]).reshape(ref.shape).to(ref.dtype)
    new.update(combine_buffers(global_state, client_states, num_examples, plan))
    return new
