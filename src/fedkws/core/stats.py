"""Uncertainty of reported accuracies: speaker-clustered bootstrap and t intervals.

Keyword-spotting test sets hold several utterances per speaker, and a model is
right or wrong about a speaker's utterances together (voice, microphone, room).
The examples are therefore not independent: an iid bootstrap over examples
treats 5,000 utterances of 300 speakers as 5,000 independent draws and gives
intervals that are too narrow. The cluster bootstrap resamples *speakers* with
replacement and pools their examples, which keeps the within-speaker
correlation in every resample.

All functions are numpy only (no Flower, no Hydra) and deterministic for a
given ``seed``. One resampling is an ``(n_boot, n_clusters)`` matrix of
multiplicities, so 2000 resamples of 300 clusters cost one matrix product,
independent of the number of examples.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "cluster_bootstrap_ci",
    "iid_bootstrap_ci",
    "paired_difference_ci",
    "t_interval",
    "t_quantile",
]


def _check_level(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")


def _cluster_sums(
    clusters: np.ndarray, *columns: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Examples per cluster, and each column summed per cluster."""
    clusters = np.asarray(clusters)
    if clusters.ndim != 1:
        raise ValueError("clusters must be one-dimensional (one id per example)")
    for col in columns:
        if col.shape != clusters.shape:
            raise ValueError(
                f"correct and clusters need one entry per example: got {col.shape[0]} "
                f"and {clusters.shape[0]}"
            )
    if clusters.size == 0:
        raise ValueError("no examples: an accuracy of nothing has no interval")
    _, code = np.unique(clusters, return_inverse=True)
    code = code.ravel()
    sizes = np.bincount(code).astype(np.float64)
    sums = [
        np.bincount(code, weights=col.astype(np.float64), minlength=len(sizes)) for col in columns
    ]
    return sizes, sums


def _multiplicities(n_clusters: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n_clusters)``: how often each cluster is drawn in each resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_clusters, size=(n_boot, n_clusters))
    flat = draws + (np.arange(n_boot) * n_clusters)[:, None]
    counts = np.bincount(flat.ravel(), minlength=n_boot * n_clusters)
    return counts.reshape(n_boot, n_clusters).astype(np.float64)


def _percentile(stats: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [tail, 1.0 - tail])
    return float(lo), float(hi)


def cluster_bootstrap_ci(
    correct: np.ndarray,
    clusters: np.ndarray,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the accuracy from a cluster (speaker) bootstrap.

    Parameters
    ----------
    correct
        One boolean per example: whether the prediction was right.
    clusters
        One id per example (e.g. the speaker); any integer (or sortable) ids.
    n_boot
        Number of resamples. Each draws as many clusters as there are, with
        replacement, and pools their examples.
    level
        Coverage of the interval (0.95: the 2.5 % and 97.5 % percentiles).
    seed
        The resampling is a function of ``seed`` only: same inputs, same interval.

    Returns
    -------
    tuple of float
        ``(lo, hi)``.
    """
    _check_level(level, n_boot)
    correct = np.asarray(correct, dtype=bool)
    sizes, (hits,) = _cluster_sums(clusters, correct)
    w = _multiplicities(len(sizes), n_boot, seed)
    acc = (w @ hits) / (w @ sizes)  # every resample draws >= 1 cluster, all of size >= 1
    return _percentile(acc, level)


def paired_difference_ci(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    clusters: np.ndarray,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Difference of two accuracies on the same examples, with a paired cluster bootstrap.

    ``correct_a`` and ``correct_b`` are two arms evaluated on the same examples
    (e.g. one trained model in eval, recalibrated and train BatchNorm mode).
    Each resample draws the clusters once and applies them to both arms, so what
    the arms share (the hard speakers) cancels in the difference.

    Returns
    -------
    tuple of float
        ``(diff, lo, hi)``: ``acc(a) - acc(b)`` on the data, and its interval.
    """
    _check_level(level, n_boot)
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"the two arms have {a.shape[0]} and {b.shape[0]} examples")
    sizes, (delta,) = _cluster_sums(clusters, a.astype(np.float64) - b.astype(np.float64))
    w = _multiplicities(len(sizes), n_boot, seed)
    diffs = (w @ delta) / (w @ sizes)
    lo, hi = _percentile(diffs, level)
    return float(a.mean() - b.mean()), lo, hi


def iid_bootstrap_ci(
    correct: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """The naive bootstrap over examples, as if every example were independent.

    Resampling ``n`` examples with replacement draws ``Binomial(n, acc)`` right
    answers, so that is what is drawn. Too narrow when examples are correlated
    within speakers; kept to show that.
    """
    _check_level(level, n_boot)
    correct = np.asarray(correct, dtype=bool)
    if correct.size == 0:
        raise ValueError("no examples: an accuracy of nothing has no interval")
    rng = np.random.default_rng(seed)
    acc = rng.binomial(correct.size, correct.mean(), size=n_boot) / correct.size
    return _percentile(acc, level)


def _t_two_sided_mass(t: float, df: int) -> float:
    """``P(|T| < t)`` for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(1, df // 2):  # (1*3*..*(2k-1)) / (2*4*..*2k) cos^2k
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    if df == 1:
        return 2.0 * theta / math.pi
    term, total = math.cos(theta), math.cos(theta)
    for k in range(1, (df - 1) // 2):  # (2*4*..*2k) / (3*5*..*(2k+1)) cos^(2k+1)
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2.0 / math.pi * (theta + s * total)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (``0.5 <= p < 1``) of Student's t with integer ``df >= 1``."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df}")
    if not 0.5 <= p < 1.0:
        raise ValueError(f"p must be in [0.5, 1), got {p}")
    target = 2.0 * p - 1.0
    lo, hi = 0.0, 1.0
    while _t_two_sided_mass(hi, int(df)) < target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_two_sided_mass(mid, int(df)) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_interval(values: np.ndarray | list[float], level: float = 0.95) -> tuple[float, float]:
    """``mean ± t_{n-1} * sd / sqrt(n)``: the interval of the mean over ``n >= 2`` values.

    Used across seeds: each seed is one draw of the whole training and test
    procedure, so the seeds' spread already contains every source of variation.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size < 2:
        raise ValueError(f"a t interval needs at least two values, got {x.size}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    half = t_quantile(0.5 + level / 2.0, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    mean = float(x.mean())
    return mean - half, mean + half
