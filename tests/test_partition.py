"""Client partitions: disjoint, covering, deterministic, and as skewed as asked."""

from __future__ import annotations

import numpy as np
import pytest

from fedkws.data.partition import local_split, partition, plot, skew, summary

RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 12, 1200)
SPEAKERS = RNG.integers(0, 40, 1200)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "speaker"])
def test_disjoint_covering_deterministic(scheme):
    parts = partition(LABELS, SPEAKERS, scheme, 6, seed=3, alpha=0.5, speakers_per_client=4)
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat.tolist())) == len(LABELS)  # disjoint and covering
    again = partition(LABELS, SPEAKERS, scheme, 6, seed=3, alpha=0.5, speakers_per_client=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(LABELS, SPEAKERS, scheme, 6, seed=4, alpha=0.5, speakers_per_client=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_smaller_alpha_gives_more_label_skew():
    measured = {
        alpha: np.mean([skew(partition(LABELS, SPEAKERS, "dirichlet", 6, seed=s, alpha=alpha,
                                       min_partition_size=5), LABELS, 12) for s in range(3)])
        for alpha in (0.05, 0.5, 100.0)
    }  # fmt: skip
    assert measured[0.05] > measured[0.5] > measured[100.0]
    iid = skew(partition(LABELS, SPEAKERS, "iid", 6, seed=0), LABELS, 12)
    assert iid < 0.15 and measured[0.05] > 0.5


def test_speaker_partition_never_splits_a_speaker():
    parts = partition(LABELS, SPEAKERS, "speaker", 0, seed=1, speakers_per_client=3)
    owner = {}
    for cid, rows in enumerate(parts):
        for spk in set(SPEAKERS[rows].tolist()):
            assert owner.setdefault(spk, cid) == cid
    assert len(parts) == 40 // 3
    assert all(len(set(SPEAKERS[rows].tolist())) >= 3 for rows in parts)


def test_pathological_gives_k_classes_per_client_and_reports_unused(caplog):
    parts = partition(LABELS, SPEAKERS, "pathological", 12, seed=0, classes_per_client=2)
    assert all(len(set(LABELS[p].tolist())) <= 2 for p in parts)
    assert len(np.concatenate(parts)) == len(LABELS)  # 12 clients x 2 >= 12 classes: all used
    few = partition(LABELS, SPEAKERS, "pathological", 2, seed=0, classes_per_client=2)
    assert len(np.concatenate(few)) < len(LABELS)
    assert any("belong to no client" in r.message for r in caplog.records)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="iid, dirichlet, speaker, pathological"):
        partition(LABELS, SPEAKERS, "random", 4, seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        partition(LABELS, SPEAKERS, "iid", 0, seed=0)


def test_local_split_is_disjoint_and_seeded():
    rows = np.arange(100, 200)
    train, test = local_split(rows, 0.2, seed=0, client_id=3)
    assert len(test) == 20 and len(train) == 80
    assert not set(train) & set(test) and set(train) | set(test) == set(rows.tolist())
    assert np.array_equal(test, local_split(rows, 0.2, seed=0, client_id=3)[1])
    assert not np.array_equal(test, local_split(rows, 0.2, seed=0, client_id=4)[1])


def test_summary_and_plot(tmp_path):
    parts = partition(LABELS, SPEAKERS, "dirichlet", 4, seed=0, alpha=0.3)
    names = tuple(f"c{i}" for i in range(12))
    text = summary(parts, LABELS, names)
    assert text.splitlines()[0].startswith("4 clients")
    assert len(text.splitlines()) == 2 + 4
    png = plot(parts, LABELS, names, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
