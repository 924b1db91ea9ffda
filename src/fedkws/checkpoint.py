"""Per-round checkpoints: global model, the recipe's optimiser state, round, records, RNG states.

Written atomically after every round to ``<run_dir>/checkpoint.pt`` and read
back with ``torch.load(weights_only=True)``: the file holds only tensors and
plain Python values, never pickled objects. ``optimizer`` is the recipe's
own optimiser (the Flower strategy's server state of a federated run, the training
optimiser of the centralised baseline), named by ``optimizer_kind``.

Every tensor is saved on the CPU and loaded onto the CPU, whatever device the
run used: a run can be resumed on another device (the recipes copy the
loaded state into their model and optimiser, wherever those are).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedkws.errors import RunRefused
from fedkws.fileio import torch_save

FILENAME = "checkpoint.pt"


@dataclass
class Checkpoint:
    """State after ``round`` complete rounds."""

    round: int
    model: dict[str, torch.Tensor]
    optimizer_kind: str  # "server" (federated) or "central"
    optimizer: dict[str, Any]
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)  # RunSpec.comparable() of the run
    wandb_id: str = ""
    failures: list[dict[str, Any]] = field(default_factory=list)  # clients that failed so far
    data: str = ""  # CachedDataset.identity() of what the rounds trained on ("": not recorded)


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (nested in dicts, lists, tuples) detached on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_cpu(v) for v in value)
    return value


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Set torch's, NumPy's and Python's global RNGs to a saved state."""
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write the checkpoint atomically (model and optimiser state as CPU tensors)."""
    payload = {**ckpt.__dict__, "rng": _rng_state()}
    payload["model"], payload["optimizer"] = to_cpu(ckpt.model), to_cpu(ckpt.optimizer)
    return torch_save(Path(run_dir) / FILENAME, payload)


def load(run_dir: Path) -> tuple[Checkpoint, dict[str, Any]] | None:
    """The last complete round's checkpoint and its RNG states, or None if there is none.

    Raises
    ------
    RunRefused
        If the file exists but cannot be read as a fedkws checkpoint.
    """
    path = Path(run_dir) / FILENAME
    if path.exists() and not path.is_file():
        raise RunRefused(f"{path} is not a file: not a fedkws checkpoint")
    if not path.is_file():
        return None
    try:
        raw = torch.load(path, weights_only=True, map_location="cpu")
        rng = raw.pop("rng")
        return Checkpoint(**raw), rng
    except Exception as err:  # any unreadable or foreign file: refuse, never guess
        reason = why_unreadable(path, err)
        raise RunRefused(f"{path} is not a readable fedkws checkpoint ({reason})") from err


def why_unreadable(path: Path, err: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in a few plain words.

    Not torch's own advice to load with ``weights_only=False``: that would run
    whatever code a foreign or damaged file holds.
    """
    import errno
    import pickle

    text = " ".join(str(err).split())
    if path.is_file() and path.stat().st_size == 0:
        return "an empty file"
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text:
        return "not a file of tensors torch reads safely (weights_only): foreign or damaged"
    cut_short = isinstance(err, OSError) and err.errno == errno.EINVAL  # its reader's seek
    if cut_short or "zip archive" in text or "central directory" in text:
        return "damaged or cut short: not a complete torch zip archive"
    return text[:200] or type(err).__name__
