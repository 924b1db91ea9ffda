"""End-to-end federated runs on the tiny synthetic dataset, asserted exactly where possible.

Every test runs the real ClientApp in process (no Ray); the golden test's Ray
cell proves the same ClientApp gives the same numbers through Flower's Ray
simulation. What crossed the wire is read from the messages themselves (a
wrapper around the in-process grid), the BatchNorm layers are counted from the
model's modules, and aggregates are recomputed from the clients' replies.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedkws import CONF_DIR
from fedkws.core.bn import bn_input_moments, recalibrate
from fedkws.core.models import bn_layers, build_model
from fedkws.core.sampling import sample_clients
from fedkws.core.seeding import seed_model_init
from fedkws.data.cache import open_cache
from fedkws.run import run
from fedkws.spec import from_config
from fedkws.tracking import Result
from helpers import CHANCE, SMALL_FEDERATION, evaluated_modes

BASE = [*SMALL_FEDERATION, "federation.backend=inprocess"]
# Two rounds of one local epoch: enough for every claim below that is not about learning.
QUICK = ["train.rounds=2", "train.local_epochs=1"]
# Label-skewed clients of unequal sizes (an unweighted mean would differ from the weighted).
DIRICHLET = ["partition=dirichlet", "partition.alpha=0.3", "partition.num_clients=3"]
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _run(make_cfg, tmp_path, overrides, name="run"):
    cfg = make_cfg(BASE + overrides)
    run_dir = tmp_path / name
    return run(cfg, run_dir), run_dir, cfg


def _final(result: Result) -> dict[str, float]:
    return result.rounds[-1].metrics


def _checkpoint(run_dir) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def _global_state(run_dir) -> dict[str, torch.Tensor]:
    return _checkpoint(run_dir)["model"]


def _model(cfg) -> nn.Module:
    return build_model(**from_config(cfg).model.build_args(12))


def _initial_model(cfg) -> nn.Module:
    """The server's round-0 model, built as a run builds it."""
    spec = from_config(cfg)  # (validating the spec builds a model: before seeding)
    seed_model_init(spec.seed)
    return build_model(**spec.model.build_args(12))


