"""Flower's simulation engine as fedkws runs it: messages handed out when pushed, a prompt stop.

The real Ray simulations (test_ray_head.py, and the slow suite) run through it and
give the numbers of the same clients in process; these tests take the engine's
hand-out thread and queues, alone and inside Flower's own ``run_api``, with the
hand-out thread's regular look made a minute long (Flower's: 0.1 s), so that
what is prompt can only be fedkws's doing.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from fedkws.fl import prompt_engine


class LinkState:
    """The part of Flower's LinkState the hand-out thread uses: messages waiting per node."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting: dict[int, list[str]] = {}
        self.looks = 0  # calls of get_message_ins

    def store_message_res(self, message) -> None:  # replies: none in these tests
        raise AssertionError(message)

    def push(self, node_id: int, *messages: str) -> None:
        with self.lock:
            self.waiting.setdefault(node_id, []).extend(messages)

    def get_message_ins(self, node_id: int, limit: int | None) -> list[str]:
        with self.lock:
            self.looks += 1
            mine = self.waiting.get(node_id, [])
            taken, self.waiting[node_id] = mine[:limit], mine[limit:]
            return taken


@contextmanager
def hand_out(state, nodes_mapping: dict[int, int]):
    """The engine's hand-out thread on ``state`` and its queue, within ``prompt()``."""
    from flwr.server.superlink.fleet.vce import vce_api

    stop = threading.Event()
    with prompt_engine.prompt():
        messages = vce_api.Queue()  # as the engine makes its queues
        thread = threading.Thread(
            target=vce_api.add_messages_to_queue, args=(state, messages, nodes_mapping, stop)
        )
        thread.start()
        try:
            yield messages, stop
        finally:
            stop.set()
            thread.join(10)
    # Catches: the hand-out thread noticing the simulation's end only at its next look.
    assert not thread.is_alive()
    # Outside the block, Flower's own functions are back.
    assert vce_api.Queue is queue.Queue
    assert vce_api.add_messages_to_queue.__module__ == vce_api.__name__


@pytest.fixture
def engine(monkeypatch):
    """:func:`hand_out` on a stand-in state of two nodes; Flower's waits: 60 s."""
    monkeypatch.setattr(prompt_engine, "LOOK_EVERY_S", 60.0)
    state = LinkState()
    with hand_out(state, {1: 0, 2: 1}) as (messages, stop):
        _until(lambda: state.looks >= 2)  # its first pass over the nodes is done
        yield state, messages, stop


def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_pushed_messages_are_handed_out_at_once_a_nodes_next_without_a_wait(engine):
    # Catches: the hand-out thread waiting for its next look (Flower's 0.1 s, here 60 s)
    # after a push, and a node with two messages waiting getting its second one a look later.
    state, messages, _ = engine
    state.push(1, "a", "b")
    state.push(2, "c")
    prompt_engine.pushed()
    got = [messages.get(timeout=10) for _ in range(3)]
    assert sorted(got) == ["a", "b", "c"]
    assert got.index("a") < got.index("b")  # one node's messages in the order pushed
    # Then it waits for the next push, instead of looking again and again (a push it had
    # already seen still marked: a busy loop over every node).
    time.sleep(0.3)
    looks = state.looks
    time.sleep(0.3)
    assert state.looks == looks


def test_the_engines_queues_stop_waiting_when_the_simulation_is_over(engine):
    # Catches: the engine's workers and reply thread each waiting out their timeout (Flower's
    # 1 s, here 30 s) after the simulation ended, before it can return.
    state, messages, stop = engine
    state.push(1, "a")
    prompt_engine.pushed()
    assert messages.get(timeout=10) == "a"  # the hand-out thread runs
    stop.set()
    started = time.monotonic()
    with pytest.raises(queue.Empty):
        messages.get(timeout=30)
    assert time.monotonic() - started < 10
    # Before the end, a timed wait still lasts its timeout.
    alone = prompt_engine._Queue()
    started = time.monotonic()
    with pytest.raises(queue.Empty):
        alone.get(timeout=0.3)
    assert time.monotonic() - started >= 0.3


