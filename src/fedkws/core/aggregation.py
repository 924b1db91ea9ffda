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

Server optimisers act on floating-point *parameters* only. Running statistics
are replaced by the example-weighted average of the clients' values (never
pushed through momentum or Adam, which can drive ``running_var`` negative),
and integer buffers (``num_batches_tracked``) stay integers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fedkws.core.models import bn_state_keys

BN_SYNC_MODES = ("full", "params_only", "local")
EVAL_MODES = ("eval", "train", "recalibrated")


@dataclass(frozen=True)
class KeyPlan:
    """The state-dict keys of one model, sorted by how they are aggregated."""

    params: tuple[str, ...]  # trainable floating-point parameters: server optimiser
    stats: tuple[str, ...]  # floating-point buffers (running stats): weighted average
    counters: tuple[str, ...]  # integer buffers (num_batches_tracked): rounded average
    local: tuple[str, ...]  # never leave the client

    @property
    def shared(self) -> tuple[str, ...]:
        """Every key that crosses the wire."""
        return self.params + self.stats + self.counters


def key_plan(model: nn.Module, bn_sync: str) -> KeyPlan:
    """Classify ``model``'s state-dict keys for ``bn_sync``."""
    if bn_sync not in BN_SYNC_MODES:
        raise ValueError(f"Unknown bn_sync '{bn_sync}'. Valid modes: {', '.join(BN_SYNC_MODES)}")
    state = model.state_dict()
    param_names = {name for name, _ in model.named_parameters()}
    bn_keys = bn_state_keys(model)
    params, stats, counters, local = [], [], [], []
    for key, value in state.items():
        if bn_sync == "local" and key in bn_keys:
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


class ServerOptimizer:
    """Server-side update rule of FedAvg, FedAvgM, FedAdam and FedYogi.

    All of them see the clients' averaged model as a pseudo-gradient
    ``delta = avg - global`` on the parameters:

    - ``fedavg`` / ``fedprox``: ``global += lr * delta`` (lr 1 is plain averaging)
    - ``fedavgm``: ``m = momentum * m + delta; global += lr * m``
    - ``fedadam``: ``m = b1 m + (1-b1) delta; v = b2 v + (1-b2) delta^2;
      global += lr * m / (sqrt(v) + tau)``
    - ``fedyogi``: as FedAdam with ``v -= (1-b2) delta^2 sign(v - delta^2)``

    (Reddi et al., 2021, "Adaptive Federated Optimization"; no bias correction,
    as there.)
    """

    RULES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi")

    def __init__(
        self,
        rule: str,
        lr: float = 1.0,
        momentum: float = 0.0,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        if rule not in self.RULES:
            raise ValueError(f"Unknown server rule '{rule}'. Valid rules: {', '.join(self.RULES)}")
        self.rule, self.lr, self.momentum = rule, lr, momentum
        self.beta_1, self.beta_2, self.tau = beta_1, beta_2, tau
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def step(
        self, params: Mapping[str, torch.Tensor], averaged: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """New parameter values from the current ones and the clients' average."""
        out = {}
        for key, current in params.items():
            cur = current.to(torch.float64)
            delta = averaged[key].to(torch.float64) - cur
            if self.rule in ("fedavg", "fedprox"):
                update = self.lr * delta
            elif self.rule == "fedavgm":
                m = self.m.get(key, torch.zeros_like(delta))
                m = self.momentum * m + delta
                self.m[key] = m
                update = self.lr * m
            else:
                m = self.m.get(key, torch.zeros_like(delta))
                v = self.v.get(key, torch.full_like(delta, self.tau**2))
                m = self.beta_1 * m + (1 - self.beta_1) * delta
                d2 = delta * delta
                if self.rule == "fedadam":
                    v = self.beta_2 * v + (1 - self.beta_2) * d2
                else:
                    v = v - (1 - self.beta_2) * d2 * torch.sign(v - d2)
                self.m[key], self.v[key] = m, v
                update = self.lr * m / (torch.sqrt(v) + self.tau)
            out[key] = (cur + update).to(current.dtype)
        return out

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Optimiser moments, for checkpoints."""
        return {"m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Restore moments saved by :meth:`state_dict`."""
        self.m = dict(state.get("m", {}))
        self.v = dict(state.get("v", {}))


def aggregate(
    global_state: Mapping[str, torch.Tensor],
    client_states: list[Mapping[str, torch.Tensor]],
    num_examples: list[int],
    plan: KeyPlan,
    optimizer: ServerOptimizer,
) -> dict[str, torch.Tensor]:
    """New global state from client replies given in a fixed order.

    Keys outside ``plan.shared`` keep their global value.
    """
    weights = [float(n) for n in num_examples]
    avg = weighted_average(client_states, weights, plan.shared)
    new = {k: v.clone() for k, v in global_state.items()}
    new.update(optimizer.step({k: global_state[k] for k in plan.params}, avg))
    for key in plan.stats:
        new[key] = avg[key].to(global_state[key].dtype)
    for key in plan.counters:
        new[key] = torch.round(avg[key]).to(global_state[key].dtype)
    return new
