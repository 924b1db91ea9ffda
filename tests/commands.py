"""fedkws's commands as the tests run them: a real process each, without paying the imports.

A command such as ``python -m fedkws.train <overrides>`` is a new Python
process that imports torch, Hydra and fedkws (about 1.5 s of the 2 s a config
mistake takes on 2 cores) before it reads its first override. The CLI tests run
dozens. :func:`run_command` runs ``python -m fedkws.train|prepare|cli`` in a
process forked from a server process that has imported these modules once
(multiprocessing's ``forkserver``; it starts with the first such command of a
test worker). Each command is still its own process: its own working folder,
environment, arguments, stdout and stderr, exit status, signal handlers, atexit
handlers; what it changes does not reach the tests or the next command. It runs
the module as ``-m`` does (``runpy``, as ``__main__``; the server imported what
it imports, not the module itself).

What it does not reproduce: what is fixed when the server starts (warnings
filters, OpenMP's settings, ``sys.path``, Flower's telemetry switch; a command
whose environment changes one of the variables behind them goes to
:func:`subprocess.run`), the end of
the interpreter after the atexit handlers (objects are not finalised), and
waiting for the processes a command leaves behind with its output (it waits for
the command alone). So the tests of how a process ends, its signals and process
group (the Ctrl-C tests of ``test_lifecycle.py``, ``test_parallel_sweep.py``, ...)
start theirs with :mod:`subprocess`. Every other command, and any call with arguments this does
not know, goes to :func:`subprocess.run` too.
"""

from __future__ import annotations

import atexit
import ctypes
import io
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

# Modules a forked command starts with: what ``python -m fedkws.train`` imports, not
# the commands' own modules (a command imports its module afresh, as -m does). A
# federated job adds Flower's simulation module (0.6 s of CPU); the first optimiser a
# process builds imports torch._dynamo (0.5 s). Neither starts a thread. Flower Datasets
# (1.4 s) is left to the commands: its pyarrow starts native threads (jemalloc's among
# them), and a process that forks should have none.
PRELOAD = ["torch", "hydra", "omegaconf", "fedkws.spec", "fedkws.run", "flwr.simulation",
           "torch._dynamo"]  # fmt: skip
FORKED = ("fedkws.train", "fedkws.prepare", "fedkws.cli")
KNOWN = {"capture_output", "text", "env", "cwd", "timeout"}
# Read when the server starts: a command whose environment changes them runs afresh.
AT_START = ("PYTHONWARNINGS", "PYTHONPATH", "PYTHONHASHSEED", "OMP_NUM_THREADS",
            "MKL_NUM_THREADS", "COLUMNS", "NO_COLOR", "FORCE_COLOR", "TERM",
            "FLWR_TELEMETRY_ENABLED")  # fmt: skip

_context: Any = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _exit_status(code: Any) -> int:
    """What the interpreter makes of ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _command(module: str, args: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """The forked process: ``python -m module *args`` with stdout and stderr into files."""
    for path, fd in ((out, 1), (err, 2)):
        opened = os.open(path, os.O_WRONLY)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [module, *args]  # runpy puts the module's file first, as -m does
    # -m runs a module not imported yet (the server imported it to import what it needs)
    sys.modules.pop(module, None)
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as exit_:
        status = _exit_status(exit_.code)
    except BaseException:  # as the interpreter reports an uncaught exception
        sys.excepthook(*sys.exc_info())
        status = 1
    threading._shutdown()  # as the interpreter ends: wait for non-daemon threads, then atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    ctypes.CDLL(None).fflush(None)  # what C code printed
    os._exit(status)


def run_command(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(command, **kwargs)``, forked as the module docstring says when it can be."""
    env = dict(os.environ if kwargs.get("env") is None else kwargs["env"])
    cwd = str(kwargs.get("cwd") or os.getcwd())
    forked = (
        len(command) >= 3
        and command[:2] == [sys.executable, "-m"]
        and command[2] in FORKED
        and kwargs.get("capture_output")
        and set(kwargs) <= KNOWN
        and all(env.get(name) == os.environ.get(name) for name in AT_START)
        and os.path.isdir(cwd)
    )
    if not forked:
        return subprocess.run(command, **kwargs)
    timeout = kwargs.get("timeout")
    with tempfile.TemporaryDirectory(prefix="fedkws-command-") as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        out.touch()
        err.touch()
        process = _forkserver().Process(
            target=_command,
            args=(command[2], [str(a) for a in command[3:]], cwd, env, str(out), str(err)),
        )
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, timeout, out.read_bytes(), err.read_bytes())
        stdout, stderr = out.read_bytes(), err.read_bytes()
    if kwargs.get("text"):  # as subprocess decodes: the locale's encoding, universal newlines
        stdout, stderr = (io.TextIOWrapper(io.BytesIO(b)).read() for b in (stdout, stderr))
    return subprocess.CompletedProcess(command, process.exitcode, stdout, stderr)