def _bn_names(model: nn.Module) -> list[str]:
    # Counted from the modules, not with fedkws.core.models.bn_layers / bn_state_keys.
    return [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def _bn_state_keys(model: nn.Module) -> set[str]:
    return {f"{n}.{k}" for n in _bn_names(model) for k in BN_KEYS}


@pytest.fixture
def wire(monkeypatch):
    """Every message the in-process grid carries: (type, pid, keys sent, keys replied)."""
    from fedkws.fl.inprocess import InProcessGrid

    log: list[dict] = []
    handle = InProcessGrid._handle

    def recording(self, message):
        sent = message.content["model"].keys() if "model" in message.content else []
        reply = handle(self, message)
        back = []
        if not reply.has_error() and "model" in reply.content:
            back = reply.content["model"].keys()
        pid = int(self.contexts[message.metadata.dst_node_id].node_config["partition-id"])
        log.append(
            {"type": message.metadata.message_type, "pid": pid, "sent": set(sent),
             "replied": set(back)}
        )  # fmt: skip
        return reply

    monkeypatch.setattr(InProcessGrid, "_handle", recording)
    return log


# --------------------------------------------------------------------------- bn=params_only


def test_params_only_reproduces_the_eval_mode_collapse(make_cfg, tmp_path):
    result, run_dir, cfg = _run(
        make_cfg, tmp_path,
        ["bn=params_only", "bn.eval_modes=[eval,train]", "federation.federated_eval=true",
         "train.rounds=3", "train.local_epochs=3", "plots=true"],
    )  # fmt: skip
    model = _model(cfg)
    names = _bn_names(model)
    assert len(names) == 1 + 4 * 2 + 3  # ResNet-10: stem, two per block, three shortcuts
    state = _global_state(run_dir)
    for name in names:
        assert torch.all(state[f"{name}.running_mean"] == 0), name
        assert torch.all(state[f"{name}.running_var"] == 1), name
        assert int(state[f"{name}.num_batches_tracked"]) == 0, name
    final = _final(result)
    # eval mode normalises with mean 0 / var 1: chance level; train mode works.
    assert final["fed/eval/acc_mean"] < 2 * CHANCE
    assert final["fed/train/acc_mean"] > 0.4
    assert final["fed/train/acc_mean"] - final["fed/eval/acc_mean"] > 0.25
    assert final["val/eval/acc"] < 2 * CHANCE < final["val/train/acc"]
    # Exactly the parameters crossed the wire: BatchNorm affine yes, buffers no.
    n_params = len(list(model.named_parameters()))
    for rec in result.rounds:
        for pid, info in rec.clients.items():
            assert info["bn_keys_received"] == 2 * len(names), (rec.round, pid)
            assert info["keys_received"] == n_params, (rec.round, pid)
    assert result.summary["complete"]
    modes = evaluated_modes(result.summary)
    pngs = {p.name for p in run_dir.glob("*.png")}
    assert "eval" in modes and "train" in modes  # plots=true: every plot of the run
    assert pngs == {"accuracy.png", "partition.png"} | {f"confusion_{m}.png" for m in modes}


def test_params_only_sends_exactly_the_parameters_both_ways(make_cfg, tmp_path, wire):
    # Catches: running statistics sent or received under params_only, BN affine kept back.
    _, run_dir, cfg = _run(make_cfg, tmp_path, ["bn=params_only", *QUICK])
    model = _model(cfg)
    params = {n for n, _ in model.named_parameters()}
    affine = {f"{n}.{k}" for n in _bn_names(model) for k in ("weight", "bias")}
    assert affine <= params
    trains = [m for m in wire if m["type"] == "train"]
    assert len(trains) == 2 * 2
    for m in trains:
        assert m["sent"] == params and m["replied"] == params
    state = _global_state(run_dir)
    for name in _bn_names(model):
        assert torch.all(state[f"{name}.running_mean"] == 0), name
        assert torch.all(state[f"{name}.running_var"] == 1), name
        # ... while the affine parameters did train.
        assert not torch.all(state[f"{name}.weight"] == 1), name


# --------------------------------------------------------------------------- bn=full


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


def test_full_sends_every_bn_key_and_moves_the_global_statistics(full_noniid):
    # Catches: bn=full behaving as params_only (buffers kept back, global stats at 0/1).
    result, run_dir, cfg = full_noniid
    model = _model(cfg)
    names = _bn_names(model)
    for rec in result.rounds:
        assert len(rec.clients) == 3
        for pid, info in rec.clients.items():
            assert info["bn_keys_received"] == 5 * len(names), (rec.round, pid)
            assert info["keys_received"] == len(model.state_dict()), (rec.round, pid)
    state = _global_state(run_dir)
    for name in names:
        assert not torch.all(state[f"{name}.running_mean"] == 0), name
        assert not torch.all(state[f"{name}.running_var"] == 1), name
        assert int(state[f"{name}.num_batches_tracked"]) > 0, name
    assert "test/recalibrated/acc" in result.summary


def test_federated_pooled_statistics_equal_central_union(full_noniid):
    """The statistics pooled over the Flower messages equal those over the union."""
    _, run_dir, cfg = full_noniid
    pooled = torch.load(run_dir / "recalibrated_bn.pt", weights_only=True)
    model = _model(cfg)
    model.load_state_dict(_global_state(run_dir))
    task_data = open_cache(*_cache_of(cfg))
    with np.load(run_dir / "clients.npz") as npz:
        union = np.sort(np.concatenate([npz[k] for k in npz.files if k.startswith("train_")]))
    central = recalibrate(
        model, lambda net, layer: [bn_input_moments(net, task_data, union, layer, 64)]
    )
    keys = [k for k in central.state_dict() if "running_" in k]
    assert len(keys) == 2 * len(_bn_names(model))
    for key in keys:
        assert torch.allclose(pooled[key], central.state_dict()[key], rtol=1e-4, atol=1e-5), key


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
def test_adaptive_server_optimisers_average_running_statistics(
    make_cfg, tmp_path, monkeypatch, strategy
):
    # Catches: running statistics (or counters) pushed through the server optimiser.
    # The global running statistics after the run are recomputed here as the
    # example-weighted mean of what the clients sent in the last round.
    import fedkws.recipes.federated as federated

    replies: list[tuple[list[dict], list[int]]] = []
    real = federated.aggregate

    def recording(global_state, client_states, num_examples, plan, optimizer):
        replies.append(([{k: v.clone() for k, v in s.items()} for s in client_states],
                        list(num_examples)))  # fmt: skip
        return real(global_state, client_states, num_examples, plan, optimizer)

    monkeypatch.setattr(federated, "aggregate", recording)
    result, run_dir, cfg = _run(
        make_cfg, tmp_path, [f"strategy={strategy}", "bn=full", *QUICK, *DIRICHLET]
    )
    assert len(replies) == 2
    states, counts = replies[-1]
    assert len(states) == 3 and len(set(counts)) == 3  # unequal weights
    total = float(sum(counts))
    state = _global_state(run_dir)
    model = _model(cfg)
    names = _bn_names(model)
    for name in names:
        for stat in ("running_mean", "running_var"):
            key = f"{name}.{stat}"
            mean = sum(s[key].double() * (n / total) for s, n in zip(states, counts, strict=True))
            assert state[key].dtype == torch.float32
            assert torch.allclose(state[key].double(), mean, rtol=1e-6, atol=1e-7), key
        key = f"{name}.num_batches_tracked"
        mean = sum(float(s[key]) * n for s, n in zip(states, counts, strict=True)) / total
        assert state[key].dtype == torch.int64 and int(state[key]) == round(mean), key
    # The parameters, by contrast, took a server-optimiser step, not the plain mean.
    key = "classifier.weight"
    mean = sum(s[key].double() * (n / total) for s, n in zip(states, counts, strict=True))
    assert not torch.allclose(state[key].double(), mean, atol=1e-4)
    assert all(math.isfinite(v) for rec in result.rounds for v in rec.metrics.values())


# --------------------------------------------------------------------------- FedBN


def test_fedbn_keeps_bn_local_in_both_directions(make_cfg, tmp_path, wire, monkeypatch):
    # Catches: a BN key sent by the server or by a client; a client that trains round k
    # from the global BatchNorm (or another client's) instead of its own from round k-1.
    import fedkws.core.loops as loops

    seen: list[dict] = []  # BN state at the start and end of each local training
    real_train = loops.train_epochs

    def recording(model, *args, **kwargs):
        start = {k: v.clone() for k, v in model.state_dict().items() if k in bn_keys}
        stats = real_train(model, *args, **kwargs)
        end = {k: v.clone() for k, v in model.state_dict().items() if k in bn_keys}
        seen.append({"start": start, "end": end})
        return stats

    monkeypatch.setattr(loops, "train_epochs", recording)
    cfg = make_cfg(BASE + ["bn=local", "train.rounds=3", "train.local_epochs=1"])
    bn_keys = _bn_state_keys(_model(cfg))
    result = run(cfg, tmp_path / "run")

    for m in wire:
        if m["type"] == "query.hello":
            continue
        assert m["sent"] and not (m["sent"] & bn_keys), m["type"]
        assert not (m["replied"] & bn_keys), m["type"]
    for rec in result.rounds:
        for pid, info in rec.clients.items():
            assert info["bn_keys_received"] == 0 and info["keys_received"] > 0, (rec.round, pid)

    # The in-process grid handles the train messages in order: who trained what, when.
    trained = [m["pid"] for m in wire if m["type"] == "train"]
    assert trained == [0, 1] * 3 and len(seen) == 6
    initial = {k: v for k, v in _initial_model(cfg).state_dict().items() if k in bn_keys}
    last: dict[int, dict] = {}
    for pid, record in zip(trained, seen, strict=True):
        before = last.get(pid, initial)
        for key in bn_keys:
            assert torch.equal(record["start"][key], before[key]), (pid, key)
        assert not torch.equal(record["start"]["stem.1.running_mean"],
                               record["end"]["stem.1.running_mean"])  # fmt: skip
        last[pid] = record["end"]
    # The two clients' BatchNorm states are their own.
    assert not torch.equal(last[0]["stem.1.running_mean"], last[1]["stem.1.running_mean"])
    # The server's BatchNorm state never changed.
    state = _global_state(tmp_path / "run")
    for key in bn_keys:
        assert torch.equal(state[key], initial[key]), key
    final = _final(result)
    assert "fed/eval/acc_mean" in final and "fed/eval/acc_std" in final


# --------------------------------------------------------------------------- resume


def _assert_resume_is_exact(make_cfg, tmp_path, overrides) -> tuple[Result, Result]:
    """An interrupted run resumed from its folder equals the uninterrupted run, exactly."""
    cfg = make_cfg(BASE + overrides)
    reference = run(cfg, tmp_path / "reference")
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
    assert [r.round for r in resumed.rounds] == [r.round for r in reference.rounds]
    for a, b in zip(reference.rounds, resumed.rounds, strict=True):
        want = {k: v for k, v in a.metrics.items() if not k.startswith("time/")}
        got = {k: v for k, v in b.metrics.items() if not k.startswith("time/")}
        assert got == want, a.round
        for pid, info in a.clients.items():
            drop = ("seconds",)
            assert {k: v for k, v in b.clients[pid].items() if k not in drop} == {
                k: v for k, v in info.items() if k not in drop
            }, (a.round, pid)
    test_keys = [k for k in reference.summary if k.startswith("test/")]
    assert {k: resumed.summary[k] for k in test_keys} == {
        k: reference.summary[k] for k in test_keys
    }
    ref_state, res_state = _global_state(tmp_path / "reference"), _global_state(run_dir)
    assert ref_state.keys() == res_state.keys()
    for key, value in ref_state.items():
        assert torch.equal(value, res_state[key]), key
    return reference, resumed


def test_resume_matches_uninterrupted_run(full_noniid, tmp_path):
    reference, _, cfg = full_noniid
    run_dir = tmp_path / "resumed"
    cfg = cfg.copy()
    cfg.train.stop_after_round = 1
    interrupted = run(cfg, run_dir)
    assert [r.round for r in interrupted.rounds] == [1]
    cfg.train.stop_after_round = None
    cfg.resume = True
    resumed = run(cfg, run_dir)
    assert [r.round for r in resumed.rounds] == [1, 2, 3]
    for a, b in zip(reference.rounds, resumed.rounds, strict=True):
        for key, value in a.metrics.items():
            if not key.startswith("time/"):
                assert b.metrics[key] == value, (a.round, key)


def test_fedbn_resume_reads_each_clients_bn_from_client_state(make_cfg, tmp_path):
    # Catches: a resumed FedBN client that starts from the global (initial) BatchNorm.
    _assert_resume_is_exact(make_cfg, tmp_path, ["bn=local", *QUICK])
    assert sorted(p.name for p in (tmp_path / "resumed" / "client_state").iterdir()) == [
        "client0",
        "client1",
    ]


def test_fedbn_resume_without_a_clients_own_batchnorm_is_refused(make_cfg, tmp_path):
    # Catches: a client whose client_state/ file is gone silently going on from its initial
    # BatchNorm (the run ended with exit 0 and other numbers).
    import shutil

    from fedkws.errors import RunRefused

    cfg = make_cfg([*BASE, "bn=local", *QUICK])
    run_dir = tmp_path / "run"
    cfg.train.stop_after_round = 1
    run(cfg, run_dir)
    shutil.rmtree(run_dir / "client_state" / "client1")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    cfg.train.stop_after_round, cfg.resume = None, True
    with pytest.raises(RunRefused, match=r"client_state lacks client1/fedbn_round1\.pt: each"):
        run(cfg, run_dir)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_client_that_failed_its_last_round_needs_the_file_of_the_round_before(tmp_path):
    # Catches: a client that failed in round 2 (it wrote nothing then) making every later
    # resume of the run impossible: its state after round 1 is what it goes on from; and a
    # damaged file of a client's last round let through (the client then failed every round).
    from types import SimpleNamespace

    from fedkws.errors import RunRefused
    from fedkws.fl.client_app import client_state_file
    from fedkws.recipes.common import _check_client_state

    spec = SimpleNamespace(bn=SimpleNamespace(sync="local"), strategy=SimpleNamespace(cyclic=False))
    trained = {"train_loss": 1.0}
    records = [{"round": 1, "clients": {"0": trained, "1": trained}},
               {"round": 2, "clients": {"0": trained, "1": {"failed": 1.0}}}]  # fmt: skip
    for pid, round_ in ((0, 1), (1, 1), (0, 2)):
        client_state_file(tmp_path, pid, round_).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"bn.running_mean": torch.zeros(2)}, client_state_file(tmp_path, pid, round_))
    client_state_file(tmp_path, 0, 1).write_bytes(b"")  # not the last round of client 0
    _check_client_state(spec, records, tmp_path)
    last = client_state_file(tmp_path, 1, 1)
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(RunRefused, match=r"client1/fedbn_round1\.pt cannot be read \(damaged or"):
        _check_client_state(spec, records, tmp_path)
    last.unlink()
    with pytest.raises(RunRefused, match=r"lacks client1/fedbn_round1\.pt: each is a client's own"):
        _check_client_state(spec, records, tmp_path)


