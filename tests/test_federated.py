"""End-to-end federated runs: a real Flower simulation on the Ray backend, tiny sizes.

Each test runs 2-3 rounds of a small ResNet on the tiny synthetic dataset.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedkws.core.bn import bn_input_moments, recalibrate
from fedkws.core.models import bn_layers, build_model
from fedkws.data.cache import open_cache
from fedkws.run import run
from fedkws.spec import from_config
from fedkws.tracking import Result
from helpers import CHANCE, SMALL_FEDERATION

# Every test here but the first runs the real ClientApp in process (no Ray); the
# first proves the same through Flower's Ray simulation.
BASE = [*SMALL_FEDERATION, "federation.backend=inprocess"]


def _run(make_cfg, tmp_path, overrides, name="run"):
    cfg = make_cfg(BASE + overrides)
    run_dir = tmp_path / name
    return run(cfg, run_dir), run_dir, cfg


def _final(result: Result) -> dict[str, float]:
    return result.rounds[-1].metrics


def _global_state(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def test_params_only_reproduces_the_eval_mode_collapse(make_cfg, tmp_path):
    result, run_dir, _ = _run(
        make_cfg, tmp_path,
        ["bn=params_only", "bn.eval_modes=[eval,train]", "federation.federated_eval=true",
         "train.rounds=3", "train.local_epochs=3", "federation.backend=ray"],
    )  # fmt: skip
    state = _global_state(run_dir)
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    variances = [v for k, v in state.items() if k.endswith("running_var")]
    assert means and all(torch.equal(m, torch.zeros_like(m)) for m in means)
    assert all(torch.equal(v, torch.ones_like(v)) for v in variances)
    final = _final(result)
    # eval mode normalises with mean 0 / var 1: chance level; train mode works.
    assert final["fed/eval/acc_mean"] < 2 * CHANCE
    assert final["fed/train/acc_mean"] > 0.4
    assert final["fed/train/acc_mean"] - final["fed/eval/acc_mean"] > 0.25
    assert final["val/eval/acc"] < 2 * CHANCE < final["val/train/acc"]
    # Only parameters crossed the wire: BatchNorm affine yes, buffers no.
    info = result.rounds[-1].clients["0"]
    n_bn_params = 2 * len(
        bn_layers(build_model(**from_config(make_cfg(BASE)).model.build_args(12)))
    )
    assert info["bn_keys_received"] == n_bn_params
    assert result.summary["complete"] and (run_dir / "accuracy.png").is_file()


@pytest.fixture(scope="module")
def full_noniid(tmp_path_factory, data_dir, tiny_root):
    """bn_sync=full on Dirichlet label-skewed clients, all three eval modes."""
    from conftest import compose_cfg

    cfg = compose_cfg(
        BASE + ["bn=full", "bn.eval_modes=[eval,train,recalibrated]", "partition=dirichlet",
                "partition.alpha=0.3", "partition.num_clients=3", "partition.min_partition_size=5"],
        data_dir, tiny_root,
    )  # fmt: skip
    run_dir = tmp_path_factory.mktemp("full") / "run"
    return run(cfg, run_dir), run_dir, cfg


def test_full_and_recalibrated_close_to_train_mode(full_noniid):
    result, _, _ = full_noniid
    final = _final(result)
    assert final["val/train/acc"] > 2 * CHANCE
    assert abs(final["val/eval/acc"] - final["val/train/acc"]) < 0.2
    assert abs(final["val/recalibrated/acc"] - final["val/train/acc"]) < 0.2
    assert result.rounds[-1].clients["0"]["bn_keys_received"] > 0
    assert "test/recalibrated/acc" in result.summary


def test_federated_pooled_statistics_equal_central_union(full_noniid):
    """The statistics pooled over the Flower messages equal those over the union."""
    _, run_dir, cfg = full_noniid
    pooled = torch.load(run_dir / "recalibrated_bn.pt", weights_only=True)
    model = build_model(**from_config(cfg).model.build_args(12))
    model.load_state_dict(_global_state(run_dir))
    task_data = open_cache(*_cache_of(cfg))
    with np.load(run_dir / "clients.npz") as npz:
        union = np.sort(np.concatenate([npz[k] for k in npz.files if k.startswith("train_")]))
    central = recalibrate(
        model, lambda net, layer: [bn_input_moments(net, task_data, union, layer, 64)]
    )
    for key, value in central.state_dict().items():
        if "running_" in key:
            assert torch.allclose(pooled[key], value, rtol=1e-4, atol=1e-5), key


def _cache_of(cfg):
    from fedkws.recipes.common import load_data

    data = load_data(from_config(cfg))
    return str(data.path), data.feature_key


def test_pooled_statistics_are_exact_on_non_iid_holders(tiny_root, data_dir):
    """Unit check without Flower: per-holder moments pool to the union's statistics,
    which averaging per-holder variances does not."""
    from fedkws.data.cache import DataConfig, prepare
    from fedkws.data.features import FeatureConfig

    data = prepare(DataConfig(root=str(tiny_root)), FeatureConfig(), data_dir / "cache", False)
    rows = data.split_indices("training")
    labels = data.labels[rows]
    holders = [rows[labels < 4], rows[(labels >= 4) & (labels < 8)], rows[labels >= 8]]
    torch.manual_seed(0)
    model = build_model("resnet", 12, depth=10, width=8)
    split = recalibrate(
        model,
        lambda net, layer: [bn_input_moments(net, data, h, layer, 32) for h in holders],
    )
    union = recalibrate(model, lambda net, layer: [bn_input_moments(net, data, rows, layer, 64)])
    for (_, a), (_, b) in zip(bn_layers(split), bn_layers(union), strict=True):
        assert torch.allclose(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)
    # The naive average of per-holder variances misses the between-holder spread.
    moments = [bn_input_moments(model, data, h, 0, 64) for h in holders]
    n = np.array([m[0] for m in moments])
    naive_var = sum(
        (ni / n.sum()) * ((ss - s * s / ni) / (ni - 1))
        for ni, (_, s, ss) in zip(n, moments, strict=False)
    )
    exact = bn_layers(union)[0][1].running_var.double()
    assert (exact - naive_var).abs().max() > 1e-3 * exact.abs().max()


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi"])
def test_adaptive_server_optimisers_keep_running_var_positive(make_cfg, tmp_path, strategy):
    result, run_dir, _ = _run(
        make_cfg, tmp_path, [f"strategy={strategy}", "bn=full", "train.rounds=2"]
    )
    for rec in result.rounds:
        assert all(math.isfinite(v) for v in rec.metrics.values()), rec.metrics
    state = _global_state(run_dir)
    for key, value in state.items():
        assert torch.isfinite(value.float()).all(), key
        if key.endswith("running_var"):
            assert (value > 0).all(), key
        if key.endswith("num_batches_tracked"):
            assert value.dtype == torch.int64
    assert result.rounds[-1].metrics["val/eval/acc"] > CHANCE / 2


def test_fedbn_keeps_bn_local_and_persistent(make_cfg, tmp_path):
    result, run_dir, _ = _run(make_cfg, tmp_path, ["bn=local", "train.rounds=3"])
    for rec in result.rounds:
        for pid, info in rec.clients.items():
            assert info["bn_keys_received"] == 0, (rec.round, pid)
            assert info["keys_received"] > 0
    for prev, cur in zip(result.rounds, result.rounds[1:], strict=False):
        for pid, info in cur.clients.items():
            # What the client starts round k with is what it ended round k-1 with.
            assert info["bn_digest_in"] == prev.clients[pid]["bn_digest_out"]
            assert info["bn_digest_in"] != info["bn_digest_out"]
    # The server's BatchNorm state never changed.
    state = _global_state(run_dir)
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in state.items()
               if k.endswith("running_mean"))  # fmt: skip
    final = _final(result)
    assert "fed/eval/acc_mean" in final and "fed/eval/acc_std" in final
    assert final["fed/eval/acc_mean"] > 2 * CHANCE


def test_resume_matches_uninterrupted_run(full_noniid, tmp_path):
    reference, _, cfg = full_noniid
    run_dir = tmp_path / "resumed"
    cfg.train.stop_after_round = 1
    interrupted = run(cfg, run_dir)
    assert [r.round for r in interrupted.rounds] == [1]
    assert not interrupted.summary["complete"]
    cfg.train.stop_after_round = None
    with pytest.raises(Exception, match="resume=true"):
        run(cfg, run_dir)
    cfg.resume = True
    resumed = run(cfg, run_dir)
    assert [r.round for r in resumed.rounds] == [1, 2, 3]
    for a, b in zip(reference.rounds, resumed.rounds, strict=True):
        for key, value in a.metrics.items():
            if key.startswith("time/"):
                continue
            if key.endswith("/acc") or key.endswith("acc_mean"):
                assert b.metrics[key] == value, (a.round, key)
            else:
                assert b.metrics[key] == pytest.approx(value, rel=1e-4), (a.round, key)


@pytest.mark.parametrize("strategy", ["fedprox", "central"])
def test_full_augmentation_trains_in_clients_and_centrally(make_cfg, tmp_path, strategy):
    result, _, _ = _run(
        make_cfg, tmp_path, [f"strategy={strategy}", "augment=full", "train.rounds=1"]
    )
    metrics = _final(result)
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0.0 < metrics["train/acc"] <= 1.0
