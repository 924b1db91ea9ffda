"""Published claims about federated BatchNorm, read off a sweep: reproduced here or not.

Each claim says that one (arm, metric) beats another on one kind of clients.
The sweep's cells are found by their overrides (``arm=<arm>`` and
``partition=<partition>``, as the ``bn_study`` and ``literature`` presets name
them). Per seed that both cells finished, the difference *claimed better minus
claimed worse*; over the seeds its mean, sd and 95 % t interval
(as the report's cells: :func:`fedkws.report._stats`). The verdict:

* ``reproduced``: the interval lies wholly above 0;
* ``contradicted``: wholly below 0;
* ``not resolved``: it contains 0, or fewer than two seeds are paired.

Claims whose two cells are not both in the sweep, or are ambiguous (a sweep over a
third axis has several cells with the same arm and partition), are left out. Every verdict
holds for this sweep's model, data and rounds only: a claim not reproduced on
a small model trained for a few rounds is not refuted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Side:
    """One side of a comparison: an arm (``conf/arm``) and a summary key of its runs."""

    arm: str
    metric: str

    def __str__(self) -> str:
        return f"{self.arm} {self.metric.removeprefix('final/')}"


@dataclass(frozen=True)
class Claim:
    """``better`` beats ``worse`` on clients split by ``partition`` (``source`` says so)."""

    text: str
    source: str
    partition: str
    better: Side
    worse: Side


EVAL, TRAIN, FED = "test/eval/acc", "test/train/acc", "final/fed/eval/acc_mean"
CLAIMS = (
    Claim("without its statistics a BatchNorm model collapses in eval mode, not in train mode",
          "the 2020 tutorial", "iid",
          Side("batch_params_only", TRAIN), Side("batch_params_only", EVAL)),
    Claim("shipping the statistics too (the full state) removes the collapse",
          "the 2020 tutorial's fix", "iid",
          Side("batch_full", EVAL), Side("batch_params_only", EVAL)),
    Claim("GroupNorm beats BatchNorm under label skew",
          "Hsieh et al. 2020", "dirichlet", Side("group", EVAL), Side("batch_full", EVAL)),
    Claim("FedBN beats FedAvg with BatchNorm under feature shift, per client",
          "Li et al. 2021", "channels", Side("batch_fedbn", FED), Side("batch_full", FED)),
    Claim("SiloBN beats FedAvg with BatchNorm under feature shift, per client",
          "Andreux et al. 2020", "channels", Side("batch_silo", FED), Side("batch_full", FED)),
    Claim("FixBN beats FedAvg with BatchNorm under label skew",
          "Zhong et al. 2023", "dirichlet", Side("batch_fixbn", EVAL), Side("batch_full", EVAL)),
    Claim("BatchNorm (FixBN) beats GroupNorm with IID clients",
          "Zhong et al. 2023", "iid", Side("batch_fixbn", EVAL), Side("group", EVAL)),
    Claim("weight-standardised convolutions without norm beat FedAvg with BatchNorm "
          "under feature shift", "Zhuang & Lyu 2024 (FedWon)", "channels",
          Side("ws", EVAL), Side("batch_full", EVAL)),
)  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    """A claim read off a sweep: the paired per-seed differences and what they say."""

    claim: Claim
    diffs: tuple[float, ...]

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95 % t interval of the mean difference (None under two seeds)."""
        from fedkws.report import _stats

        found = _stats([(d, None) for d in self.diffs], signed=True)
        return None if found is None else found[2]

    @property
    def verdict(self) -> str:
        """``reproduced``, ``contradicted`` or ``not resolved`` (module docstring)."""
        interval = self.interval
        if interval is None or interval[0] <= 0 <= interval[1]:
            return "not resolved"
        return "reproduced" if interval[0] > 0 else "contradicted"

    def difference(self) -> str:
        """``mean ± sd [lo, hi]`` of the differences, signed, as the report writes a cell."""
        from fedkws.report import _fmt

        return _fmt([(d, None) for d in self.diffs], signed=True)


def _cell_values(cells, arm: str, partition: str, metric: str) -> dict[object, float] | None:
    """Per seed, ``metric`` of the one cell with ``arm`` and ``partition``.

    None when no cell, or several (a sweep over a third axis), has both.
    """
    from fedkws.report import _number, _seed, _tokens

    want = {f"arm={arm}", f"partition={partition}"}
    found = [cell for cell in cells if want <= _tokens(cell.name)]
    if len(found) != 1:
        return None
    values = {_seed(r): _number(r.summary.get(metric)) for r in found[0].results}
    return {seed: v for seed, v in values.items() if v is not None}


def verdicts(cells) -> list[Verdict]:
    """Every claim whose two cells are in ``cells`` (a :class:`~fedkws.report.SweepTable`'s)."""
    out = []
    for claim in CLAIMS:
        better = _cell_values(cells, claim.better.arm, claim.partition, claim.better.metric)
        worse = _cell_values(cells, claim.worse.arm, claim.partition, claim.worse.metric)
        if better is None or worse is None:
            continue
        seeds = sorted(set(better) & set(worse), key=str)
        out.append(Verdict(claim, tuple(better[s] - worse[s] for s in seeds)))
    return out


def markdown(found: list[Verdict]) -> str:
    """The verdicts as a table without outer pipes (the report's '|'-lines stay its own)."""
    header = ["claim", "source", "clients", "first minus second", "seeds", "verdict"]
    lines = [" | ".join(header), "|".join(["---"] * len(header))]
    for v in found:
        c = v.claim
        lines.append(
            f"{c.text}: {c.better} vs {c.worse} | {c.source} | {c.partition} | "
            f"{v.difference()} | {len(v.diffs)} | {v.verdict}"
        )
    return (
        "published claims (per seed, the first side minus the second; mean ± sd "
        "[95 % t interval]; reproduced / contradicted: the interval excludes 0):\n\n"
        + "\n".join(lines)
    )
