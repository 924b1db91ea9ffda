"""Flower's simulation engine without its fixed waits (flwr 1.42, Ray backend).

Every message of a Flower simulation waits on two clocks of the engine's own:

- the thread that hands new messages to the actors looks for them every
  0.1 s, so each exchange of the ServerApp with its clients starts on average
  50 ms late, and up to 100 ms. An exact recalibration sends one query per
  BatchNorm layer, so on 2 cores about a second of every run's final
  evaluation was this wait (measured: 0.101 s per query on the tiny dataset,
  against 0.03 s in process);
- its worker threads and the thread that stores replies wait for work up to
  1 s at a time, and the simulation ends only once each has noticed that it is
  over: about a second at the end of every run.

While :func:`prompt` is on (``fedkws.fl.simulation`` turns it on for the
length of a Ray simulation), the engine's hand-out thread wakes as soon as the
ServerApp pushes messages (:func:`pushed`, called by ``FlowerClients``), looks
again at once after finding any (a node with several messages waiting gets the
next one without a wait), and still looks every 0.1 s as Flower does, so
nothing it would have found is missed. It and the engine's queues give up
waiting within 20 ms once the simulation is over. The messages, their order per node and
what the clients compute are unchanged. Under ``flwr run`` Flower's runtime
runs its own engine, waits included.

Each look of Flower's engine also asks the link state for every node's next
message, and each such call checks the stored messages in turn (TTL,
federation), all of them for a node with none waiting: with one SuperNode per
client, 2,618 nodes and a round's 10 messages in flight, one look took 60 ms,
much of a core while a round ran, and with a message for every node
(discovery, a recalibration query) 7.2 s
(``benchmarks/run.py --only scale``). A look here (:func:`_look`) reads the
in-memory state's store once, under its lock, and hands each node with a
message waiting its first one, checked and marked delivered as the state's
``get_message_ins(node_id, limit=1)`` checks and marks it, in the same order
of nodes. Two differences, neither losing a message: a node whose first
message fails the check (expired) gets its next one at the look that follows
at once, not in the same look; and only messages about to be handed out are
checked here, the others when the ServerApp pulls their replies (Flower's
``get_message_res`` checks what it is asked for).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

LOOK_EVERY_S = 0.1  # as Flower's engine: the hand-out thread looks this often without a push
STOP_SLICE_S = 0.02  # how often a waiting queue checks whether the simulation is over

# One simulation at a time per process (fedkws runs its jobs one after another; parallel
# sweeps run theirs in processes of their own): the push flag and the patch are this module's.
_pushed = threading.Event()
_active = threading.Event()


def pushed() -> None:
    """The ServerApp has pushed messages: wake the engine's hand-out thread."""
    _pushed.set()


def active() -> bool:
    """Whether a simulation in this process runs on the prompt engine (replies come soon)."""
    return _active.is_set()


def _idle(f_stop: threading.Event) -> None:
    """Until a push, the simulation's end, or the next look (``LOOK_EVERY_S``) is due."""
    next_look = time.monotonic() + LOOK_EVERY_S
    while not f_stop.is_set():
        left = next_look - time.monotonic()
        if left <= 0 or _pushed.wait(min(STOP_SLICE_S, left)):
            return


class _Queue(queue.Queue):
    """A queue whose timed waits end early once ``over`` (the simulation's stop) is set."""

    over: threading.Event | None = None

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if not block or timeout is None:
            return super().get(block, timeout)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                return super().get(timeout=max(0.0, min(STOP_SLICE_S, left)))
            except queue.Empty:
                if left <= STOP_SLICE_S or (self.over is not None and self.over.is_set()):
                    raise


def _look(state, nodes_mapping: dict[int, int], messages: queue.Queue) -> bool:
    """Put each node's next message on ``messages`` (one look); whether there was any.

    Flower's in-memory link state (the simulation's) is read in one pass; another
    state has ``get_message_ins`` asked for every node, as Flower's engine asks it.
    """
    store, lock = getattr(state, "message_ins_store", None), getattr(state, "lock", None)
    check = getattr(state, "_check_stored_messages", None)
    if not isinstance(store, dict) or lock is None or check is None:
        found = False
        for node_id in nodes_mapping:
            for message in state.get_message_ins(node_id=node_id, limit=1):
                messages.put(message)
                found = True
        return found
    from flwr.supercore.date import now

    taken, dropped = [], False
    with lock:
        first: dict[int, str] = {}
        for message_id, message in store.items():
            if not message.metadata.delivered_at:
                first.setdefault(message.metadata.dst_node_id, message_id)
        for node_id in nodes_mapping:
            if (message_id := first.get(node_id)) is None:
                continue
            check({message_id})  # drops it if expired or out of the federation
            if (message := store.get(message_id)) is None:
                dropped = True  # the node's next message, if any, at the next look
                continue
            message.metadata.delivered_at = now().isoformat()
            taken.append(message)
    for message in taken:
        messages.put(message)
    return bool(taken) or dropped


@contextmanager
def prompt() -> Iterator[None]:
    """Within this block, Flower's simulation engine hands messages out and stops promptly."""
    from flwr.server.superlink.fleet.vce import vce_api

    made: list[_Queue] = []

    def make_queue(*args: Any, **kwargs: Any) -> _Queue:
        made.append(_Queue(*args, **kwargs))
        return made[-1]

    def hand_out(state, messages: queue.Queue, nodes_mapping, f_stop: threading.Event) -> None:
        # The engine's queues were made before its threads start: each learns when it is over.
        for made_queue in made:
            made_queue.over = f_stop
        while not f_stop.is_set():
            _pushed.clear()  # a push from here on wakes the wait below
            if not _look(state, nodes_mapping, messages):
                _idle(f_stop)

    if _active.is_set():
        raise RuntimeError("one Flower simulation at a time in a process")
    original = vce_api.add_messages_to_queue, vce_api.Queue
    vce_api.add_messages_to_queue, vce_api.Queue = hand_out, make_queue
    _active.set()
    try:
        yield
    finally:
        vce_api.add_messages_to_queue, vce_api.Queue = original
        _active.clear()
