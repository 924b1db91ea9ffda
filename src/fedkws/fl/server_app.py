"""The server side of the Flower adapter: the clients as seen through a ``Grid``.

:class:`FlowerClients` turns the round loop's requests (train these clients,
report BatchNorm moments, evaluate locally) into messages and replies into
plain values. Replies are returned in partition-id order, never arrival
order, so a run is reproducible and resumable. A client that fails is
reported (:class:`ClientFailure`) instead of ending the run; the recipe
decides whether enough clients replied. Waiting for replies polls, so a
first Ctrl-C (:mod:`fedkws.lifecycle`) ends a round within a fraction of a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedkws import lifecycle
from fedkws.core.bn import Moments
from fedkws.errors import FederationError
from fedkws.fl import prompt_engine
from fedkws.fl.arrays import to_state
from fedkws.fl.client_app import content
from fedkws.fl.messages import ClientTask

# Between looks for replies on the prompt engine (fedkws.fl.prompt_engine): a tenth of the time
# waited so far, within these bounds, and no less than the last look took, so a reply is taken
# at most 10 % (or 1 ms) after it came (a query of one layer's statistics takes milliseconds, a
# round's training seconds). Elsewhere (flwr run, the Deployment Engine: Flower hands messages
# out every 0.1 s) every PULL_MAX_WAIT_S, as before.
PULL_MIN_WAIT_S = 0.001
PULL_MAX_WAIT_S = 0.05


@dataclass(frozen=True)
class ClientFailure:
    """One client's failed reply."""

    pid: int
    round: int
    message_type: str
    reason: str

    def describe(self) -> str:
        """One line for the console."""
        return f"client {self.pid} failed {self.message_type} in round {self.round}: {self.reason}"


@dataclass(frozen=True)
class TrainReply:
    """What one client sent back after local training."""

    pid: int
    state: dict[str, torch.Tensor]
    metrics: dict[str, float]

    @property
    def num_examples(self) -> int:
        """Examples the client trained on (its aggregation weight)."""
        return int(self.metrics["num-examples"])


