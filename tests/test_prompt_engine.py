"""Flower's simulation engine as fedkws runs it: messages handed out when pushed, a prompt stop.

The real Ray simulations (test_ray_head.py, and the slow suite) run through it and
give the numbers of the same clients in process; these tests take the engine's
hand-out thread and queues, alone and inside Flower's own ``run_api``, with the
hand-out thread's regular look made a minute long (Flower's: 0.1 s), so that
what is prompt can only be fedkws's doing.
"""

from __future__ import annotations

import queue
import threading
import time

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


@pytest.fixture
def engine(monkeypatch):
    """The engine's hand-out thread and its queue, within ``prompt()``; Flower's waits: 60 s."""
    from flwr.server.superlink.fleet.vce import vce_api

    monkeypatch.setattr(prompt_engine, "LOOK_EVERY_S", 60.0)
    state, stop = LinkState(), threading.Event()
    with prompt_engine.prompt():
        messages = vce_api.Queue()  # as the engine makes its queues
        thread = threading.Thread(
            target=vce_api.add_messages_to_queue, args=(state, messages, {1: 0, 2: 1}, stop)
        )
        thread.start()
        try:
            _until(lambda: state.looks >= 2)  # its first pass over the nodes is done
            yield state, messages, stop
        finally:
            stop.set()
            thread.join(10)
    # Catches: the hand-out thread noticing the simulation's end only at its next look.
    assert not thread.is_alive()
    # Outside the block, Flower's own functions are back.
    assert vce_api.Queue is queue.Queue
    assert vce_api.add_messages_to_queue.__module__ == vce_api.__name__


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
