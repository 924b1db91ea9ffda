"""Evaluation answers the question it claims: shuffled batches, fresh-statistics references,
intervals on every final accuracy."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from fedkws.core import loops, seeding
from fedkws.core.bn import averaged_statistics, pooled_statistics
from fedkws.core.evaluation import Evaluator
from fedkws.core.models import build_model
from fedkws.recipes.common import load_data
from fedkws.run import run
from fedkws.spec import from_config
from helpers import SMALL_FEDERATION


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir, tiny_root):
    """A centralised ResNet trained a few epochs on the tiny dataset, and its data."""
    from helpers import compose_cfg

    cfg = compose_cfg(
        [*SMALL_FEDERATION, "strategy=central", "train.rounds=4", "bn.eval_modes=[eval]"],
        data_dir, tiny_root,
    )  # fmt: skip
    run_dir = tmp_path_factory.mktemp("central") / "run"
    result = run(cfg, run_dir)
    spec = from_config(cfg)
    data = load_data(spec)
    model = build_model(**spec.model.build_args(data.num_classes))
    model.load_state_dict(torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"])
    return result, data, model


def test_evaluation_batches_are_shuffled_not_class_sorted(data_dir, tiny_root):
    from helpers import compose_cfg

    data = load_data(from_config(compose_cfg([], data_dir, tiny_root)))
    rows = data.split_indices("validation")
    stored = data.labels[loops.evaluation_order(rows, None)]
    # The cache stores rows grouped by class: one run of each label.
    assert (np.diff(stored) != 0).sum() == len(set(stored.tolist())) - 1
    order = loops.evaluation_order(rows, 7)
    assert sorted(order) == sorted(rows)
    assert np.array_equal(order, loops.evaluation_order(rows, 7))  # same for every arm
    first_batch = data.labels[order[:16]]
    assert len(set(first_batch.tolist())) > 4  # a batch mixes classes
    model = build_model("cnn", data.num_classes)
    stats = Evaluator(data, ["eval"], 16, order_seed=7).run(model, rows, "val")[1]["eval"]
    assert np.array_equal(stats.rows, order)  # the evaluator uses the seeded order


def test_class_sorted_batches_would_change_train_mode_accuracy(trained):
    _, data, model = trained
    # The 288 training rows, which the model fits: on the 48 validation examples the gap
    # (0.08 to 0.17 by CPU model and thread count) is a few examples, too close to call.
    rows = data.split_indices("training")
    sorted_ = loops.evaluate(model, data, rows, 16, "train", order_seed=None)
    shuffled = loops.evaluate(model, data, rows, 16, "train", order_seed=0)
    evaluated = loops.evaluate(model, data, rows, 16, "eval", order_seed=0)
    # With class-pure batches, batch statistics remove the class signal (measured: 0.23 to
    # 0.24 sorted, 0.67 to 0.77 shuffled).
    assert shuffled.acc - sorted_.acc > 0.25, (sorted_.acc, shuffled.acc, evaluated.acc)
    assert loops.evaluate(model, data, rows, 16, "eval", order_seed=None).acc == evaluated.acc


def test_the_centralised_baseline_reports_fresh_statistics_with_intervals(trained):
    result, _, _ = trained
    summary = result.summary
    for prefix in ("final/val", "test"):
        for mode in ("eval", "recalibrated"):  # recalibrated although eval_modes=[eval]
            acc = summary[f"{prefix}/{mode}/acc"]
            lo, hi = summary[f"{prefix}/{mode}/acc_ci95"]
            assert 0 <= lo <= acc <= hi <= 1 and hi > lo
        paired = summary[f"{prefix}/diff/eval-recalibrated"]
        assert paired["diff"] == pytest.approx(
            summary[f"{prefix}/eval/acc"] - summary[f"{prefix}/recalibrated/acc"]
        )
        assert paired["ci95"][0] <= paired["diff"] <= paired["ci95"][1]


def test_averaged_statistics_miss_exactly_the_spread_of_the_holder_means():
    """Law of total variance, computed by hand: (N-1) pooled = sum (n_c-1) var_c + sum n_c d_c^2."""
    gen = torch.Generator().manual_seed(0)
    holders = [torch.randn(n, 3, generator=gen, dtype=torch.float64) * s + m
               for n, s, m in ((40, 1.0, 0.0), (25, 2.0, 3.0), (60, 0.5, -2.0))]  # fmt: skip
    moments = [(float(len(x)), x.sum(0), (x * x).sum(0)) for x in holders]
    union = torch.cat(holders)
    mean, var = pooled_statistics(moments)
    assert torch.allclose(mean, union.mean(0)) and torch.allclose(var, union.var(0))
    avg_mean, avg_var = averaged_statistics(moments)
    n = sum(len(x) for x in holders)
    within = sum(len(x) * x.var(0) for x in holders) / n
    assert torch.allclose(avg_mean, union.mean(0)) and torch.allclose(avg_var, within)
    between = sum(len(x) * (x.mean(0) - union.mean(0)) ** 2 for x in holders)
    rebuilt = (sum((len(x) - 1) * x.var(0) for x in holders) + between) / (n - 1)
    assert torch.allclose(var, rebuilt)
    assert (var - avg_var).min() > 0.5  # the holders' means differ: the average misses it


def test_full_run_reports_the_three_statistics_of_the_decomposition(
    make_cfg, tmp_path, monkeypatch
):
    from fedkws.fl import simulation
    from fedkws.recipes.federated import FederatedRecipe

    cfg = make_cfg([*SMALL_FEDERATION, "federation.backend=inprocess", "bn=full",
                    "partition=dirichlet", "partition.alpha=0.3", "train.rounds=2",
                    "bn.eval_modes=[eval]"])  # fmt: skip
    # The final evaluation must start before the clients have stopped and end after: the
    # stand-in for their stop waits for it to start, and it waits for them to have stopped.
    evaluating, stopped, events = threading.Event(), threading.Event(), []
    final_evaluation = FederatedRecipe._final_evaluation

    def overlapping(self, run_dir):
        evaluating.set()
        assert stopped.wait(30), "the final evaluation waited for the clients to stop"
        events.append("final evaluation")
        return final_evaluation(self, run_dir)

    def simulate(*args, **kwargs):
        simulation_simulate(*args, **kwargs)
        assert evaluating.wait(30), "the final evaluation did not start before the clients stop"
        events.append("clients stopped")
        stopped.set()

    simulation_simulate = simulation.simulate
    monkeypatch.setattr(FederatedRecipe, "_final_evaluation", overlapping)
    monkeypatch.setattr(simulation, "simulate", simulate)
    started = time.perf_counter()
    result = run(cfg, tmp_path / "run")
    outside = time.perf_counter() - started
    # Catches: the final evaluation run after the clients stopped (Flower's simulation takes
    # about a second to notice its end), or before, inside the ServerApp, instead of meanwhile.
    assert events == ["clients stopped", "final evaluation"]
    summary = result.summary
    for mode in ("eval", "fresh_average", "recalibrated"):  # stored, fresh average, exact
        assert 0 <= summary[f"test/{mode}/acc"] <= 1
        assert len(summary[f"test/{mode}/acc_ci95"]) == 2
    assert "test/diff/eval-fresh_average" in summary
    assert (tmp_path / "run" / "recalibrated_bn.pt").is_file()
    # Where the time went: every phase timed, together (nearly) the whole run.
    phases = summary["phases_s"]
    assert list(phases) == ["setup", "clients_start", "rounds", "record", "final_queries",
                            "clients_stop", "final_evaluation"]  # fmt: skip
    assert all(phases[p] > 0 for p in ("setup", "rounds", "record", "final_evaluation"))
    assert phases["final_queries"] > 0  # the final model's exact statistics
    assert 0.8 * summary["wall_s"] <= sum(phases.values()) <= summary["wall_s"] <= outside


def test_background_work_returns_or_raises_in_the_thread_that_waits():
    from fedkws.recipes.common import Background

    assert Background("add", lambda a, b: a + b, 1, 2).result() == 3

    def fails():
        raise ValueError("disk on fire")

    with pytest.raises(ValueError, match="disk on fire"):
        Background("fails", fails).result()


def test_a_second_ctrl_c_ends_background_work_before_the_process_goes_on(monkeypatch):
    # Catches: the process exiting while the final evaluation's thread is still inside
    # torch (a daemon thread cut off at interpreter shutdown can abort the whole process).
    import os
    import signal

    from fedkws import lifecycle
    from fedkws.recipes.common import Background

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are installed from the main thread only")

    def work():
        while True:
            lifecycle.raise_if_aborting()
            time.sleep(0.01)

    try:
        with lifecycle.graceful_interrupts():
            os.kill(os.getpid(), signal.SIGINT)  # the first: stop after this step
            job = Background("work", work)
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()  # the second
            with pytest.raises(KeyboardInterrupt):
                job.result()
            assert not job._thread.is_alive()
    finally:
        lifecycle.reset()


def test_seeding_streams_are_named_and_distinct():
    values = {int(s) for s in seeding.Stream}
    assert len(values) == len(seeding.Stream)


def test_fedbn_personalised_models_on_the_shared_test_split(make_cfg, tmp_path):
    """Each client's model (global weights + own BatchNorm) is scored on the shared test split;
    a client without local test rows is left out of the local means, not counted as 0."""
    cfg = make_cfg([*SMALL_FEDERATION, "federation.backend=inprocess", "bn=local",
                    "train.rounds=2", "partition.local_test_fraction=0.0",
                    "partition=dirichlet", "partition.alpha=0.3"])  # fmt: skip
    result = run(cfg, tmp_path / "run")
    summary = result.summary
    per_client = np.array([summary[f"test/fedbn/eval/acc_client{pid}"] for pid in (0, 1)])
    with np.load(tmp_path / "run" / "clients.npz") as npz:  # weighted by training examples
        weights = np.array([len(npz["train_0"]), len(npz["train_1"])], float)
    assert weights[0] != weights[1]  # unequal clients: the weighting shows
    mean = (per_client * weights).sum() / weights.sum()
    spread = np.sqrt(((per_client - mean) ** 2 * weights).sum() / weights.sum())
    assert summary["test/fedbn/eval/acc_mean"] == pytest.approx(mean)
    assert summary["test/fedbn/eval/acc_std"] == pytest.approx(spread)
    # No client has local test rows: no local-test accuracy is reported at all.
    assert not any(k.startswith("fed/") for r in result.rounds for k in r.metrics)