def test_fedadam_resume_restores_the_server_moments(make_cfg, tmp_path):
    # Catches: m_t and v_t of Flower's FedAdam not checkpointed or not restored.
    _assert_resume_is_exact(make_cfg, tmp_path, ["strategy=fedadam", *QUICK])
    optimizer = _checkpoint(tmp_path / "resumed")["optimizer"]
    assert optimizer["class_name"] == "FedAdam"
    assert optimizer["state"]["m_t"]["value"] and optimizer["state"]["v_t"]["value"]


def test_fedmedian_resume_is_exact(make_cfg, tmp_path):
    # Catches: a stateless robust strategy whose resume differs (e.g. the strategy's
    # node sampling moving Python's global random stream, statistics through the median).
    _assert_resume_is_exact(make_cfg, tmp_path, ["strategy=fedmedian", *QUICK])
    optimizer = _checkpoint(tmp_path / "resumed")["optimizer"]
    assert optimizer["class_name"] == "FedMedian"


def test_central_resume_restores_the_adamw_state(make_cfg, tmp_path):
    # Catches: the centralised optimiser's state not checkpointed or not restored.
    _assert_resume_is_exact(make_cfg, tmp_path, ["strategy=central", "optimizer=adamw", *QUICK])
    ckpt = _checkpoint(tmp_path / "resumed")
    assert ckpt["optimizer_kind"] == "central" and ckpt["optimizer"]["state"]


