"""Split the training examples across federated clients.

Pure, seeded functions: the same inputs and seed always give the same
clients. IID, Dirichlet label skew and natural speaker ids are Flower
Datasets' partitioners applied to an in-memory ``datasets.Dataset`` of
``(label, speaker)`` rows; the pathological k-classes split is done here,
because none of Flower's class assignment modes guarantees that every class
reaches a client (``first-deterministic`` draws all but the first class of each
client at random, ``deterministic`` gives client i classes i..i+k-1, so 6
clients x 2 classes use only 7 of 12).

Every training row goes to exactly one client. A configuration that cannot
keep them all (pathological with ``num_clients * classes_per_client`` below
the number of classes) is an error that says how many rows would be lost and
why, never a silent drop.

Silence examples (the ``_silence_`` class of the 12-class protocol) are cut
from background recordings and have no speaker: the data layer gives them all
one pseudo speaker. Under the speaker scheme they would form one client of
pure silence; pass ``silence_label`` and they are spread over the speaker
clients in proportion to the clients' sizes instead, like any other class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedkws.core.seeding import Stream

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
    speakers_per_client: int,
    min_partition_size: int,
    num_speakers: int,
):
    """The Flower Datasets partitioner of ``scheme`` (not pathological)."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        GroupedNaturalIdPartitioner,
        IidPartitioner,
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


def _load_partitions(part, n: int) -> list[np.ndarray]:
    """Every partition's sorted ``row`` values; an error if a row reached no client."""
    out = [
        np.sort(np.asarray(part.load_partition(i)["row"], dtype=np.int64))
        for i in range(part.num_partitions)
    ]
    _check_every_row_kept(out, n)
    return out


