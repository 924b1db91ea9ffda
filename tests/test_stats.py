"""Intervals on accuracies: the cluster bootstrap covers the truth, the iid one does not."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from fedkws.core.stats import (
    cluster_bootstrap_ci,
    iid_bootstrap_ci,
    paired_difference_ci,
    t_interval,
    t_quantile,
)

# Per-speaker accuracy ~ Beta(4, 2): population accuracy exactly 4 / 6, and an
# intra-speaker correlation of 1 / (4 + 2 + 1) = 0.14; with 20 utterances per
# speaker the design effect is 1 + 19 / 7 = 3.7, so an iid interval is ~1.9x too narrow.
A, B = 4.0, 2.0
TRUTH = A / (A + B)


def _clustered(rng: np.random.Generator, n_clusters: int = 80, size: int = 20):
    """One simulated test set: (correct, clusters), speakers with uneven sizes."""
    sizes = rng.integers(size // 2, size * 3 // 2 + 1, n_clusters)
    p = rng.beta(A, B, n_clusters)
    clusters = np.repeat(np.arange(n_clusters) * 7 + 3, sizes)  # ids need not be 0..K-1
    correct = rng.random(clusters.size) < np.repeat(p, sizes)
    return correct, clusters


def _coverage(interval, n_sim: int = 200) -> float:
    rng = np.random.default_rng(12345)
    hits = 0
    for sim in range(n_sim):
        correct, clusters = _clustered(rng)
        lo, hi = interval(correct, clusters, sim)
        hits += lo <= TRUTH <= hi
    return hits / n_sim


def test_cluster_bootstrap_covers_the_truth_at_the_nominal_rate():
    coverage = _coverage(lambda c, k, s: cluster_bootstrap_ci(c, k, seed=s))
    assert 0.90 <= coverage <= 0.99, coverage


def test_iid_bootstrap_undercovers_clustered_data():
    # Catches: clustering ignored (examples resampled as if independent).
    coverage = _coverage(lambda c, k, s: iid_bootstrap_ci(c, seed=s))
    assert coverage < 0.85, coverage


def test_equals_a_literal_resampling_of_the_clusters():
    # The vectorised multiplicity matrix must equal pooling the drawn clusters' examples.
    rng = np.random.default_rng(1)
    correct, clusters = _clustered(rng, n_clusters=15, size=6)
    ids = np.unique(clusters)  # the draws index the sorted distinct ids
    draws = np.random.default_rng(9).integers(0, len(ids), size=(300, len(ids)))
    accs = [np.concatenate([correct[clusters == ids[j]] for j in row]).mean() for row in draws]
    expected = np.quantile(accs, [0.05, 0.95])
    got = cluster_bootstrap_ci(correct, clusters, n_boot=300, level=0.90, seed=9)
    assert np.allclose(got, expected, rtol=0, atol=1e-12)


def test_deterministic_with_seed_and_depends_on_it():
    correct, clusters = _clustered(np.random.default_rng(2))
    first = cluster_bootstrap_ci(correct, clusters, seed=5)
    assert cluster_bootstrap_ci(correct, clusters, seed=5) == first
    assert cluster_bootstrap_ci(correct, clusters, seed=6) != first
    assert first[0] < correct.mean() < first[1]
    assert paired_difference_ci(correct, ~correct, clusters, seed=5) == paired_difference_ci(
        correct, ~correct, clusters, seed=5
    )


def _two_correlated_arms(rng: np.random.Generator, shift: float = 0.04):
    """Arm b is arm a with ~``shift`` of its right answers turned wrong (same speakers)."""
    correct_a, clusters = _clustered(rng)
    flip = rng.random(correct_a.size) < shift / TRUTH
    return correct_a, correct_a & ~flip, clusters


def test_paired_interval_is_narrower_than_unpaired_when_arms_are_correlated():
    a, b, clusters = _two_correlated_arms(np.random.default_rng(3))
    diff, lo, hi = paired_difference_ci(a, b, clusters, seed=0)
    assert diff == pytest.approx(a.mean() - b.mean(), abs=1e-15)
    assert lo <= diff <= hi and lo > 0  # b is strictly worse: the interval excludes 0
    # Unpaired: the two accuracies resampled independently (different speaker draws).
    lo_a, hi_a = cluster_bootstrap_ci(a, clusters, seed=1)
    lo_b, hi_b = cluster_bootstrap_ci(b, clusters, seed=2)
    unpaired_width = math.hypot(hi_a - lo_a, hi_b - lo_b)
    assert hi - lo < 0.5 * unpaired_width, (hi - lo, unpaired_width)
    assert lo_b < hi_a  # unpaired, the two intervals overlap: only pairing resolves the gap


def test_paired_interval_covers_the_true_difference():
    rng = np.random.default_rng(4)
    hits = 0
    for sim in range(200):
        a, b, clusters = _two_correlated_arms(rng)
        _, lo, hi = paired_difference_ci(a, b, clusters, seed=sim)
        hits += lo <= 0.04 <= hi  # P(a right, b wrong) = TRUTH * 0.04 / TRUTH
    assert 0.90 <= hits / 200 <= 0.99


def test_identical_arms_and_single_cluster_are_degenerate():
    correct, clusters = _clustered(np.random.default_rng(5))
    assert paired_difference_ci(correct, correct, clusters) == (0.0, 0.0, 0.0)
    lo, hi = cluster_bootstrap_ci(correct[:10], np.zeros(10, dtype=int))
    assert lo == hi == correct[:10].mean()


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match="one entry per example"):
        cluster_bootstrap_ci(np.ones(5, bool), np.zeros(4, int))
    with pytest.raises(ValueError, match="no examples"):
        cluster_bootstrap_ci(np.ones(0, bool), np.zeros(0, int))
    with pytest.raises(ValueError, match="level"):
        cluster_bootstrap_ci(np.ones(5, bool), np.zeros(5, int), level=95)
    with pytest.raises(ValueError, match="two arms"):
        paired_difference_ci(np.ones(5, bool), np.ones(4, bool), np.zeros(5, int))


def test_2000_resamples_of_5000_examples_take_well_under_a_second():
    rng = np.random.default_rng(6)
    clusters = rng.integers(0, 300, 5000)
    correct = rng.random(5000) < 0.8
    other = correct ^ (rng.random(5000) < 0.05)
    start = time.perf_counter()
    cluster_bootstrap_ci(correct, clusters)
    paired_difference_ci(correct, other, clusters)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, elapsed  # both together; measured ~0.03 s on 2 cores


# Two-sided 95 % (p = 0.975) Student t quantiles from printed tables.
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 10: 2.228, 29: 2.045, 30: 2.042}


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_matches_the_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T_TABLE[df], abs=5e-4)


def test_t_quantile_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 8, 17, 60, 200):
        for p in (0.5, 0.8, 0.95, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), abs=1e-8)


def test_t_interval_over_seeds():
    values = [0.80, 0.84, 0.78]
    mean = sum(values) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert t_interval(values) == pytest.approx((mean - half, mean + half), abs=1e-9)
    with pytest.raises(ValueError, match="two values"):
        t_interval([0.8])


def test_iid_bootstrap_equals_the_cluster_bootstrap_with_one_example_per_cluster():
    correct = np.random.default_rng(7).random(400) < 0.7
    iid = iid_bootstrap_ci(correct, n_boot=4000)
    singletons = cluster_bootstrap_ci(correct, np.arange(400), n_boot=4000)
    assert np.allclose(iid, singletons, atol=0.01)  # same distribution, different draws
