"""The federation's clients: which cached examples each one trains and tests on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedkws.data import partition as part
from fedkws.data.cache import CachedDataset
from fedkws.data.speech_commands import SILENCE_LABEL
from fedkws.errors import ConfigError
from fedkws.fileio import write_with
from fedkws.spec import PartitionSpec


@dataclass(frozen=True)
class ClientData:
    """One client: its partition id, display name and dataset row indices."""

    pid: int
    name: str
    train: np.ndarray
    test: np.ndarray


def make_clients(data: CachedDataset, partition: PartitionSpec, seed: int) -> list[ClientData]:
    """Partition the training split of ``data`` and give each client a local test split."""
    train_rows = data.split_indices("training")
    if len(train_rows) == 0:
        raise ConfigError(f"the dataset at {data.manifest['root']} has no training examples")
    try:
        parts = part.partition(
            data.labels[train_rows],
            data.speakers[train_rows],
            scheme=partition.scheme,
            num_clients=partition.num_clients,
            seed=seed,
            alpha=partition.alpha,
            classes_per_client=partition.classes_per_client,
            speakers_per_client=partition.speakers_per_client,
            min_partition_size=partition.min_partition_size,
            # silence has no speaker: spread it over the speaker clients
            silence_label=(
                data.label_names.index(SILENCE_LABEL) if SILENCE_LABEL in data.label_names else None
            ),
        )
    except ValueError as err:
        raise ConfigError(f"partition: {err}") from err
    names = list(partition.names)
    if names and len(names) != len(parts):
        raise ConfigError(f"partition.names has {len(names)} names for {len(parts)} clients")
    clients = []
    for pid, rows in enumerate(parts):
        local_train, local_test = part.local_split(
            train_rows[rows], partition.local_test_fraction, seed, pid
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
    return write_with(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")
