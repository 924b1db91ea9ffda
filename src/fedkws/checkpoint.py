"""Per-round checkpoints: global model, server optimiser, round, RNG states.

Written atomically after every round to ``<run_dir>/checkpoint.pt`` and read
back with ``torch.load(weights_only=True)``: the file holds only tensors and
plain Python values, never pickled objects.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FILENAME = "checkpoint.pt"


@dataclass
class Checkpoint:
    """State after ``round`` complete rounds."""

    round: int
    model: dict[str, torch.Tensor]
    server_optimizer: dict[str, Any]
    records: list[dict[str, Any]]
    extra: dict[str, Any]


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write the checkpoint atomically."""
    path = Path(run_dir) / FILENAME
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "round": ckpt.round,
            "model": ckpt.model,
            "server_optimizer": ckpt.server_optimizer,
            "records": ckpt.records,
            "extra": ckpt.extra,
            "rng": _rng_state(),
        },
        tmp,
    )
    os.replace(tmp, path)
    return path


def load(run_dir: Path) -> Checkpoint | None:
    """The last complete round's checkpoint, or None; restores the RNG states."""
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        return None
    raw = torch.load(path, weights_only=True)
    _set_rng_state(raw["rng"])
    return Checkpoint(
        round=int(raw["round"]),
        model=raw["model"],
        server_optimizer=raw["server_optimizer"],
        records=raw["records"],
        extra=raw.get("extra", {}),
    )
