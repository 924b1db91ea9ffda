"""``federation.supernodes``: a simulation with fewer SuperNodes than clients.

With thousands of speaker clients, one SuperNode per client makes Flower's
simulation scan every node every tenth of a second, whether it is sampled or
not. Fewer nodes, each serving many clients in turn, must not change a single
number: the messages name their client, and a client's own state (FedBN's
BatchNorm, the recalibration's segment inputs) lives in the run folder, never
in the node.
"""

from __future__ import annotations

import pytest

from fedkws.fl.messages import ClientTask
from fedkws.run import run
from helpers import SMALL_FEDERATION, golden_view

# Four label-skewed clients of unequal sizes, three sampled per round: with two nodes,
# a node serves two clients in one round, and different ones from round to round.
BASE = [
    *SMALL_FEDERATION, "federation.backend=inprocess", "partition=dirichlet",
    "partition.alpha=0.3", "partition.num_clients=4", "train.rounds=2",
    "train.local_epochs=1", "strategy.fraction_train=0.75", "model.width=8",
]  # fmt: skip


@pytest.fixture
def wire(monkeypatch):
    """Every message the in-process grid handles: (type, node, task pid), and the nodes."""
    from fedkws.fl.inprocess import InProcessGrid

    log: list[dict] = []
    grids: list[InProcessGrid] = []
    handle = InProcessGrid._handle

    def recording(self, message):
        if self not in grids:
            grids.append(self)
        task = None
        if "config" in message.content:
            task = ClientTask.from_record(message.content["config"])
        log.append({"type": message.metadata.message_type, "node": message.metadata.dst_node_id,
                    "pid": task and task.pid, "pids": task and task.pids})  # fmt: skip
        return handle(self, message)

    monkeypatch.setattr(InProcessGrid, "_handle", recording)
    return log, grids


@pytest.mark.parametrize(
    "arm",
    [
        # FedBN: each client trains from its own BatchNorm of its last round (client state).
        ["bn=local", "federation.federated_eval=true"],
        # params_only + exact recalibration: one moments query per layer to every client.
        ["bn=params_only", "bn.recalibrate_every=1", "bn.eval_modes=[eval,recalibrated]"],
    ],
    ids=["fedbn", "recalibrated"],
)
def test_two_nodes_for_four_clients_give_the_same_run(make_cfg, tmp_path, wire, arm):
    # Catches: a message answered for the node's partition instead of its client; a
    # client's state read from a node that served another client before; replies
    # attributed to the wrong client (by node, as before shared nodes existed).
    log, grids = wire
    own = run(make_cfg([*BASE, *arm, "federation.supernodes=null"]), tmp_path / "own")
    log.clear()
    grids.clear()
    shared = run(make_cfg([*BASE, *arm, "federation.supernodes=2"]), tmp_path / "shared")

    assert golden_view(shared) == golden_view(own)
    assert _numbers(shared.summary) == _numbers(own.summary)
    (grid,) = grids
    assert len(grid.contexts) == 2
    assert {m["node"] for m in log} == set(grid.contexts)
    hello = [m["node"] for m in log if m["type"] == "query.hello"]
    assert sorted(hello) == sorted(grid.contexts)  # each node asked once: does it start?
    trained = [m for m in log if m["type"] == "train"]
    assert len(trained) == 2 * 3 and {m["pid"] for m in trained} == {0, 1, 2, 3}
    # Some node trained two different clients: the state really was the client's, not the node's.
    by_node: dict[int, set[int]] = {}
    for m in trained:
        by_node.setdefault(m["node"], set()).add(m["pid"])
    assert max(len(pids) for pids in by_node.values()) > 1
    # A node keeps nothing of the clients it served.
    assert all(len(ctx.state) == 0 for ctx in grid.contexts.values())
    # A moments query is one message per node, for every client that node serves.
    moments = [m for m in log if m["type"] == "query.bn_moments"]
    assert bool(moments) == ("bn=params_only" in arm)
    if moments:
        assert {m["pids"] for m in moments} == {(0, 2), (1, 3)} and len(moments) % 2 == 0


def _numbers(summary: dict) -> dict:
    """A summary's metrics, without its timings."""
    timing = ("_s", "seconds")
    return {
        k: v
        for k, v in summary.items()
        if isinstance(v, (int, float)) and not k.endswith(timing) and "time" not in k
    }


def test_fedbn_resume_with_shared_nodes_is_exact(make_cfg, tmp_path):
    # Catches: a resumed client on a shared node that starts from the global BatchNorm
    # (its own is only in client_state/ once nodes are shared).
    overrides = [*BASE, "bn=local", "federation.supernodes=2"]
    whole = run(make_cfg(overrides), tmp_path / "whole")
    cfg = make_cfg([*overrides, "train.stop_after_round=1"])
    run(cfg, tmp_path / "resumed")
    resumed = run(make_cfg([*overrides, "resume=true"]), tmp_path / "resumed")
    assert golden_view(resumed) == golden_view(whole)
    assert _numbers(resumed.summary) == _numbers(whole.summary)


