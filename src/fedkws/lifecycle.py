"""Ending a run on purpose: the first Ctrl-C (or SIGTERM) asks the round loop to stop cleanly.

:func:`graceful_interrupts` installs a SIGINT and a SIGTERM handler for the
duration of a run. The first signal sets a flag that the round loop, the
server's polling for client replies and the centralised training loop check
(:func:`raise_if_stopping`), so the run stops at the next round, message or
centralised batch, keeps the checkpoint of its last complete round and
finishes W&B. Data preparation (download, generation, cache) is not
interrupted by the first signal; a second one raises ``KeyboardInterrupt``
at once. The CLI turns either into one line and exits with 128 + the signal's
number (130 for Ctrl-C, 143 for SIGTERM, what a batch scheduler such as SLURM
sends before it kills a job at its time limit).

Ray's core worker installs a SIGTERM handler of its own when a driver connects,
one that ends the process at once; :func:`reclaim_sigterm` puts fedkws's back.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_STOP = threading.Event()
_ABORT = threading.Event()  # the second signal: work in other threads ends at its next step
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # the signal that asked for the stop, if one did
_last_at: list[float] = []  # when the last signal came (time.monotonic())
# Set (and inherited by the jobs' worker processes) while a parallel sweep's process passes
# stops on: a folder where each worker running a job puts a file named by its process id.
# Such a job gets a terminal's Ctrl-C twice, directly and through the sweep's process.
_FORWARDING_ENV = "FEDKWS_SWEEP_FORWARDS_STOPS"
_SAME_STOP_S = 1.0  # a signal this soon after the last one, in such a job, is that one


class Interrupted(Exception):
    """The user (Ctrl-C) or the system (SIGTERM) asked the run to stop."""


def raise_if_stopping() -> None:
    """Raise :class:`Interrupted` if a stop was requested."""
    if _STOP.is_set():
        raise Interrupted


def raise_if_aborting() -> None:
    """Raise ``KeyboardInterrupt`` if a second signal asked to abort (for other threads).

    The main thread gets the second signal's ``KeyboardInterrupt`` itself; work that a run
    left to another thread (its final evaluation) checks this between steps, so it ends
    before the process does.
    """
    if _ABORT.is_set():
        raise KeyboardInterrupt


def aborting() -> bool:
    """Whether a second signal asked to abort: work still under way is being cut off."""
    return _ABORT.is_set()


def reset() -> None:
    """Forget an earlier stop request (a new run starts)."""
    _STOP.clear()
    _ABORT.clear()
    _received.clear()
    _last_at.clear()


def signal_received() -> bool:
    """Whether Ctrl-C or SIGTERM asked this run to stop (a stop for another reason: no)."""
    return bool(_received)


def exit_code() -> int:
    """What the process exits with after a stop: 128 + the signal's number (130 without one)."""
    return 128 + (_received[0] if _received else int(signal.SIGINT))


def stopped_by() -> str:
    """``" (SIGTERM)"``-style words for the signal that asked for the stop; empty without one."""
    return f" ({_name(_received[0])})" if _received else ""


def _name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def _on_signal(signum: int, frame: object) -> None:
    signalled(signum)


def signalled(signum: int) -> None:
    """What a signal does within :func:`graceful_interrupts`: the first asks, the second aborts."""
    now = time.monotonic()
    if _last_at and os.environ.get(_FORWARDING_ENV) and now - _last_at[-1] < _SAME_STOP_S:
        return  # the signal just handled, passed on by the sweep's process
    _last_at[:] = [now]
    if _STOP.is_set():
        _ABORT.set()
        raise KeyboardInterrupt
    _received.append(signum)
    _STOP.set()
    name = _name(signum)
    print(f"\n{name}: stopping after this step ({name} again to abort now)", file=sys.stderr)


def request_stop() -> None:
    """Ask the running loop to stop (what the first Ctrl-C does)."""
    _STOP.set()


@contextmanager
def graceful_interrupts() -> Iterator[None]:
    """First Ctrl-C or SIGTERM: stop at the next check; second: ``KeyboardInterrupt``."""
    reset()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _on_signal) for signum in _SIGNALS}
    registered = _register_with_the_sweep()
    if registered is not None and (code := sweep_stop_code()) is not None:
        signalled(code - 128)  # the sweep stopped before this job could be told: stop now
    try:
        yield
    finally:
        if registered is not None:
            registered.unlink(missing_ok=True)
        # The flag stays set: threads still winding down (a ServerApp waiting for nodes)
        # must see it. The next run clears it when it starts.
        for signum, handler in previous.items():
            # A parallel sweep's worker between jobs: a terminal's Ctrl-C reaches it too,
            # and Python's default handler would end it and break joblib's pool.
            signal.signal(signum, _between_jobs if registered is not None else handler)


def _between_jobs(signum: int, frame: object) -> None:
    """A parallel sweep's worker, idle: the stop is the sweep's to record, not this one's end."""
    mark_sweep_stop(128 + signum)


