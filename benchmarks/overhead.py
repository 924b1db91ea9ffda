"""Simulation overhead: a fedkws federated run vs a plain PyTorch loop doing the same work.

The federated run is ``fedkws-train`` (Flower simulation on Ray, 2 client
actors of one CPU each, results.json, checkpoint every round) on the default
dataset: ResNet-10 width 32, 10 IID clients, 5 sampled per round, 20 rounds,
one local epoch, FedAvg over every state entry (``bn=full``), validation in
eval mode after every round.

The plain loop reads that run's client split (``clients.npz``) and its sampled
clients per round, and does exactly the same client work with the same
parallelism: a pool of 2 worker processes (one thread each) runs
:func:`fedkws.core.loops.train_epochs` from the global weights with the same
seeds; the parent averages the returned states weighted by examples and
evaluates the validation split in eval mode. At the end it computes what
fedkws's final step computes (exact statistics through the clients, layer by
layer in the pool; validation and test in eval, recalibrated and
fresh_average mode). Nothing else: no messages, no records, no checkpoint,
no plots or intervals.

Start-up is the wall time outside the rounds (process start, imports, data,
Ray and its actors, final evaluation); per-round overhead is the difference
of the mean round times. The two sides run in turn, ``--overhead-repeats``
pairs of runs (default 2), and each side's fastest run is compared: this
machine's speed drifts by up to 2x over stretches of seconds.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import common
import fedrun
from common import Ratio

TITLE = "simulation overhead: fedkws + Flower + Ray vs a plain 2-process PyTorch loop"
NAME = "overhead"
NOTES = ""


def add_arguments(group) -> None:
    """``--overhead-rounds``, ``--overhead-repeats``."""
    group.add_argument(
        "--overhead-rounds", type=common.at_least(1), default=20, help="federated rounds"
    )
    group.add_argument(
        "--overhead-repeats", type=common.at_least(1), default=2,
        help="pairs of runs, federated then plain; each side's fastest is compared",
    )  # fmt: skip


def overrides(rounds: int) -> list[str]:
    """The federated run's configuration."""
    return ["model=resnet", "model.depth=10", "model.width=32", "partition=iid",
            "partition.num_clients=10", "strategy=fedavg", "strategy.fraction_train=0.5",
            "bn=full", "bn.eval_modes=[eval]", f"train.rounds={rounds}",
            "train.local_epochs=1", "logger=disabled", "progress=false"]  # fmt: skip


# --------------------------------------------------------------------------- plain loop

_WORKER: dict = {}


def _init_worker(cache_entry: str, feature_key: str) -> None:
    import torch

    from fedkws.data.cache import open_cache

    torch.set_num_threads(1)
    _WORKER["data"] = open_cache(cache_entry, feature_key)


def _train_client(job: tuple) -> tuple[dict, int, float]:
    from fedkws.core import loops, seeding
    from fedkws.core.models import build_model

    model_args, state, rows, opt_target, opt_kwargs, seed, round_, pid, batch = job
    model = build_model(**model_args)
    model.load_state_dict(state)
    stats = loops.train_epochs(
        model, _WORKER["data"], rows, epochs=1, batch_size=batch,
        optimizer=loops.make_optimizer(model.parameters(), opt_target, opt_kwargs),
        generator=seeding.client_training_generator(seed, round_, pid),
    )  # fmt: skip
    return model.state_dict(), len(rows), stats.seconds


def _client_moments(job: tuple) -> tuple:
    from fedkws.core.bn import ActivationCache, bn_input_moments
    from fedkws.core.models import build_model

    model_args, state, rows, layer, batch, folder = job
    model = build_model(**model_args)
    model.load_state_dict(state)
    return bn_input_moments(model, _WORKER["data"], rows, layer, batch, ActivationCache(folder))


def _final_evaluation(pool, model, model_args, spec, data, train_rows, folder: str) -> None:
    """What fedkws's final step computes.

    Exact statistics through the clients, then validation and test in eval,
    recalibrated and fresh_average mode.
    """
    from fedkws.core.bn import averaged_twin, recalibrate

    batch = spec.train.eval_batch_size

    def moments(net, layer):
        state = net.state_dict()
        jobs = [(model_args, state, rows, layer, batch, f"{folder}/client{pid}")
                for pid, rows in sorted(train_rows.items())]  # fmt: skip
        return pool.map(_client_moments, jobs)

    record: list = []
    pooled = recalibrate(model, moments, record=record)
    averaged = averaged_twin(model, record)
    for split in ("validation", "testing"):
        for net in (model, pooled, averaged):
            loops_evaluate(net, data, data.split_indices(split), batch, spec.seed)


def loops_evaluate(net, data, rows, batch, seed) -> None:
    """Eval-mode accuracy, as the server computes it."""
    from fedkws.core import loops

    loops.evaluate(net, data, rows, batch, "eval", order_seed=seed)


def _average(replies: list[tuple[dict, int, float]]) -> dict:
    import torch

    total = sum(n for _, n, _ in replies)
    out = {}
    for key, value in replies[0][0].items():
        mean = sum(state[key].double() * (n / total) for state, n, _ in replies)
        out[key] = mean.round().to(value.dtype) if not value.is_floating_point() else mean.float()
    assert all(isinstance(v, torch.Tensor) for v in out.values())
    return out


