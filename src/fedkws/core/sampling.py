"""Which clients train in a round: a pure function of the seed and the round."""

from __future__ import annotations

from collections.abc import Sequence

from fedkws.core.seeding import sampling_rng


def sample_clients(
    seed: int, round_: int, eligible: Sequence[int], fraction: float, min_clients: int
) -> list[int]:
    """The partition ids that train in ``round_``, sorted.

    ``round(fraction * len(eligible))`` of ``eligible`` (at least ``min_clients``,
    at most all), drawn without replacement from the round's stream.
    """
    n = len(eligible)
    k = min(n, max(min_clients, int(round(fraction * n))))
    picks = sampling_rng(seed, round_).choice(n, size=k, replace=False)
    return sorted(int(eligible[i]) for i in picks)