# The marker a parallel sweep's stop leaves in its running-jobs folder: the exit status
# of the first signal (later ones do not change it).
_STOPPED_FILE = "stopped"
_sweep_stop: list[int] = []  # in the sweep's process, once its folder is gone (take_sweep_stop)


def _registry() -> Path | None:
    folder = os.environ.get(_FORWARDING_ENV)
    return Path(folder) if folder and os.path.isdir(folder) else None


def in_parallel_sweep_job() -> bool:
    """Whether this process is a worker of a parallel sweep that passes stops on."""
    return _registry() is not None


def mark_sweep_stop(code: int) -> bool:
    """Record that the parallel sweep stops, with exit ``code`` if none is recorded yet."""
    registry = _registry()
    if registry is None:
        return False
    try:
        with open(registry / _STOPPED_FILE, "x") as marker:
            marker.write(str(code))
    except FileExistsError:
        pass
    except OSError:
        return False
    return True


def note_sweep_stop(code: int) -> bool:
    """In a parallel sweep's job: record that the sweep stops (exit ``code``); whether it is one.

    The job then returns instead of exiting, so that the sweep's process waits for its
    other running jobs to stop too (an exiting worker made joblib end them mid-step),
    and the jobs not started yet are skipped (:func:`sweep_stop_code`).
    """
    registry = _registry()
    if registry is None or not (registry / str(os.getpid())).exists():
        return False
    return mark_sweep_stop(code)


def sweep_stop_code() -> int | None:
    """The exit status of the running parallel sweep if a signal stops it, else None."""
    registry = _registry()
    try:
        if registry is not None:
            return int((registry / _STOPPED_FILE).read_text())
    except (OSError, ValueError):
        pass
    return None


def take_sweep_stop() -> int | None:
    """In the sweep's process, once the sweep ended: the exit status of its stop, if any.

    Read once: the next sweep of the same process starts with none.
    """
    code = sweep_stop_code()
    if code is None and _sweep_stop:
        code = _sweep_stop[0]
    _sweep_stop.clear()
    return code


def _register_with_the_sweep() -> Path | None:
    """In a parallel sweep's worker: say that this process runs a job (stops reach it)."""
    registry = _registry()
    if registry is None:
        return None
    mark = registry / str(os.getpid())
    try:
        mark.touch()
    except OSError:
        return None
    return mark


def reclaim_sigterm() -> bool:
    """Within :func:`graceful_interrupts`, make SIGTERM fedkws's again; say whether it was.

    Call after ``ray.init`` (Ray's core worker installs its own handler, below
    Python's handler table) and after ``ray.shutdown`` (which resets SIGTERM to
    its default action there, while ``signal.getsignal`` still names fedkws's).
    """
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is _on_signal
    ):
        signal.signal(signal.SIGTERM, _on_signal)
        return True
    return False


def pass_stops_to_children(match: str) -> Callable[[], None]:
    """SIGINT and SIGTERM to this process go to its children whose command line has ``match``.

    For a parallel sweep's process: its jobs run in worker processes, where each
    stops after its current step. Only workers running a job get the signal (each
    registers in a folder named by an environment variable they inherit: call this
    before they start); an idle one would die of it and break the pool. A terminal's
    Ctrl-C reaches every process of the sweep and then each job once more through
    this process: a job takes a signal within a second of its last for that one.
    With no job running, the signal does here what it did before (SIGTERM ends the
    process, SIGINT raises ``KeyboardInterrupt``, an ignored one stays ignored).
    Returns the function that undoes it.
    """
    import atexit
    import shutil
    import tempfile

    me = os.getpid()
    _sweep_stop.clear()
    registry = Path(tempfile.mkdtemp(prefix="fedkws-running-jobs-"))
    atexit.register(shutil.rmtree, registry, True)  # however the process ends
    os.environ[_FORWARDING_ENV] = str(registry)
    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}

    def forward(signum: int, frame: object) -> None:
        workers = _children(me, match)
        if workers:
            # The jobs starting from now on see the mark (and stop, or are skipped); the
            # running ones get the signal. A worker between jobs looks as it starts one.
            mark_sweep_stop(128 + signum)
            for pid in workers:
                if (registry / str(pid)).exists():
                    try:
                        os.kill(pid, signum)
                    except ProcessLookupError:
                        pass  # ended meanwhile
            return
        before = previous[signum]
        if before == signal.SIG_IGN:
            return
        if callable(before):
            before(signum, frame)
            return
        shutil.rmtree(registry, ignore_errors=True)  # no atexit after this
        signal.signal(signum, signal.SIG_DFL)
        os.kill(me, signum)

    for signum in _SIGNALS:
        signal.signal(signum, forward)

    def restore() -> None:
        code = sweep_stop_code()
        if code is not None:
            _sweep_stop[:] = [code]
        os.environ.pop(_FORWARDING_ENV, None)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(registry, ignore_errors=True)

    return restore


def _children(parent: int, match: str) -> list[int]:
    """The processes whose parent is ``parent`` and whose command line contains ``match``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile, or not ours to read
        if match in command:
            found.append(int(entry.name))
    return found
