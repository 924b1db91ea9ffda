"""Client partitions: disjoint, covering, deterministic, and as skewed as asked."""

from __future__ import annotations

import numpy as np
import pytest

from fedkws.data.partition import SCHEMES, local_split, partition, plot, skew, summary
from fedkws.data.speech_commands import LABELS_12, SILENCE_LABEL
from helpers import compose_cfg

RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 12, 1200)
SPEAKERS = RNG.integers(0, 40, 1200)


def _twelve_class(seed: int = 0, speakers: int = 30) -> tuple[np.ndarray, np.ndarray, int]:
    """A 12-class training split as the data layer gives it: words by real speakers,
    ~10 % silence whose rows all carry one pseudo speaker (the code of ``_silence_``)."""
    rng = np.random.default_rng(seed)
    silence = LABELS_12.index(SILENCE_LABEL)
    words = [i for i in range(12) if i != silence]
    n_words = 1000
    labels = np.concatenate([rng.choice(words, n_words), np.full(110, silence)])
    speaker_ids = np.concatenate([rng.integers(0, speakers, n_words), np.full(110, speakers)])
    order = rng.permutation(len(labels))  # silence rows interleaved, as in the cache
    return labels[order], speaker_ids[order], silence


@pytest.mark.parametrize("scheme", SCHEMES)
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


def test_pathological_gives_k_classes_per_client_and_every_class_a_client():
    for clients in (6, 7, 12):  # 6 x 2 = 12 slots: each class once; 7 x 2: two classes twice
        parts = partition(LABELS, SPEAKERS, "pathological", clients, seed=0, classes_per_client=2)
        assert len(parts) == clients
        assert all(len(set(LABELS[p].tolist())) == 2 for p in parts)
        assert sorted(np.concatenate(parts).tolist()) == list(range(len(LABELS)))
        holders = [sum(c in set(LABELS[p].tolist()) for p in parts) for c in range(12)]
        assert min(holders) >= 1 and max(holders) - min(holders) <= 1  # dealt evenly
        # a class held by several clients is split evenly between them
        for c in range(12):
            shares = [int((LABELS[p] == c).sum()) for p in parts if (LABELS[p] == c).any()]
            assert max(shares) - min(shares) <= 1


def test_pathological_that_cannot_keep_every_row_says_how_many_and_why():
    with pytest.raises(ValueError, match="belong to no client") as err:
        partition(LABELS, SPEAKERS, "pathological", 2, seed=0, classes_per_client=2)
    message = str(err.value)
    lost, total = (int(x) for x in message.split(" training examples")[0].split()[-3::2])
    classes = [int(c) for c in message.split("(classes [")[1].split("]")[0].split(", ")]
    assert len(classes) == 12 - 2 * 2 and total == len(LABELS)
    assert lost == int(np.isin(LABELS, classes).sum())  # the count matches the classes named
    assert "2 * 2 = 4 is less than the 12 classes" in message
    with pytest.raises(ValueError, match="classes_per_client=13"):
        partition(LABELS, SPEAKERS, "pathological", 6, seed=0, classes_per_client=13)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_defaults_of_every_scheme_keep_every_row_and_class(scheme, tmp_path):
    # Catches: a shipped partition config that drops a class (e.g. Flower's
    # first-deterministic mode used only 7-11 of the 12 classes with 6 clients x 2).
    p = compose_cfg([f"partition={scheme}"], tmp_path).partition
    labels, speakers, silence = _twelve_class()
    for seed in range(3):
        parts = partition(labels, speakers, p.scheme, p.num_clients, seed=seed, alpha=p.alpha,
                          classes_per_client=p.classes_per_client,
                          speakers_per_client=p.speakers_per_client,
                          min_partition_size=p.min_partition_size,
                          silence_label=silence)  # fmt: skip
        flat = np.concatenate(parts)
        assert len(flat) == len(labels) and set(flat.tolist()) == set(range(len(labels)))
        assert set(labels[flat].tolist()) == set(range(12))
        assert all(len(rows) > 0 for rows in parts)
        if scheme == "pathological":
            assert all(len(set(labels[rows].tolist())) <= p.classes_per_client for rows in parts)