def plain_loop(spec, run_dir: Path) -> tuple[float, list[float], list[float]]:
    """Wall time, round times and clients' epoch times of the plain loop replaying ``run_dir``."""
    import multiprocessing as mp

    import numpy as np

    from fedkws.core import loops, seeding
    from fedkws.core.models import build_model
    from fedkws.recipes.common import load_data

    start = time.perf_counter()
    rounds = json.loads((run_dir / "results.json").read_text())["rounds"]
    with np.load(run_dir / "clients.npz") as npz:
        train_rows = {int(k.split("_")[1]): npz[k] for k in npz.files if k.startswith("train_")}
    data = load_data(spec)
    val = data.split_indices("validation")
    model_args = spec.model.build_args(data.num_classes)
    seeding.seed_model_init(spec.seed)
    model = build_model(**model_args)
    opt = (spec.optimizer.target, dict(spec.optimizer.kwargs))
    ctx = mp.get_context("spawn")
    times, epochs = [], []
    with ctx.Pool(2, _init_worker, (str(data.path), data.feature_key)) as pool:
        for record in rounds:
            t0 = time.perf_counter()
            state = model.state_dict()
            pids = sorted(int(pid) for pid in record["clients"])
            jobs = [(model_args, state, train_rows[pid], *opt, spec.seed, record["round"], pid,
                     spec.train.batch_size) for pid in pids]  # fmt: skip
            replies = pool.map(_train_client, jobs)
            epochs += [seconds for _, _, seconds in replies]
            model.load_state_dict(_average(replies))
            loops.evaluate(model, data, val, spec.train.eval_batch_size, "eval",
                           order_seed=spec.seed)  # fmt: skip
            times.append(time.perf_counter() - t0)
            common.progress(NAME, f"plain round {record['round']}: {times[-1]:.1f} s")
        with tempfile.TemporaryDirectory(prefix="fedkws-plain-") as folder:
            _final_evaluation(pool, model, model_args, spec, data, train_rows, folder)
    return time.perf_counter() - start, times, epochs


def client_epochs(run_dir: Path) -> list[float]:
    """The seconds of every client's local epoch in the federated run (its clients' records)."""
    rounds = json.loads((run_dir / "results.json").read_text())["rounds"]
    return [client["seconds"] for r in rounds for client in r["clients"].values()]


def run(args) -> list[Ratio]:
    """Measure both, side by side."""
    global NOTES
    rounds = args.overhead_rounds
    feds, plains = [], []
    spec = common.run_spec(overrides(rounds))
    with tempfile.TemporaryDirectory(prefix="fedkws-bench-") as tmp:
        # This machine's speed drifts by up to 2x over stretches of seconds (a shared host):
        # pairs of runs, each side's fastest compared, keep one slow stretch from deciding.
        for pair in range(args.overhead_repeats):
            fed = fedrun.single(overrides(rounds), Path(tmp) / f"run{pair}", 3600, NAME)
            common.progress(NAME, f"federated: {fed.wall_s:.1f} s wall, "
                                  f"{fed.rounds_s:.1f} s in rounds")  # fmt: skip
            feds.append((fed, client_epochs(fed.run_dir)))
            plains.append(plain_loop(spec, fed.run_dir))
    (fed, fed_epochs) = min(feds, key=lambda f: f[0].wall_s)
    plain_wall, plain_rounds, plain_epochs = min(plains, key=lambda p: p[0])
    plain_round = sum(plain_rounds) / len(plain_rounds)
    fed_round = fed.rounds_s / len(fed.round_s)
    per_round = (fed_round - plain_round) / plain_round
    plain_start = plain_wall - sum(plain_rounds)
    pairs = zip(feds, plains, strict=True)
    walls = "; ".join(f"{f.wall_s:.1f} s / {p[0]:.1f} s" for (f, _), p in pairs)
    NOTES = (
        f"Each side's fastest of {len(feds)} runs, federated then plain in turn (wall "
        f"times, federated / plain: {walls}). "
        f"federated: {fed.wall_s:.1f} s wall, {fed_round:.2f} s per round (training "
        f"{sum(fed.train_s) / rounds:.2f} s, evaluation {sum(fed.eval_s) / rounds:.2f} s), "
        f"{fed.outside_s:.1f} s outside the rounds; plain loop: {plain_wall:.1f} s wall, "
        f"{plain_round:.2f} s per round, {plain_start:.1f} s outside the rounds. A client's "
        f"local epoch, median over the run's {len(fed_epochs)}: fedkws "
        f"{statistics.median(fed_epochs):.3f} s, plain {statistics.median(plain_epochs):.3f} s "
        "(the same work: the rest of a round is what differs)."
    )
    how = f"{rounds} rounds, 10 clients, 5 per round, ResNet-10 w32; see NOTES"
    return [
        Ratio("total wall time, fedkws / plain", fed.wall_s / plain_wall, "<= 1.15x",
              fed.wall_s / plain_wall <= 1.15, how),
        Ratio("start-up + finish of a single run", fed.outside_s,
              "(no target: in a sweep, see sweep)", True, f"plain loop: {plain_start:.1f} s",
              unit="s"),
        Ratio("per-round overhead", 100 * per_round, "<= 10 %", per_round <= 0.10,
              f"fedkws {fed_round:.2f} s vs plain {plain_round:.2f} s per round", unit="%"),
    ]  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(common.main_for(__file__))