def _dirichlet_partitions(
    part, n: int, num_clients: int, alpha: float, min_partition_size: int
) -> list[np.ndarray]:
    """:func:`_load_partitions` of a Dirichlet partitioner, its failure in fedkws's words.

    Flower Datasets draws again (up to 10 times, each with a warning) until every client
    holds ``min_partition_size`` rows, then blames alpha alone.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*min_partition_size.*")
        warnings.filterwarnings("ignore", message=".*attempts.*")
        try:
            return _load_partitions(part, n)
        except ValueError as err:
            if "attempts" not in str(err):
                raise
    even = n // num_clients
    why = (
        f"{'more than' if min_partition_size > even else 'all of'} the {even} an even split "
        "gives each"
        if min_partition_size >= even
        else f"alpha={alpha:g} leaves some client fewer"
    )
    raise ValueError(
        f"no Dirichlet draw in 10 gave each of the {num_clients} clients at least "
        f"partition.min_partition_size={min_partition_size} of the {n} training examples "
        f"({why}): lower partition.min_partition_size or partition.num_clients, or raise "
        "partition.alpha"
    )


def _grouped_partitions(part, rows: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
    """Each group's sorted ``rows`` of a ``GroupedNaturalIdPartitioner``, from its id groups.

    The rows ``load_partition(i)`` holds, for every ``i``, read from the
    partitioner's public ``partition_id_to_natural_ids`` instead of building one
    ``datasets.Dataset`` per client (about 1.5 ms each: seconds for the thousands
    of clients of a speaker partition). ``ids`` is the natural-id column, row by row.
    """
    num = part.num_partitions  # makes the groups
    owner_of = {nid: pid for pid, nids in part.partition_id_to_natural_ids.items() for nid in nids}
    owner = np.array([owner_of.get(i, -1) for i in ids.tolist()], dtype=np.int64)
    kept = np.flatnonzero(owner >= 0)  # a row of no group is reported by the caller's check
    order = kept[np.argsort(owner[kept], kind="stable")]
    bounds = np.cumsum(np.bincount(owner[kept], minlength=num))[:-1]
    return [np.sort(rows[chunk]) for chunk in np.split(order, bounds)]


def _check_every_row_kept(parts: list[np.ndarray], n: int) -> None:
    """A safety net behind every scheme: each row on exactly one client."""
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    kept = len(np.unique(flat))
    if kept != n or len(flat) != n:
        raise ValueError(
            f"partition: {n - kept} of {n} training examples belong to no client and "
            f"{len(flat) - kept} to more than one (the partitioner lost or repeated them)"
        )


def _pathological(
    labels: np.ndarray, num_clients: int, classes_per_client: int, seed: int
) -> list[np.ndarray]:
    """Each client ``classes_per_client`` classes; every class on at least one client.

    The classes are shuffled (seeded) and dealt round the clients in order, so
    client ``i`` holds shuffled classes ``i*k .. i*k+k-1`` (wrapping around):
    with ``num_clients * k >= classes`` every class is dealt, each to
    ``floor`` or ``ceil`` of ``num_clients * k / classes`` clients. A class's
    rows are shuffled and split evenly among the clients that hold it.
    """
    classes = np.unique(labels)
    c, k = len(classes), classes_per_client
    if not 1 <= k <= c:
        raise ValueError(
            f"classes_per_client={k} must be between 1 and {c} (the classes in the training data)"
        )
    rng = np.random.default_rng([seed, _PATHOLOGICAL_STREAM])
    order = classes[rng.permutation(c)]
    if num_clients * k < c:
        dropped = order[num_clients * k :]
        lost = int(np.isin(labels, dropped).sum())
        raise ValueError(
            f"pathological partition: {lost} of {len(labels)} training examples (classes "
            f"{sorted(dropped.tolist())}) would belong to no client, because num_clients * "
            f"classes_per_client = {num_clients} * {k} = {num_clients * k} is less than the "
            f"{c} classes; raise num_clients or classes_per_client"
        )
    holders: dict[int, list[int]] = {int(cls): [] for cls in classes}
    for client in range(num_clients):
        for j in range(k):
            holders[int(order[(client * k + j) % c])].append(client)
    rows: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls, clients in holders.items():
        members = rng.permutation(np.flatnonzero(labels == cls))
        for client, chunk in zip(clients, np.array_split(members, len(clients)), strict=True):
            rows[client].append(chunk)
    parts = [np.sort(np.concatenate(r)) for r in rows]
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(
            f"pathological partition: clients {empty} get no examples (their classes have "
            f"fewer examples than clients holding them); lower num_clients or "
            f"classes_per_client"
        )
    _check_every_row_kept(parts, len(labels))
    return parts


def _spread(parts: list[np.ndarray], extra: np.ndarray, seed: int) -> list[np.ndarray]:
    """Add the rows ``extra`` to the clients in proportion to their sizes (seeded)."""
    sizes = np.array([len(p) for p in parts], dtype=np.float64)
    quota = len(extra) * sizes / sizes.sum()
    counts = np.floor(quota).astype(np.int64)
    # largest remainders get the rest (ties to the lower client id)
    rest = len(extra) - counts.sum()
    counts[np.argsort(-(quota - counts), kind="stable")[:rest]] += 1
    shuffled = np.random.default_rng([seed, _SILENCE_STREAM]).permutation(extra)
    chunks = np.split(shuffled, np.cumsum(counts)[:-1])
    return [np.sort(np.concatenate([p, c])) for p, c in zip(parts, chunks, strict=True)]


# Stream tags of this module's own random draws (fixed: changing one changes partitions).
_PATHOLOGICAL_STREAM = 0x9A7
_SILENCE_STREAM = 0x51E


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
    silence_label: int | None = None,
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
        per client, every label on some client).
    min_partition_size
        Dirichlet only: resample until every client has at least this many rows.
    silence_label
        The label of speakerless silence examples, if any. Speaker scheme only:
        their (pseudo) speaker is ignored and they are spread over the speaker
        clients in proportion to the clients' sizes. Other schemes treat
        silence like any class.

    Returns
    -------
    list of numpy.ndarray
        Sorted row positions per client; disjoint, and together every row.

    Raises
    ------
    ValueError
        A bad argument, or a configuration that would leave rows on no client
        (the message says how many and why).
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
    if scheme == "pathological":
        return _pathological(labels, num_clients, classes_per_client, seed)

    voiced = np.arange(n)
    if scheme == "speaker" and silence_label is not None:
        voiced = np.flatnonzero(labels != silence_label)
        if len(voiced) == 0:
            raise ValueError("the speaker partition needs examples with speakers, not only silence")
    datasets.disable_progress_bars()
    ranks = _speaker_order(speakers[voiced], seed)
    table = Dataset.from_dict({"row": voiced, "label": labels[voiced], "speaker": ranks})
    if scheme == "iid":
        # IidPartitioner cuts contiguous shards: shuffle first to make them random.
        table = table.shuffle(seed=seed).flatten_indices()
    part = _make_partitioner(
        scheme, num_clients, seed, alpha, speakers_per_client, min_partition_size,
        len(np.unique(speakers[voiced])),
    )  # fmt: skip
    part.dataset = table
    if scheme == "speaker":
        out = _grouped_partitions(part, voiced, ranks)
        _check_every_row_kept(out, len(voiced))
    elif scheme == "dirichlet":
        out = _dirichlet_partitions(part, len(voiced), num_clients, alpha, min_partition_size)
    else:
        out = _load_partitions(part, len(voiced))
    if len(voiced) < n:
        out = _spread(out, np.setdiff1d(np.arange(n), voiced), seed)
    _check_every_row_kept(out, n)
    return out


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


_MAX_BARS = 100  # clients drawn as bars in plot(); more are drawn as step curves


def plot(
    parts: list[np.ndarray],
    labels: np.ndarray,
    label_names: tuple[str, ...],
    path: Path | str,
    client_names: list[str] | None = None,
) -> Path:
    """Stacked bar chart of the label distribution per client, saved as PNG.

    Up to ``_MAX_BARS`` clients the x axis names each client (``client_names``,
    default ``client 0``, ``client 1``, ...).
    """
    from matplotlib import colormaps

    from fedkws.plots import figure

    hist = label_histogram(parts, labels, len(label_names))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Beyond _MAX_BARS clients (a speaker partition has thousands) the figure stops
    # growing and each class is one filled step curve, not one bar per client.
    many = len(parts) > _MAX_BARS
    width = max(6, 0.35 * min(len(parts), _MAX_BARS) + 3)
    with figure(path, figsize=(width, 4)) as (_, ax):
        bottom = np.zeros(len(parts))
        cmap = colormaps["tab20"]
        edges = np.arange(len(parts) + 1) - 0.5
        for k, name in enumerate(label_names):
            if many:
                top = bottom + hist[:, k]
                ax.stairs(top, edges, baseline=bottom, fill=True, color=cmap(k % 20), label=name)
            else:
                ax.bar(np.arange(len(parts)), hist[:, k], bottom=bottom, color=cmap(k % 20),
                       label=name)  # fmt: skip
            bottom += hist[:, k]
        ax.set_xlabel("client")
        if not many:
            names = client_names or [f"client {k}" for k in range(len(parts))]
            ax.set_xticks(np.arange(len(parts)), names, rotation=90 if len(parts) > 8 else 0)
        ax.set_ylabel("training examples")
        skewness = skew(parts, labels, len(label_names))
        ax.set_title(f"label distribution per client (skew {skewness:.2f})")
        ax.legend(fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    return path