# --------------------------------------------------------------------------- strategies


@pytest.fixture(scope="module")
def fedavg_quick(tmp_path_factory, data_dir, tiny_root):
    """The reference for the "does it change anything" tests: FedAvg, no augmentation."""
    from conftest import compose_cfg

    cfg = compose_cfg(BASE + ["train.rounds=2", "train.local_epochs=1"], data_dir, tiny_root)
    run_dir = tmp_path_factory.mktemp("fedavg") / "run"
    return run(cfg, run_dir), run_dir, cfg


def _distance(a: dict, b: dict, keys) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys))


def test_fedavgm_server_momentum_changes_the_update(make_cfg, tmp_path, fedavg_quick):
    # Catches: FedAvgM without momentum (== FedAvg), momentum not kept in the checkpoint.
    reference, ref_dir, _ = fedavg_quick
    result, run_dir, cfg = _run(make_cfg, tmp_path, ["strategy=fedavgm", *QUICK])
    # Round 1: m = delta, server lr 1: the same model as FedAvg (Flower's FedAvgM computes
    # global - (global - mean): the mean up to float32 rounding, so losses agree to ~1e-7).
    first = {k: v for k, v in result.rounds[0].metrics.items() if not k.startswith("time/")}
    assert first == pytest.approx(
        {k: v for k, v in reference.rounds[0].metrics.items() if k in first}, rel=1e-5
    )
    # Round 2 adds 0.9 * m from round 1: a different model.
    ckpt = _checkpoint(run_dir)
    params = [n for n, _ in _model(cfg).named_parameters()]
    assert _distance(ckpt["model"], _global_state(ref_dir), params) > 1e-3
    assert result.rounds[1].metrics["val/eval/loss"] != reference.rounds[1].metrics["val/eval/loss"]
    momentum = ckpt["optimizer"]["state"]["momentum_vector"]["value"]  # Flower's, one per param
    assert len(momentum) == len(params)
    assert any(float(v.abs().max()) > 0 for v in momentum)


