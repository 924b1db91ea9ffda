"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every writer goes through :func:`atomic_path`: the content is written to a
unique temporary name in the same folder (so several processes may write the
same target at once) and renamed over the target with ``os.replace``.
Work that must be done once however many processes ask for it (building a
dataset or a cache entry) is serialised with :func:`file_lock`.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None


def why_not_a_folder(path: Path | str) -> str | None:
    """Why ``path`` cannot be or become a folder; None if it can.

    ``path`` and then its parents are looked at up to the first that exists: a file
    there, or a link to something gone, is the reason, named by its own path.
    """
    for folder in (Path(path), *Path(path).parents):
        if folder.is_symlink() and not folder.exists():
            return f"{folder} is a link to {os.readlink(folder)}, which does not exist"
        if folder.exists():
            return None if folder.is_dir() else f"{folder} is a file, not a folder"
    return None


def umask() -> int:
    """The process's umask (read, then set back as it was)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a unique temporary path beside ``path``; rename it onto ``path`` on success.

    ``suffix`` is appended to the temporary name for writers that insist on
    an extension (``np.save`` adds ``.npy`` otherwise).
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; a written file gets the usual mode
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_with(path: Path | str, writer: Callable[[Path], Any], suffix: str = "") -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path, suffix) as tmp:
        writer(tmp)
    return Path(path)


def write_text(path: Path | str, text: str) -> Path:
    """Write ``text`` atomically."""
    return write_with(path, lambda tmp: tmp.write_text(text))


def write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` atomically."""
    return write_with(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: Path | str, payload: Any) -> Path:
    """Write ``payload`` as indented JSON atomically."""
    return write_text(path, json.dumps(payload, indent=2))


def save_npy(path: Path | str, array: Any) -> Path:
    """``np.save`` atomically."""
    import numpy as np

    return write_with(path, lambda tmp: np.save(tmp, array), suffix=".npy")


def torch_save(path: Path | str, obj: Any) -> Path:
    """``torch.save`` atomically."""
    import torch

    return write_with(path, lambda tmp: torch.save(obj, tmp))


class _HeldLock:
    """One lock file as held by this process: a thread lock plus the flock'd handle."""

    def __init__(self) -> None:
        self.thread_lock = threading.RLock()
        self.depth = 0
        self.handle: IO[str] | None = None


_held_locks: dict[str, _HeldLock] = {}
_held_locks_guard = threading.Lock()


@contextmanager
def file_lock(path: Path | str) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created if missing) across processes.

    ``fcntl.flock`` on the lock file serialises processes; a thread lock
    serialises the threads of this one. Re-entrant within a process: a
    nested ``file_lock`` on the same path returns at once instead of waiting
    for itself. The lock file is left in place (deleting it would let two
    processes hold "the" lock on two different files). Where ``fcntl`` does
    not exist (Windows) only threads are serialised.
    """
    key = os.path.abspath(path)
    with _held_locks_guard:
        held = _held_locks.setdefault(key, _HeldLock())
    with held.thread_lock:
        if held.depth == 0:
            handle = open(key, "a")  # noqa: SIM115 - kept open while the lock is held
            try:
                if fcntl is not None:
                    fcntl.flock(handle, fcntl.LOCK_EX)
            except BaseException:
                handle.close()
                raise
            held.handle = handle
        held.depth += 1
        try:
            yield Path(key)
        finally:
            held.depth -= 1
            if held.depth == 0 and held.handle is not None:
                if fcntl is not None:
                    fcntl.flock(held.handle, fcntl.LOCK_UN)
                held.handle.close()
                held.handle = None


_folders_in_use: dict[str, int] = {}  # realpath -> the open directory fd this process holds


@contextmanager
def folder_in_use(folder: Path, refuse: Callable[[str], Exception]) -> Iterator[None]:
    """Hold ``folder`` (it exists) for this process: another process's attempt is refused.

    A non-blocking ``flock`` on the folder itself, so nothing is written to take it:
    two runs started into one folder (two commands, two jobs of a parallel sweep whose
    folders coincide) cannot both write there. Re-entrant within the process. The
    other process gets ``refuse(why)`` raised. Where a folder cannot be locked (no
    ``fcntl`` on Windows; NFS, or a mount without locks) nothing is held.
    """
    key = os.path.realpath(folder)
    if fcntl is None or key in _folders_in_use:
        yield
        return
    fd = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held by another process
        os.close(fd)
        raise refuse(f"{folder}: another fedkws run is writing into this folder") from None
    except OSError:  # no flock on a folder here (NFS, a mount without locks): not held
        os.close(fd)
        yield
        return
    _folders_in_use[key] = fd
    try:
        yield
    finally:
        del _folders_in_use[key]
        os.close(fd)  # closing the last descriptor releases the lock
