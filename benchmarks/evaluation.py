"""Evaluation cost: a round's evaluation (exact recalibration every round) vs its training.

The federated run is the ``bn_ablation`` cell ``bn=full partition=iid`` (ResNet-10
width 32, 4 clients, one local epoch) with ``bn.recalibrate_every=1``: every
round evaluates the validation split in eval, train and recalibrated mode, the
last after the layer-by-layer exact recalibration through the clients. The
ratio is the median over rounds of ``time/eval_s`` over ``time/train_s``, both
measured by the round loop.

Before/after, side by side: the same exact recalibration computed in one process
(single thread) over the 4 clients' training rows, with every layer query
rerunning the forward pass from the input (before) and resuming from cached
segment inputs (after, :class:`fedkws.core.bn.ActivationCache`); the moments of
both must be bitwise equal.

And the floor, in the same process and thread: any exact recalibration computes
every layer's input over the clients' training rows at least once, so it costs
at least one eval-mode forward pass over those rows. That pass against one
local epoch over the same rows (fedkws's training loop, the run's optimiser and
batch size) bounds what the first ratio could ever reach with exact statistics
every round. So does the rest of a round's evaluation: the server's validation
passes in the run's modes, the round's ``time/eval_s`` less its
``time/recalibration_s``, over its ``time/train_s``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import common
import fedrun
from common import Ratio

TITLE = "evaluation: a round's evaluation with exact recalibration vs its training"
NAME = "evaluation"
NOTES = ""
TARGET = 0.25


def add_arguments(group) -> None:
    """``--evaluation-rounds``."""
    group.add_argument(
        "--evaluation-rounds", type=common.at_least(1), default=3, help="federated rounds"
    )


def overrides(rounds: int) -> list[str]:
    """The federated run's configuration."""
    return ["experiment=bn_ablation", "bn=full", "partition=iid", "bn.recalibrate_every=1",
            f"train.rounds={rounds}", "federation.federated_eval=false", "logger=disabled",
            "progress=false"]  # fmt: skip


def _recalibration_speedup(spec, run_dir: Path) -> tuple[float, float, bool]:
    import numpy as np
    import torch

    from fedkws.core.bn import ActivationCache, bn_input_moments, recalibrate
    from fedkws.core.models import build_model
    from fedkws.recipes.common import load_data

    torch.set_num_threads(1)
    data = load_data(spec)
    with np.load(run_dir / "clients.npz") as npz:
        holders = [npz[k] for k in sorted(npz.files) if k.startswith("train_")]
    model = build_model(**spec.model.build_args(data.num_classes))
    model.load_state_dict(torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"])
    batch = spec.train.eval_batch_size
    seconds, records = [], []
    with tempfile.TemporaryDirectory(prefix="fedkws-act-") as tmp:
        for cache in (None, ActivationCache(tmp)):
            record: list = []
            start = time.perf_counter()

            def moments(net, layer, c=cache):
                return [bn_input_moments(net, data, h, layer, batch, c) for h in holders]

            recalibrate(model, moments, record=record)
            seconds.append(time.perf_counter() - start)
            records.append(record)
            common.progress(NAME, f"recalibration {'with' if cache else 'without'} cache: "
                                  f"{seconds[-1]:.1f} s")  # fmt: skip
    same = all(
        a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
        for la, lb in zip(*records, strict=True) for a, b in zip(la, lb, strict=True)
    )  # fmt: skip
    forward_s, epoch_s = _floor(spec, data, holders, model)
    return seconds[0], seconds[1], same, forward_s, epoch_s


def _floor(spec, data, holders, model) -> tuple[float, float]:
    """Seconds of one eval-mode forward pass and of one training epoch over ``holders``' rows."""
    import copy

    import torch

    from fedkws.core import loops
    from fedkws.data.loader import iterate_batches

    model = copy.deepcopy(model).eval()
    start = time.perf_counter()
    with torch.no_grad():
        for rows in holders:
            for x, _ in iterate_batches(data, rows, spec.train.eval_batch_size):
                model(x)
    forward_s = time.perf_counter() - start
    model.train()
    optimizer = loops.make_optimizer(
        model.parameters(), spec.optimizer.target, dict(spec.optimizer.kwargs)
    )
    start = time.perf_counter()
    for rows in holders:
        generator = torch.Generator().manual_seed(0)
        loops.train_epochs(model, data, rows, 1, spec.train.batch_size, optimizer, generator)
    epoch_s = time.perf_counter() - start
    common.progress(NAME, f"one forward pass {forward_s:.1f} s, one training epoch {epoch_s:.1f} s")
    return forward_s, epoch_s


def run(args) -> list[Ratio]:
    """The run's ratio, then the before/after of the recalibration."""
    global NOTES
    with tempfile.TemporaryDirectory(prefix="fedkws-bench-") as tmp:
        fed = fedrun.single(overrides(args.evaluation_rounds), Path(tmp) / "run", 3600, NAME)
        ratios = [e / t for e, t in zip(fed.eval_s, fed.train_s, strict=True)]
        ratio = statistics.median(ratios)
        passes = statistics.median(
            (e - r) / t
            for e, r, t in zip(fed.eval_s, fed.recalibration_s, fed.train_s, strict=True)
        )
        before, after, same, forward_s, epoch_s = _recalibration_speedup(
            common.run_spec(overrides(args.evaluation_rounds)), fed.run_dir
        )
    NOTES = (
        "per round (training s / evaluation s, of which recalibration s): "
        + ", ".join(
            f"{t:.2f}/{e:.2f}, {r:.2f}"
            for t, e, r in zip(fed.train_s, fed.eval_s, fed.recalibration_s, strict=True)
        )
        + f". Recalibration in one process, one thread: {before:.1f} s rerunning the forward "
        f"pass per layer, {after:.1f} s with cached segment inputs; moments bitwise equal: {same}."
        f" Floor (same process and thread, same rows): one eval-mode forward pass {forward_s:.1f}"
        f" s, one training epoch {epoch_s:.1f} s: exact statistics every round cannot cost less"
        f" than {forward_s / epoch_s:.2f}x a round's training; the cached recalibration is "
        f"{after / forward_s:.1f}x that pass."
    )
    return [
        Ratio("round evaluation / round training", ratio, f"<= {TARGET:.2f}x", ratio <= TARGET,
              f"median over {len(ratios)} rounds, recalibrated every round"),
        Ratio("recalibration speed-up from cached segment inputs", before / after,
              "(before/after; bitwise equal)", same, f"{before:.1f} s -> {after:.1f} s"),
        Ratio("floor: one forward pass / one training epoch", forward_s / epoch_s,
              f"(must be <= {TARGET:.2f}x for the target to be reachable)",
              forward_s / epoch_s <= TARGET,
              f"{forward_s:.1f} s / {epoch_s:.1f} s over the clients' training rows, one thread"),
        Ratio("round evaluation without its recalibration / round training", passes,
              f"(must be <= {TARGET:.2f}x for the target to be reachable)", passes <= TARGET,
              f"median over {len(ratios)} rounds: the server's validation passes in the run's "
              "modes (time/eval_s minus time/recalibration_s)"),
    ]  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(common.main_for(__file__))