def test_flowers_run_api_uses_the_prompt_hand_out_and_ends_with_the_simulation(monkeypatch):
    # Catches: Flower's engine no longer looking its hand-out function and queue up by name in
    # vce_api (the patch would silently do nothing), and an engine that, idle, outlives the
    # simulation's end by the hand-out thread's next look.
    from flwr.server.superlink.fleet.vce import vce_api

    class Backend:
        num_workers = 2

        def build(self, app_fn) -> None:
            pass

        def terminate(self) -> None:
            pass

    class StateFactory:
        def __init__(self) -> None:
            self.link = LinkState()

        def state(self) -> LinkState:
            return self.link

    monkeypatch.setattr(prompt_engine, "LOOK_EVERY_S", 60.0)
    factory, stop = StateFactory(), threading.Event()
    with prompt_engine.prompt():
        engine = threading.Thread(
            target=vce_api.run_api, args=(lambda: None, Backend, {1: 0}, factory, {}, stop, None)
        )
        engine.start()
        try:
            _until(lambda: factory.link.looks >= 1)
            time.sleep(0.3)  # Flower's own hand-out thread would look three times meanwhile
            assert factory.link.looks == 1
            prompt_engine.pushed()
            _until(lambda: factory.link.looks == 2)
        finally:
            stop.set()
            engine.join(10)
    assert not engine.is_alive()


def test_a_look_reads_the_link_state_once_and_hands_out_as_flower_would(monkeypatch):
    # Catches: a look asking Flower's link state for every node's next message (each call
    # checks every stored message: at 2,618 nodes, 60 ms a look with a round's 10 messages
    # in flight, 7.2 s with one per node), a message handed out twice or without Flower's
    # checks (an expired one), a node whose first message expired waiting for the next
    # regular look to get its second, and a node's messages handed out out of order.
    from flwr.app import Message, RecordDict

    monkeypatch.setattr(sys, "path", [str(Path(__file__).parents[1] / "benchmarks"), *sys.path])
    import scale  # the simulation's in-memory link state, as the scale benchmark builds it

    monkeypatch.setattr(prompt_engine, "LOOK_EVERY_S", 60.0)
    state, grid, node_ids = scale._link_state(300)
    checked: list[set] = []
    real = state._check_stored_messages

    def check(message_ids, *args):
        checked.append(set(message_ids))
        return real(message_ids, *args)

    monkeypatch.setattr(state, "_check_stored_messages", check)
    late, early, lapsed = node_ids[250], node_ids[7], node_ids[100]

    def push(*nodes: int) -> list[str]:
        out = list(grid.push_messages([Message(RecordDict(), n, "query.hello") for n in nodes]))
        prompt_engine.pushed()
        return out

    def take(count: int) -> list[str]:
        got = [messages.get(timeout=10).metadata.message_id for _ in range(count)]
        with pytest.raises(queue.Empty):
            messages.get(timeout=0.3)  # each once, and nothing else
        return got

    with hand_out(state, {node: i for i, node in enumerate(node_ids)}) as (messages, _):
        ids = push(late, early, early)
        # The first look in the nodes' order, then the node's second message.
        assert take(3) == [ids[1], ids[0], ids[2]]
        with state.lock:  # the first of two expired before the look the push wakes
            pair = [Message(RecordDict(), lapsed, "query.hello") for _ in range(2)]
            more = list(grid.push_messages(pair))
            state.message_ins_store[more[0]].metadata.ttl = 1e-6
        prompt_engine.pushed()
        assert take(1) == [more[1]]
    assert more[0] not in state.message_ins_store  # dropped by Flower's own check
    assert all(state.message_ins_store[i].metadata.delivered_at for i in [*ids, more[1]])
    assert sorted(map(sorted, checked)) == sorted([i] for i in [*ids, *more])  # once each