class FlowerClients:
    """Discovery and typed requests to the clients of one run over a Flower ``Grid``."""

    def __init__(
        self,
        grid: Grid,
        num_clients: int,
        task: ClientTask,
        node_wait_s: float = 120.0,
        supernodes: int | str | None = None,
    ):
        self.grid, self.num_clients, self.task = grid, num_clients, task
        self.node_wait_s = node_wait_s
        # Fewer SuperNodes than clients: every message names its client (``ClientTask.pid``).
        self.num_nodes = node_count(num_clients, supernodes)
        self.shared_nodes = self.num_nodes < num_clients
        self.nodes: dict[int, int] = {}  # partition id -> node id (one node per client)
        self.node_ids: list[int] = []
        self.failures: list[ClientFailure] = []

    def _exchange(self, messages: list[Message]) -> list[tuple[int, Message | None]]:
        """Push ``messages`` and poll for every reply (interruptible).

        Returns ``(index of the message, its reply)`` pairs, in arrival order;
        the reply is None for a message the grid did not accept (Flower's grids
        leave such a message's id out of what they return).
        """
        accepted = {i for i in self.grid.push_messages(messages) if i}
        prompt_engine.pushed()  # Flower's simulation engine hands them out now
        index = {m.metadata.message_id: i for i, m in enumerate(messages)}  # set by the push
        replies: list[tuple[int, Message | None]] = [
            (i, None) for message_id, i in index.items() if message_id not in accepted
        ]
        pending = set(index) & accepted
        started = time.monotonic()
        shortest = PULL_MIN_WAIT_S if prompt_engine.active() else PULL_MAX_WAIT_S
        while pending:
            lifecycle.raise_if_stopping()
            look = time.monotonic()
            for reply in self.grid.pull_messages(list(pending)):
                message_id = reply.metadata.reply_to_message_id
                pending.discard(message_id)
                replies.append((index[message_id], reply))
            if pending:
                now = time.monotonic()
                wait = min(PULL_MAX_WAIT_S, max(shortest, (now - started) / 10))
                time.sleep(max(wait, now - look))
        return replies

    def _messages(self, kind: str, pids: list[int], task: ClientTask | None, state):
        """One message per client: to its own node, or spread over the shared nodes."""
        if not self.shared_nodes:
            body = content(task, state)
            return [Message(body, self.nodes[pid], kind) for pid in pids]
        model = None if state is None else content(None, state)["model"]
        return [
            _sharing(model, task if task is None else replace(task, pid=pid),
                     self.node_ids[i % self.num_nodes], kind)
            for i, pid in enumerate(pids)
        ]  # fmt: skip

    def _send(
        self, kind: str, round_: int, pids: list[int], task: ClientTask | None, state: dict | None
    ):
        """Replies of ``pids`` in partition-id order; failures recorded (of ``round_``)."""
        good = []
        for i, reply in self._exchange(self._messages(kind, pids, task, state)):
            if reply is None or reply.has_error():
                self.failures.append(ClientFailure(pids[i], round_, kind, _reason(reply)))
            else:
                good.append((pids[i], reply))
        return [reply for _, reply in sorted(good, key=lambda pr: pr[0])]

    def _wrong_count(self, found: int) -> FederationError:
        n = self.num_clients
        if self.shared_nodes:
            k = self.num_nodes
            return FederationError(
                f"{found} SuperNodes connected, but this configuration asks for {k} "
                f"(federation.supernodes) to serve its {n} clients: start {k} SuperNodes "
                f"(the simulation runtime: --federation-config 'num-supernodes={k}'), or "
                "set federation.supernodes=null for one per client"
            )
        return FederationError(
            f"{found} SuperNodes connected, but this configuration has {n} clients: start "
            f"one SuperNode per client, node-config partition-id=0..{n - 1} num-partitions={n} "
            f"(the simulation runtime: --federation-config 'num-supernodes={n}')"
        )

    def _wait_for_nodes(self) -> list[int]:
        """Exactly ``num_nodes`` node ids; an error, never a hang, if that cannot be.

        More nodes fail at once. Flower's simulation runtime registers all its
        nodes together, so a settled count below ``num_nodes`` fails after a
        second; elsewhere nodes may still be starting, so fewer fail after
        ``node_wait_s``.
        """
        deadline = time.monotonic() + self.node_wait_s
        simulated = type(self.grid).__name__ == "InMemoryGrid"
        seen, since = -1, time.monotonic()
        while len(node_ids := list(self.grid.get_node_ids())) != self.num_nodes:
            lifecycle.raise_if_stopping()
            now = time.monotonic()
            if len(node_ids) != seen:
                seen, since = len(node_ids), now
            if len(node_ids) > self.num_nodes or now > deadline:
                raise self._wrong_count(len(node_ids))
            if simulated and node_ids and now - since > 1.0:
                raise self._wrong_count(len(node_ids))
            time.sleep(0.1)
        return node_ids

    def discover(self) -> None:
        """Map partition ids to node ids (waits for the nodes to come up).

        Every node is asked for its partition id; shared nodes hold no partition
        of their own, so only their ids are kept (the question still checks that
        every node's ClientApp starts).
        """
        node_ids = self._wait_for_nodes()
        messages = [Message(content(None, None), node, "query.hello") for node in node_ids]
        for i, reply in self._exchange(messages):
            if reply is None or reply.has_error():
                raise FederationError(f"a client failed to start: {_reason(reply)}")
            if self.shared_nodes:
                continue
            pid = int(reply.content["metrics"]["pid"])
            if pid in self.nodes or not 0 <= pid < self.num_clients:
                raise FederationError(
                    f"a SuperNode holds partition-id={pid}: each of 0..{self.num_clients - 1} "
                    "must be held by exactly one node"
                )
            self.nodes[pid] = node_ids[i]
        if self.shared_nodes:
            self.node_ids = sorted(node_ids)
            return
        missing = sorted(set(range(self.num_clients)) - set(self.nodes))
        if missing:
            raise FederationError(f"no node answered for partitions {missing}")

    def train(
        self, round_: int, pids: list[int], state: dict, bn_frozen: bool = False
    ) -> list[TrainReply]:
        """Local training on ``pids`` from ``state``; the replies that arrived.

        ``bn_frozen``: FixBN after its warm-up (train with the global statistics, frozen).
        """
        task = self.task.at(round_, bn_frozen=bn_frozen)
        replies = self._send("train", round_, pids, task, state)
        out = []
        for reply in replies:
            metrics = {k: float(v) for k, v in reply.content["metrics"].items()}
            state_in = to_state(reply.content["model"])
            out.append(TrainReply(int(metrics["pid"]), state_in, metrics))
        return out

    def moments(self, round_: int, state: dict, layer: int) -> list[Moments]:
        """Every client's (n, sum, sum of squares) of one BatchNorm layer's input.

        One message per client, or, on shared nodes, one per node for all the
        clients it serves (a query goes to every client, once per layer).
        Pooled statistics over a subset would not be the federation's, so any
        failure stops the run.
        """
        task = self.task.at(round_, layer)
        pids = list(range(self.num_clients))
        if not self.shared_nodes:
            replies = self._send("query.bn_moments", round_, pids, task, state)
            if len(replies) < len(pids):
                raise FederationError(self.failures[-1].describe())
            return [_moments_rows(reply)[0] for reply in replies]
        groups = [pids[k :: self.num_nodes] for k in range(self.num_nodes)]
        model = content(None, state)["model"]
        messages = [
            _sharing(model, replace(task, pids=tuple(group)), node, "query.bn_moments")
            for node, group in zip(self.node_ids, groups, strict=True)
        ]
        found: dict[int, Moments] = {}
        for i, reply in self._exchange(messages):
            if reply is None or reply.has_error():
                reason = _reason(reply)
                for pid in groups[i]:
                    self.failures.append(ClientFailure(pid, round_, "query.bn_moments", reason))
                raise FederationError(
                    f"clients {groups[i]} failed query.bn_moments in round {round_}: {reason}"
                )
            answered = [int(p) for p in reply.content["metrics"]["pids"]]
            if answered != groups[i]:
                raise FederationError(
                    f"a node answered query.bn_moments for clients {answered}, "
                    f"asked for {groups[i]}"
                )
            found.update(zip(groups[i], _moments_rows(reply), strict=True))
        return [found[pid] for pid in pids]

    def evaluate(
        self, round_: int, state: dict, modes: tuple[str, ...], split: str = "local"
    ) -> list[dict]:
        """Each client's metrics on its local (or a shared) split, in partition-id order.

        ``round_``: the round whose model this is. The clients' task is of the next
        round: a client that keeps its own state reads what it saved up to ``round_``.
        """
        task = self.task.at(round_ + 1, eval_modes=modes, eval_split=split)
        replies = self._send("evaluate", round_, list(range(self.num_clients)), task, state)
        return [{k: float(v) for k, v in r.content["metrics"].items()} for r in replies]


