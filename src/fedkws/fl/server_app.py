"""The Flower ``ServerApp``: sampling, aggregation, evaluation, one round at a time.

The strategies (FedAvg, FedAvgM, FedProx, FedAdam, FedYogi) are implemented
here over Flower's Message API rather than taken from ``flwr.serverapp``:
Flower's built-in strategies apply the server optimiser to every array,
running statistics included, which is the NaN bug this project studies
(Flower #1060), and aggregate replies in arrival order. Here

- clients are sampled by partition id from a (seed, round) stream,
- replies are aggregated in partition-id order, never arrival order,
- only floating-point parameters go through the server optimiser
  (see :mod:`fedkws.fl.state`),

so a run is reproducible and resumable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from torch import nn

from fedkws.data.cache import CachedDataset
from fedkws.fl import engine
from fedkws.fl.client_app import task_content
from fedkws.fl.evaluation import GlobalEvaluator
from fedkws.fl.state import KeyPlan, ServerOptimizer, aggregate
from fedkws.models import bn_state_keys

log = logging.getLogger(__name__)

# on_round(round, metrics, per-client info, model, server optimiser)
RoundCallback = Callable[[int, dict[str, float], dict[str, dict[str, float]], nn.Module, Any], None]


@dataclass
class FederationPlan:
    """Plain settings of one federated run."""

    task: dict[str, Any]  # what every client message carries (round/layer added per message)
    num_clients: int
    rounds: int
    start_round: int
    fraction_train: float
    min_train_clients: int
    eval_modes: list[str]
    recalibrate_every: int
    federated_eval: bool
    seed: int
    stop_after_round: int | None = None
    node_wait_s: float = 120.0


class ClientError(RuntimeError):
    """A client replied with an error instead of a result."""


class Federation:
    """The server side of a run; :meth:`main` is the ServerApp's main function."""

    def __init__(
        self,
        plan: FederationPlan,
        model: nn.Module,
        key_plan: KeyPlan,
        server_optimizer: ServerOptimizer,
        data: CachedDataset,
        val_rows: np.ndarray,
        on_round: RoundCallback,
    ) -> None:
        self.plan, self.model, self.keys = plan, model, key_plan
        self.server_optimizer, self.val_rows, self.on_round = server_optimizer, val_rows, on_round
        # Server-side validation; "recalibrated" pools the clients' moments via queries.
        self.evaluator = GlobalEvaluator(
            data, plan.eval_modes, int(plan.task["eval_batch_size"]), moments_of=self.moments
        )
        self.bn_keys = bn_state_keys(model)
        self.nodes: dict[int, int] = {}  # partition id -> node id
        self.grid: Grid | None = None
        self.completed_round = plan.start_round - 1

    # -- messaging ---------------------------------------------------------------------------

    def _send(
        self, message_type: str, pids: list[int], task: dict[str, Any], state: dict | None
    ) -> list[Message]:
        assert self.grid is not None
        content = task_content(task, state)
        messages = [
            Message(content=content, dst_node_id=self.nodes[pid], message_type=message_type)
            for pid in pids
        ]
        replies = list(self.grid.send_and_receive(messages))
        for reply in replies:
            if reply.has_error():
                raise ClientError(
                    f"{message_type} failed on a client: {reply.error.reason} "
                    f"(code {reply.error.code})"
                )
        # Fixed order: by partition id, whatever order the replies arrived in.
        return sorted(replies, key=lambda r: int(r.content["metrics"]["pid"]))

    def _discover(self) -> None:
        assert self.grid is not None
        deadline = time.monotonic() + self.plan.node_wait_s
        while len(node_ids := list(self.grid.get_node_ids())) < self.plan.num_clients:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(node_ids)} of {self.plan.num_clients} clients came up"
                )
            time.sleep(0.2)
        messages = [
            Message(content=task_content({}, None), dst_node_id=node, message_type="query.hello")
            for node in node_ids
        ]
        for reply in self.grid.send_and_receive(messages):
            if reply.has_error():
                raise ClientError(f"query.hello failed: {reply.error.reason}")
            self.nodes[int(reply.content["metrics"]["pid"])] = reply.metadata.src_node_id
        missing = sorted(set(range(self.plan.num_clients)) - set(self.nodes))
        if missing:
            raise RuntimeError(f"no node answered for partitions {missing}")

    def _shared_state(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        return {k: state[k] for k in self.keys.shared}

    # -- one round -----------------------------------------------------------------------------

    def sample(self, round_: int) -> list[int]:
        """Partition ids trained in ``round_`` (a pure function of seed and round)."""
        n = self.plan.num_clients
        k = min(n, max(self.plan.min_train_clients, int(round(self.plan.fraction_train * n))))
        rng = np.random.default_rng(engine.stream_seed(self.plan.seed, round_, 0x5A3))
        return sorted(rng.choice(n, size=k, replace=False).tolist())

    def train_round(self, round_: int) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """Send the global model to the sampled clients and aggregate their replies."""
        pids = self.sample(round_)
        task = {**self.plan.task, "round": round_}
        replies = self._send("train", pids, task, self._shared_state())
        states = [r.content["model"].to_torch_state_dict() for r in replies]
        metrics = [r.content["metrics"] for r in replies]
        counts = [int(m["num-examples"]) for m in metrics]
        leaked = set().union(*(s.keys() for s in states)) - set(self.keys.shared)
        if leaked:
            raise ClientError(f"clients sent keys that must stay local: {sorted(leaked)[:5]}")
        new_state = aggregate(
            self.model.state_dict(), states, counts, self.keys, self.server_optimizer
        )
        self.model.load_state_dict(new_state)
        total = max(sum(counts), 1)
        out = {
            "train/loss": sum(
                float(m["train_loss"]) * n for m, n in zip(metrics, counts, strict=True)
            )
            / total,
            "train/acc": sum(
                float(m["train_acc"]) * n for m, n in zip(metrics, counts, strict=True)
            )
            / total,
            "clients": float(len(pids)),
        }
        clients = {}
        for m, state in zip(metrics, states, strict=True):
            info = {k: float(v) for k, v in m.items() if k != "pid"}
            # What actually crossed the wire, so FedBN's promise can be checked from outside.
            info["keys_received"] = float(len(state))
            info["bn_keys_received"] = float(len(self.bn_keys.intersection(state)))
            clients[str(int(m["pid"]))] = info
        return out, clients

    def moments(self, model: nn.Module, layer: int) -> list:
        """Every client's (n, sum, sum of squares) for one BatchNorm layer's input."""
        task = {**self.plan.task, "layer": layer, "round": self.completed_round}
        replies = self._send("query.bn_moments", sorted(self.nodes), task, dict(model.state_dict()))
        out = []
        for reply in replies:
            arrays = reply.content["moments"].to_torch_state_dict()
            out.append((float(arrays["count"][0]), arrays["sum"], arrays["sumsq"]))
        return out

    def federated_evaluate(self, round_: int) -> dict[str, float]:
        """Mean and spread over clients of the accuracy on their local test splits."""
        task = {**self.plan.task, "round": round_ + 1}
        modes = [m for m in self.plan.eval_modes if m != "recalibrated"]
        task["eval_modes"] = modes
        replies = self._send("evaluate", sorted(self.nodes), task, self._shared_state())
        out: dict[str, float] = {}
        for mode in modes:
            for what in ("acc", "loss"):
                values = np.array([float(r.content["metrics"][f"{mode}_{what}"]) for r in replies])
                out[f"fed/{mode}/{what}_mean"] = float(values.mean())
                out[f"fed/{mode}/{what}_std"] = float(values.std())
            if mode == modes[0]:
                for r in replies:
                    pid = int(r.content["metrics"]["pid"])
                    out[f"fed/{mode}/acc_client{pid}"] = float(r.content["metrics"][f"{mode}_acc"])
        return out

    def evaluate_round(self, round_: int) -> dict[str, float]:
        """Server-side validation in every mode, plus federated evaluation when asked."""
        metrics: dict[str, float] = {}
        local = self.plan.task["bn_sync"] == "local"
        if not local:
            modes = list(self.plan.eval_modes)
            recal = None
            if "recalibrated" in modes:
                due = round_ % self.plan.recalibrate_every == 0 or round_ == self.plan.rounds
                if due:
                    recal = self.evaluator.recalibrated(self.model)
                else:
                    modes.remove("recalibrated")
            metrics.update(self.evaluator.run(self.model, self.val_rows, "val", recal, modes)[0])
        if local or self.plan.federated_eval:
            metrics.update(self.federated_evaluate(round_))
        return metrics

    # -- the ServerApp main ----------------------------------------------------------------

    def main(self, grid: Grid, context: Context) -> None:
        """Run rounds ``start_round..rounds`` (or until ``stop_after_round``)."""
        self.grid = grid
        self._discover()
        last = self.plan.rounds
        if self.plan.stop_after_round is not None:
            last = min(last, self.plan.stop_after_round)
        for round_ in range(self.plan.start_round, last + 1):
            start = time.perf_counter()
            metrics, clients = self.train_round(round_)
            metrics["time/train_s"] = time.perf_counter() - start
            self.completed_round = round_
            eval_start = time.perf_counter()
            metrics.update(self.evaluate_round(round_))
            metrics["time/eval_s"] = time.perf_counter() - eval_start
            self.on_round(round_, metrics, clients, self.model, self.server_optimizer)


def make_server_app(federation: Federation) -> ServerApp:
    """A standard ``ServerApp`` whose main function runs ``federation``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        federation.main(grid, context)

    return app
