"""Split the training examples across federated clients.

Pure, seeded functions: the same inputs and seed always give the same
clients. The partitioners themselves are Flower Datasets' (IID, Dirichlet
label skew, pathological k-classes, natural speaker ids) applied to an
in-memory ``datasets.Dataset`` of ``(label, speaker)`` rows.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from fedkws.core.seeding import Stream

log = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet", "speaker", "pathological")


def _speaker_order(speakers: np.ndarray, seed: int) -> np.ndarray:
    """A seeded random rank per speaker, so speaker groups differ between seeds."""
    unique = np.unique(speakers)
    ranks = np.random.default_rng(seed).permutation(len(unique))
    lookup = dict(zip(unique.tolist(), ranks.tolist(), strict=True))
    return np.array([lookup[s] for s in speakers.tolist()], dtype=np.int64)


def _make_partitioner(
    scheme: str,
    num_clients: int,
    seed: int,
    alpha: float,
    classes_per_client: int,
    speakers_per_client: int,
    min_partition_size: int,
    num_speakers: int,
):
    """The Flower Datasets partitioner of ``scheme``."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        GroupedNaturalIdPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if scheme == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if scheme == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=False,
            seed=seed,
        )
    if scheme == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            num_classes_per_partition=classes_per_client,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    if speakers_per_client > num_speakers:
        raise ValueError(
            f"speakers_per_client={speakers_per_client} but the training data has only "
            f"{num_speakers} speakers"
        )
    return GroupedNaturalIdPartitioner(
        partition_by="speaker",
        group_size=speakers_per_client,
        mode="allow-bigger",
        sort_unique_ids=True,
    )


def _load_partitions(part, labels: np.ndarray) -> list[np.ndarray]:
    """Every partition's sorted rows; warn about rows no client got."""
    with warnings.catch_warnings():
        # Reported below in our own words, with the number of examples affected.
        warnings.filterwarnings("ignore", message="Classes: .* will NOT be used")
        out = [
            np.sort(np.asarray(part.load_partition(i)["row"], dtype=np.int64))
            for i in range(part.num_partitions)
        ]
    n = len(labels)
    unused = n - sum(len(p) for p in out)
    if unused:
        left = sorted(set(labels.tolist()) - set(labels[np.concatenate(out)].tolist()))
        log.warning(
            "pathological partition: %d of %d training examples (classes %s) belong to no "
            "client; use num_clients * classes_per_client >= the number of classes to keep them",
            unused,
            n,
            left,
        )
    return out


def partition(
    labels: np.ndarray,
    speakers: np.ndarray,
    scheme: str,
    num_clients: int,
    seed: int,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    speakers_per_client: int = 1,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Assign every row to one client.

    Parameters
    ----------
    labels, speakers
        One entry per training example (speakers as integer ids).
    scheme
        ``iid``; ``dirichlet`` (label skew with concentration ``alpha``: smaller is
        more skewed); ``speaker`` (natural ids: each client is
        ``speakers_per_client`` whole speakers, so ``num_clients`` is ignored and
        follows from the data); ``pathological`` (``classes_per_client`` labels
        per client).
    min_partition_size
        Dirichlet only: resample until every client has at least this many rows.

    Returns
    -------
    list of numpy.ndarray
        Sorted row positions per client; disjoint, and together every row.
    """
    import datasets
    from datasets import Dataset

    if scheme not in SCHEMES:
        raise ValueError(
            f"Unknown partition scheme '{scheme}'. Valid schemes: {', '.join(SCHEMES)}"
        )
    labels = np.asarray(labels, dtype=np.int64)
    speakers = np.asarray(speakers)
    if len(labels) != len(speakers):
        raise ValueError("labels and speakers must have one entry per example")
    n = len(labels)
    if scheme != "speaker" and not 1 <= num_clients <= n:
        raise ValueError(f"num_clients={num_clients} must be between 1 and {n} (the examples)")

    datasets.disable_progress_bars()
    table = Dataset.from_dict(
        {
            "row": np.arange(n),
            "label": labels,
            "speaker": _speaker_order(speakers, seed),
        }
    )
    if scheme == "iid":
        # IidPartitioner cuts contiguous shards: shuffle first to make them random.
        table = table.shuffle(seed=seed).flatten_indices()
    part = _make_partitioner(
        scheme, num_clients, seed, alpha, classes_per_client, speakers_per_client,
        min_partition_size, len(np.unique(speakers)),
    )  # fmt: skip
    part.dataset = table
    return _load_partitions(part, labels)


def local_split(
    rows: np.ndarray, test_fraction: float, seed: int, client_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's rows into its local train and test sets (seeded per client)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rng = np.random.default_rng([seed, client_id, int(Stream.LOCAL_TEST_SPLIT)])
    perm = rng.permutation(rows)
    n_test = int(round(len(rows) * test_fraction))
    if test_fraction > 0 and len(rows) > 1:
        n_test = max(1, min(n_test, len(rows) - 1))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def label_histogram(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``(clients, classes)`` counts."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def skew(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> float:
    """Mean total-variation distance between each client's label mix and the global one.

    0 for perfectly IID clients, approaching 1 when each client holds one class
    that is rare globally.
    """
    hist = label_histogram(parts, labels, num_classes).astype(float)
    local = hist / hist.sum(1, keepdims=True).clip(min=1)
    glob = hist.sum(0) / hist.sum()
    return float(0.5 * np.abs(local - glob).sum(1).mean())


def summary(parts: list[np.ndarray], labels: np.ndarray, label_names: tuple[str, ...]) -> str:
    """A table of client sizes and label histograms."""
    hist = label_histogram(parts, labels, len(label_names))
    short = [name.strip("_")[:6] for name in label_names]
    lines = [
        f"{len(parts)} clients, sizes min {hist.sum(1).min()} / median "
        f"{int(np.median(hist.sum(1)))} / max {hist.sum(1).max()}, "
        f"label skew (mean TV distance) {skew(parts, labels, len(label_names)):.3f}",
        f"{'client':>6} {'size':>6} " + " ".join(f"{s:>6}" for s in short),
    ]
    for cid, row in enumerate(hist):
        lines.append(f"{cid:>6} {row.sum():>6} " + " ".join(f"{c:>6}" for c in row))
    return "\n".join(lines)


def plot(
    parts: list[np.ndarray], labels: np.ndarray, label_names: tuple[str, ...], path: Path | str
) -> Path:
    """Stacked bar chart of the label distribution per client, saved as PNG."""
    from matplotlib import colormaps

    from fedkws.plots import figure

    hist = label_histogram(parts, labels, len(label_names))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with figure(path, figsize=(max(6, 0.35 * len(parts) + 3), 4)) as (_, ax):
        bottom = np.zeros(len(parts))
        cmap = colormaps["tab20"]
        for k, name in enumerate(label_names):
            ax.bar(np.arange(len(parts)), hist[:, k], bottom=bottom, color=cmap(k % 20), label=name)
            bottom += hist[:, k]
        ax.set_xlabel("client")
        ax.set_ylabel("training examples")
        skewness = skew(parts, labels, len(label_names))
        ax.set_title(f"label distribution per client (skew {skewness:.2f})")
        ax.legend(fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    return path