# ``federation.supernodes=auto``: one SuperNode per client up to this many clients, this
# many SuperNodes beyond. A query to every client (discovery, a recalibration query) is
# one message per node, each a Ray call with its own reply: at 2,618 clients the scale
# benchmark's final phase took 11 to 14 s on 100 nodes, 28 to 30 s on one per client.
# In fedkws-train's simulations rounds of a few sampled clients cost about the same
# either way (fedkws.fl.prompt_engine); under flwr run, Flower's engine looks at every node.
AUTO_SUPERNODES = 100


def node_count(num_clients: int, supernodes: int | str | None) -> int:
    """SuperNodes serving ``num_clients`` (``federation.supernodes``).

    None: one per client; ``"auto"``: one per client up to :data:`AUTO_SUPERNODES`
    clients, that many beyond; K: K (at most one per client).
    """
    if supernodes is None:
        return num_clients
    cap = AUTO_SUPERNODES if supernodes == "auto" else int(supernodes)
    return min(cap, num_clients)


def _sharing(model, task: ClientTask | None, node: int, kind: str) -> Message:
    """A message to a shared node: its own task, and the one copy of the model (or none)."""
    body = content(task, None)
    if model is not None:
        body["model"] = model  # the same ArrayRecord in every message: encoded once
    return Message(body, node, kind)


def _reason(reply: Message | None) -> str:
    """Why a message failed, on one line (:func:`reason_line`)."""
    if reply is None:
        return "the grid did not accept the message"
    return reason_line(str(reply.error.reason))


_CAUSE = "The above exception was the direct cause of the following exception"
_WRAPPED = "occurred. Message: "


def reason_line(text: str) -> str:
    """An error's reason on one line, at most 300 characters (its end kept).

    Under Ray a ClientApp's exception arrives as Ray words it: the client's traceback
    ending in its own ``Type: message``, then "The above exception was the direct
    cause...", then Flower's ``ClientAppException`` that wraps it; that line before
    the first cause is the reason. Without Ray's traceback, the text after Flower's
    "...occurred. Message: "; anything else, all of it.
    """
    if _CAUSE in text:
        lines = [line for line in text.split(_CAUSE)[0].splitlines() if line.strip()]
        text = lines[-1] if lines else text
    elif _WRAPPED in text:
        text = text.split(_WRAPPED, 1)[1].removesuffix("'>")
    text = " ".join(text.split()) or "no reason given"
    return text if len(text) <= 300 else "..." + text[-297:]


def _moments_rows(reply: Message) -> list[Moments]:
    """The (n, sum, sum of squares) rows of a moments reply, in its clients' order."""
    arrays = to_state(reply.content["moments"])
    return [
        (float(n), s, ss)
        for n, s, ss in zip(arrays["count"], arrays["sum"], arrays["sumsq"], strict=True)
    ]


def make_server_app(main: Callable[[Grid], None]) -> ServerApp:
    """A standard ``ServerApp`` whose main function is ``main(grid)``."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        main(grid)

    return app