def test_fedprox_pulls_the_clients_towards_the_global_model(make_cfg, tmp_path, fedavg_quick):
    # Catches: FedProx's proximal_mu ignored by the clients (FedProx == FedAvg).
    reference, ref_dir, cfg = fedavg_quick
    result, run_dir, _ = _run(
        make_cfg, tmp_path, ["strategy=fedprox", "strategy.kwargs.proximal_mu=1.0", *QUICK]
    )
    params = [n for n, _ in _model(cfg).named_parameters()]
    initial = _initial_model(cfg).state_dict()
    prox, plain = _global_state(run_dir), _global_state(ref_dir)
    # Same seed, same data order: only the proximal term differs, and it pulls the
    # model towards where each round started.
    assert result.rounds[0].metrics["train/loss"] != reference.rounds[0].metrics["train/loss"]
    assert _distance(prox, initial, params) < 0.9 * _distance(plain, initial, params)


@pytest.mark.parametrize("strategy", ["fedavg", "central"])
def test_full_augmentation_changes_training(make_cfg, tmp_path, strategy):
    # Catches: augmentation configured but not applied (in clients or centrally).
    runs = {}
    for augment in ("none", "full"):
        result, run_dir, cfg = _run(
            make_cfg, tmp_path,
            [f"strategy={strategy}", f"augment={augment}", "train.rounds=1",
             "train.local_epochs=1"],
            name=augment,
        )  # fmt: skip
        runs[augment] = (result, _global_state(run_dir))
    params = [n for n, _ in _model(cfg).named_parameters()]
    (plain, plain_state), (aug, aug_state) = runs["none"], runs["full"]
    assert aug.rounds[0].metrics["train/loss"] != plain.rounds[0].metrics["train/loss"]
    assert _distance(aug_state, plain_state, params) > 1e-3
    assert all(math.isfinite(v) for v in aug.rounds[0].metrics.values())


