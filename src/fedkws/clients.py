"""The federation's clients: which cached examples each one trains and tests on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedkws.data import partition as part
from fedkws.data.cache import CachedDataset
from fedkws.errors import ConfigError


@dataclass(frozen=True)
class ClientData:
    """One client: its partition id, display name and dataset row indices."""

    pid: int
    name: str
    train: np.ndarray
    test: np.ndarray


def make_clients(data: CachedDataset, partition: Mapping[str, Any], seed: int) -> list[ClientData]:
    """Partition the training split of ``data`` and give each client a local test split."""
    train_rows = data.split_indices("training")
    if len(train_rows) == 0:
        raise ConfigError(f"the dataset at {data.manifest['root']} has no training examples")
    try:
        parts = part.partition(
            data.labels[train_rows],
            data.speakers[train_rows],
            scheme=str(partition["scheme"]),
            num_clients=int(partition["num_clients"]),
            seed=seed,
            alpha=float(partition.get("alpha", 0.5)),
            classes_per_client=int(partition.get("classes_per_client", 2)),
            speakers_per_client=int(partition.get("speakers_per_client", 1)),
            min_partition_size=int(partition.get("min_partition_size", 10)),
        )
    except ValueError as err:
        raise ConfigError(f"partition: {err}") from err
    names = list(partition.get("names") or [])
    if names and len(names) != len(parts):
        raise ConfigError(f"partition.names has {len(names)} names for {len(parts)} clients")
    clients = []
    for pid, rows in enumerate(parts):
        local_train, local_test = part.local_split(
            train_rows[rows], float(partition.get("local_test_fraction", 0.2)), seed, pid
        )
        name = names[pid] if names else f"client{pid}"
        clients.append(ClientData(pid, name, local_train, local_test))
    return clients


def save_clients(clients: list[ClientData], path: Path) -> Path:
    """Write the client index arrays to one ``.npz`` the client processes read."""
    arrays = {}
    for c in clients:
        arrays[f"train_{c.pid}"] = c.train
        arrays[f"test_{c.pid}"] = c.test
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path
