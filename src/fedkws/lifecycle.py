"""Ending a run on purpose: the first Ctrl-C asks the round loop to stop cleanly.

:func:`graceful_interrupts` installs a SIGINT handler for the duration of a
run. The first Ctrl-C sets a flag that the round loop, the server's polling
for client replies and the centralised training loop check
(:func:`raise_if_stopping`), so the run stops at the next round, message or
centralised batch, keeps the checkpoint of its last complete round and
finishes W&B. Data preparation (download, generation, cache) is not
interrupted by the first Ctrl-C; a second Ctrl-C raises ``KeyboardInterrupt``
at once (the CLI turns it into one line, exit 130).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_STOP = threading.Event()


class Interrupted(Exception):
    """The user asked the run to stop (Ctrl-C)."""


def raise_if_stopping() -> None:
    """Raise :class:`Interrupted` if a stop was requested."""
    if _STOP.is_set():
        raise Interrupted


def reset() -> None:
    """Forget an earlier stop request (a new run starts)."""
    _STOP.clear()


def request_stop() -> None:
    """Ask the running loop to stop (what the first Ctrl-C does)."""
    _STOP.set()


@contextmanager
def graceful_interrupts() -> Iterator[None]:
    """First Ctrl-C: stop at the next check; second: ``KeyboardInterrupt``."""
    reset()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if _STOP.is_set():
            raise KeyboardInterrupt
        _STOP.set()
        print("\nstopping after this step (Ctrl-C again to abort now)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        # The flag stays set: threads still winding down (a ServerApp waiting for nodes)
        # must see it. The next run clears it when it starts.
        signal.signal(signal.SIGINT, previous)