# --------------------------------------------------------------------------- schedules


def test_recalibrate_every_two_rounds(make_cfg, tmp_path):
    # Catches: recalibrate_every ignored (every round) or the last round skipped.
    result, _, _ = _run(
        make_cfg, tmp_path,
        ["bn.eval_modes=[eval,recalibrated]", "bn.recalibrate_every=2", "train.rounds=3",
         "train.local_epochs=1"],
    )  # fmt: skip
    logged = [r.round for r in result.rounds if "val/recalibrated/acc" in r.metrics]
    assert logged == [2, 3]
    assert all("val/eval/acc" in r.metrics for r in result.rounds)
    # The recalibration's time, recorded where it ran, as a part of the round's evaluation.
    timed = [r.round for r in result.rounds if "time/recalibration_s" in r.metrics]
    assert timed == [2, 3]
    for r in result.rounds[1:]:
        assert 0 < r.metrics["time/recalibration_s"] < r.metrics["time/eval_s"]


def test_client_sampling_is_a_function_of_seed_and_round(make_cfg, tmp_path):
    # Catches: sampling that ignores fraction_train, depends on call history, or never
    # changes between rounds.
    result, run_dir, cfg = _run(
        make_cfg, tmp_path,
        ["partition.num_clients=4", "strategy.fraction_train=0.5", "train.rounds=4",
         "train.local_epochs=1", "train.batch_size=32"],
    )  # fmt: skip
    with np.load(run_dir / "clients.npz") as npz:
        eligible = [p for p in range(4) if len(npz[f"train_{p}"]) > 0]
    assert eligible == [0, 1, 2, 3]
    seed = from_config(cfg).seed
    sampled = [sorted(int(p) for p in rec.clients) for rec in result.rounds]
    assert all(len(s) == 2 for s in sampled)
    assert all(rec.metrics["clients"] == 2 for rec in result.rounds)
    assert sampled == [sample_clients(seed, r, eligible, 0.5, 1) for r in (1, 2, 3, 4)]
    assert len({tuple(s) for s in sampled}) > 1


def test_sample_clients_draws_only_eligible_ids():
    eligible = [0, 2, 5, 7, 11]
    seen = set()
    for seed in range(5):
        for round_ in range(1, 21):
            picks = sample_clients(seed, round_, eligible, 0.4, 1)
            assert picks == sorted(set(picks)) and len(picks) == 2
            assert set(picks) <= set(eligible)
            seen.update(picks)
    assert seen == set(eligible)
    # A pure function: the same answer whatever was drawn before.
    assert sample_clients(3, 7, eligible, 0.4, 1) == sample_clients(3, 7, eligible, 0.4, 1)
    assert sample_clients(1, 1, eligible, 0.0, 3) == sample_clients(1, 1, eligible, 0.0, 3)
    assert len(sample_clients(1, 1, eligible, 0.0, 3)) == 3
    assert sample_clients(1, 1, eligible, 1.0, 1) == eligible