@pytest.mark.parametrize("supernodes", [None, 2])
def test_a_message_the_grid_refuses_is_that_clients_failure(supernodes):
    # Catches: replies matched to clients by position in what push_messages returned
    # (Flower's grids leave a refused message's id out, so every later reply would be
    # credited to the client before it, and the refused client would never be reported).
    from fedkws.fl.client_app import app as client_app
    from fedkws.fl.inprocess import InProcessGrid
    from fedkws.fl.server_app import FlowerClients

    class Refusing(InProcessGrid):
        refused: int | None = None  # this node's messages are not accepted

        def push_messages(self, messages):
            messages = list(messages)
            ids = list(super().push_messages(messages))
            return [i for i, m in zip(ids, messages, strict=True)
                    if m.metadata.dst_node_id != self.refused]  # fmt: skip

    grid = Refusing(client_app, supernodes or 3)
    api = FlowerClients(grid, 3, task=None, supernodes=supernodes)
    api.discover()
    grid.refused = api.nodes[1] if supernodes is None else api.node_ids[1]
    replies = api._send("query.hello", 5, [0, 1, 2], None, None)
    assert [(f.pid, f.round, f.reason) for f in api.failures] == [
        (1, 5, "the grid did not accept the message")
    ]
    if supernodes is None:  # each node answers with its own partition
        assert [int(r.content["metrics"]["pid"]) for r in replies] == [0, 2]
    else:
        assert len(replies) == 2


def test_a_failed_batched_moments_query_stops_and_names_every_client_of_the_node():
    # Catches: a failed batch blamed on one client only, or rows of a node that answered
    # for other clients than it was asked (they would be pooled as the wrong clients').
    from flwr.app import Error, Message

    from fedkws.data.augment import AugmentConfig
    from fedkws.data.features import FeatureConfig
    from fedkws.errors import FederationError
    from fedkws.fl.client_app import app as client_app
    from fedkws.fl.inprocess import InProcessGrid
    from fedkws.fl.server_app import FlowerClients

    class Failing(InProcessGrid):
        def _handle(self, message):
            if message.metadata.message_type == "query.bn_moments":
                return Message(Error(code=1, reason="out of\nmemory"), reply_to=message)
            return super()._handle(message)

    task = ClientTask(
        cache_entry="", feature_key="", clients_file="", state_dir="", model={},
        optimizer_target="", optimizer_kwargs={}, augment=AugmentConfig(),
        features=FeatureConfig(), bn_sync="params_only", local_epochs=1, batch_size=1,
        eval_batch_size=1, eval_modes=("eval",), prox_mu=0.0, seed=0, threads=1,
    )  # fmt: skip
    api = FlowerClients(Failing(client_app, 2), 5, task, supernodes=2)
    api.discover()
    with pytest.raises(FederationError) as failed:
        api.moments(3, {}, layer=0)
    # The first failed reply stops the query: node 0 serves clients 0, 2, 4; node 1: 1, 3.
    group = [0, 2, 4] if "[0, 2, 4]" in str(failed.value) else [1, 3]
    assert str(failed.value) == f"clients {group} failed query.bn_moments in round 3: out of memory"
    assert [(f.pid, f.round) for f in api.failures] == [(pid, 3) for pid in group]


def test_auto_is_one_node_per_client_up_to_the_cap_and_the_cap_beyond():
    # Catches: auto giving thousands of nodes to thousands of clients (Flower's simulation
    # then scans them all ten times a second), or sharing nodes in small federations.
    from fedkws.fl.server_app import AUTO_SUPERNODES, node_count

    assert AUTO_SUPERNODES == 100  # the README and conf/config.yaml say 100
    assert [node_count(n, "auto") for n in (1, 4, 100, 101, 2618)] == [1, 4, 100, 100, 100]
    assert [node_count(n, None) for n in (4, 2618)] == [4, 2618]
    assert [node_count(n, 10) for n in (4, 2618)] == [4, 10]


def test_auto_is_the_default_and_cyclic_keeps_one_node_per_client(make_cfg):
    from fedkws.spec import from_config

    assert from_config(make_cfg([])).federation.supernodes == "auto"
    assert from_config(make_cfg(["federation.supernodes=null"])).federation.supernodes is None
    assert from_config(make_cfg(["federation.supernodes=3"])).federation.supernodes == 3
    # A cyclic client carries its state between visits in its own SuperNode.
    assert from_config(make_cfg(["strategy=cyclic"])).federation.supernodes is None