def test_speaker_partition_spreads_silence_over_the_clients():
    labels, speakers, silence = _twelve_class(seed=1)
    is_sil = labels == silence
    parts = partition(labels, speakers, "speaker", 0, seed=2, speakers_per_client=4,
                      silence_label=silence)  # fmt: skip
    assert len(parts) == 30 // 4  # the pseudo speaker of silence is no client's speaker
    voiced = [rows[~is_sil[rows]] for rows in parts]
    # Each client's silence is its share of all silence, in proportion to its voiced rows.
    n_sil, n_voiced = int(is_sil.sum()), int((~is_sil).sum())
    for rows, words in zip(parts, voiced, strict=True):
        quota = n_sil * len(words) / n_voiced
        assert np.floor(quota) <= is_sil[rows].sum() <= np.ceil(quota)
        assert is_sil[rows].sum() >= 1
    # Real speakers are still never split between clients.
    owner: dict[int, int] = {}
    for cid, words in enumerate(voiced):
        for spk in set(speakers[words].tolist()):
            assert owner.setdefault(spk, cid) == cid
    # Without silence_label the pseudo speaker is grouped like a person: its client
    # holds all 110 silence rows and every other client none (what the argument fixes).
    naive = partition(labels, speakers, "speaker", 0, seed=2, speakers_per_client=4)
    assert sorted(int(is_sil[rows].sum()) for rows in naive)[-2:] == [0, n_sil]
    again = partition(labels, speakers, "speaker", 0, seed=2, speakers_per_client=4,
                      silence_label=silence)  # fmt: skip
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_silence_label_changes_nothing_for_other_schemes():
    labels, speakers, silence = _twelve_class(seed=3)
    for scheme in ("iid", "dirichlet", "pathological"):
        with_label = partition(labels, speakers, scheme, 6, seed=0, silence_label=silence)
        without = partition(labels, speakers, scheme, 6, seed=0)
        assert all(np.array_equal(a, b) for a, b in zip(with_label, without, strict=True))


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
    png = plot(parts, LABELS, names, tmp_path / "p.png", client_names=["alice", "bob", "c", "d"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_partition_plot_names_the_clients_on_its_axis(tmp_path, monkeypatch):
    from helpers import spy_on_figures

    drawn = spy_on_figures(monkeypatch)
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    parts = [np.arange(4), np.arange(4, 8)]
    plot(parts, labels, ("a", "b", "c", "d"), tmp_path / "p.png", client_names=["alice", "bob"])
    assert [t.get_text() for t in drawn[0].get_xticklabels()] == ["alice", "bob"]
    plot(parts, labels, ("a", "b", "c", "d"), tmp_path / "q.png")
    assert [t.get_text() for t in drawn[1].get_xticklabels()] == ["client 0", "client 1"]


def test_an_impossible_dirichlet_minimum_names_its_settings(recwarn):
    # Catches: Flower Datasets' "max number of attempts (10) ... update the values of alpha"
    # (the cause here is min_partition_size) after ten warnings.
    with pytest.raises(ValueError) as err:
        partition(LABELS, SPEAKERS, "dirichlet", 6, seed=0, alpha=0.5, min_partition_size=500)
    message = str(err.value)
    assert "partition.min_partition_size=500 of the 1200 training examples" in message
    assert "(more than the 200 an even split gives each)" in message
    assert not [w for w in recwarn if "min_partition_size" in str(w.message)]


def test_clients_left_without_training_rows_are_said(make_cfg, tmp_path, capsys):
    # Catches: "20 clients" on the console when an extreme label skew left 9 of them empty.
    from fedkws.recipes import common
    from fedkws.spec import from_config
    from helpers import SMALL_FEDERATION

    overrides = [*SMALL_FEDERATION, "partition=dirichlet", "partition.alpha=0.01",
                 "partition.num_clients=12", "partition.min_partition_size=0"]  # fmt: skip
    spec = from_config(make_cfg(overrides))
    tmp_path.mkdir(exist_ok=True)
    parts = common.setup(spec, tmp_path)
    empty = sum(1 for c in parts.clients if len(c.train) == 0)
    assert empty > 0  # the split this test is about
    assert (
        f"12 clients ({sum(len(c.train) for c in parts.clients)} local training rows; "
        f"{empty} clients have none)" in capsys.readouterr().out
    )