# Every file of conf/strategy, plus a Flower class named only through strategy=flower.
STRATEGY_RUNS = [
    [f"strategy={p.stem}"] for p in sorted((Path(CONF_DIR) / "strategy").glob("*.yaml"))
] + [
    ["strategy=flower", "strategy.class_name=Bulyan", "+strategy.kwargs.num_malicious_nodes=0",
     "partition.num_clients=3"],
]  # fmt: skip


# The default suite drives four representative rules (plain, adaptive, robust, any Flower
# class by name) through a real round; `make test-slow` drives every file.
QUICK_STRATEGIES = ("strategy=fedavg", "strategy=fedadam", "strategy=fedmedian", "strategy=flower")
SOME_STRATEGY_RUNS = [
    pytest.param(run_, marks=[] if run_[0] in QUICK_STRATEGIES else [pytest.mark.slow])
    for run_ in STRATEGY_RUNS
]


@pytest.mark.parametrize("overrides", SOME_STRATEGY_RUNS, ids=lambda o: " ".join(o))
def test_every_strategy_config_runs_one_round(make_cfg, tmp_path, overrides):
    # Catches: a strategy file that does not compose, is rejected by the spec, cannot be
    # built or driven by fedkws, returns no model, or breaks the checkpoint.
    # The small CNN (2 BatchNorm layers) keeps each round well under a second.
    tiny = ["model=cnn", "train.rounds=1", "train.local_epochs=1", "bn.eval_modes=[eval]"]
    base = [o for o in BASE if not o.startswith("model")]
    cfg = make_cfg([*base, *tiny, *overrides])
    result = run(cfg, tmp_path / "run")
    assert [r.round for r in result.rounds] == [1]
    assert all(math.isfinite(v) for v in result.rounds[0].metrics.values())
    ckpt = _checkpoint(tmp_path / "run")
    initial = _initial_model(cfg).state_dict()
    if cfg.strategy.name != "central":
        assert ckpt["optimizer"]["class_name"] == cfg.strategy.class_name
        # The strategy's update reached the model (no skipped round).
        assert any(not torch.equal(ckpt["model"][k], initial[k]) for k in initial)


@pytest.mark.parametrize(
    ("overrides", "warned"),
    [
        (["bn=fixbn", "bn.freeze_after=5"], "FixBN freezes no round of this run's training"),
        (["bn=local", "partition.local_test_fraction=0"], "so no round has an accuracy"),
    ],
)
def test_a_setting_that_quietly_does_nothing_is_warned_of(
    make_cfg, tmp_path, caplog, overrides, warned
):
    # Catches: a fixbn run that never froze (a full-state run labelled fixbn) and a FedBN
    # run with no per-round accuracy, both without a word.
    run(make_cfg([*BASE, "train.rounds=1", "train.local_epochs=1", *overrides]), tmp_path / "r")
    assert warned in caplog.text


@pytest.mark.parametrize("bn", ["full", "local"])
def test_resume_after_the_last_round_still_asks_the_clients(bn, make_cfg, tmp_path):
    """A run stopped during its final evaluation (rounds all done; results.json without a
    summary) resumes to the same final numbers. Catches: the clients never started again,
    so the recalibrated and fresh_average modes (bn=full) or every client's test numbers
    (FedBN) were left out of a run marked complete."""
    import json

    reference, run_dir, cfg = _run(make_cfg, tmp_path, [f"bn={bn}", *QUICK])
    results = json.loads((run_dir / "results.json").read_text())
    results["summary"] = {}  # as a stop during the final evaluation leaves it
    (run_dir / "results.json").write_text(json.dumps(results))
    cfg.resume = True
    resumed = run(cfg, run_dir)
    final = {k for k in reference.summary if k.startswith(("final/", "test/"))}
    assert any("recalibrated" in k or "fedbn" in k for k in final)
    assert {k: resumed.summary.get(k) for k in final} == {k: reference.summary[k] for k in final}
    assert resumed.summary["complete"]
