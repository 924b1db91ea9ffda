"""``bn=silo``: SiloBN, BatchNorm's affine parameters shared, its statistics kept by each client.

The key plan is checked against the model's own named parameters and buffers;
the wire, each client's BatchNorm at the start of every local training and the
server's state against a short in-process federated run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedkws.core.aggregation import aggregate, average_params, keeps_client_state, key_plan
from fedkws.core.models import build_model
from fedkws.core.seeding import seed_model_init
from fedkws.errors import user_errors
from fedkws.recipes.common import final_modes
from fedkws.run import run
from fedkws.spec import from_config
from helpers import SMALL_FEDERATION, compose_cfg, error_lines

NUM_CLASSES = 12
BASE = [*SMALL_FEDERATION, "federation.backend=inprocess", "train.rounds=2", "train.local_epochs=1"]


def _bn_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def _bn_split(model: nn.Module) -> tuple[set[str], set[str]]:
    """(BatchNorm parameters, BatchNorm buffers), from the modules' own registrations."""
    params, buffers = set(), set()
    for name in _bn_modules(model):
        module = model.get_submodule(name)
        params |= {f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)}
        buffers |= {f"{name}.{b}" for b, _ in module.named_buffers(recurse=False)}
    return params, buffers


@pytest.mark.parametrize(
    ("name", "kwargs"), [("cnn", {}), ("res8", {}), ("resnet10", {"width": 8}),
                         ("resnet50", {"width": 8})],
)  # fmt: skip
def test_silo_key_plan_keeps_exactly_the_bn_buffers_local(name, kwargs):
    model = build_model(name, NUM_CLASSES, norm="batch", **kwargs)
    bn_params, bn_buffers = _bn_split(model)
    assert bn_params and bn_buffers
    assert {b.rsplit(".", 1)[1] for b in bn_buffers} == {
        "running_mean", "running_var", "num_batches_tracked",
    }  # fmt: skip
    plan = key_plan(model, "silo")
    assert set(plan.local) == bn_buffers
    assert set(plan.params) == {n for n, _ in model.named_parameters()}
    assert bn_params <= set(plan.shared)
    assert not plan.stats and not plan.counters
    assert set(plan.shared) | set(plan.local) == set(model.state_dict())
    # FedBN keeps the parameters local as well; full ships the same parameters.
    assert set(key_plan(model, "local").local) == bn_params | bn_buffers
    assert key_plan(model, "full").params == plan.params
    assert keeps_client_state("silo") and keeps_client_state("local")
    assert not keeps_client_state("full") and not keeps_client_state("params_only")


def test_silo_averages_bn_parameters_and_never_touches_the_server_statistics():
    model = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2))
    plan = key_plan(model, "silo")
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    clients = []
    for scale in (1.0, 3.0):
        state = {k: v.clone() for k, v in glob.items()}
        for key in ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
            state[key] = state[key] + scale
        state["1.num_batches_tracked"] = torch.tensor(5)
        clients.append({k: state[k] for k in plan.shared})
    new = aggregate(glob, clients, [1, 3], plan, average_params)
    for key in ("0.weight", "1.weight", "1.bias"):  # weighted mean: + (1 * 1 + 3 * 3) / 4
        assert torch.allclose(new[key], glob[key] + 2.5), key
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(new[key], glob[key]), key


def test_silo_is_evaluated_per_client_and_needs_batchnorm(tmp_path, capsys):
    spec = from_config(compose_cfg(["bn=silo"], tmp_path / "data"))
    assert spec.bn.sync == "silo" and spec.bn.eval_modes == ("eval",)
    model = build_model(**spec.model.build_args(NUM_CLASSES))
    assert "recalibrated" not in final_modes(spec, model)
    cfg = compose_cfg(["bn=silo", "norm=group"], tmp_path / "data")
    with pytest.raises(SystemExit), user_errors():
        from_config(cfg)
    (line,) = error_lines(capsys.readouterr().err)
    assert "SiloBN needs a model with BatchNorm (norm=batch, not group)" in line


@pytest.fixture
def wire(monkeypatch):
    """The keys of every message the in-process grid carries: (type, pid, sent, replied)."""
    from fedkws.fl.inprocess import InProcessGrid

    log: list[dict] = []
    handle = InProcessGrid._handle

    def recording(self, message):
        sent = set(message.content["model"].keys()) if "model" in message.content else set()
        reply = handle(self, message)
        back = set()
        if not reply.has_error() and "model" in reply.content:
            back = set(reply.content["model"].keys())
        pid = int(self.contexts[message.metadata.dst_node_id].node_config["partition-id"])
        log.append({"type": message.metadata.message_type, "pid": pid, "sent": sent,
                    "replied": back})  # fmt: skip
        return reply

    monkeypatch.setattr(InProcessGrid, "_handle", recording)
    return log


@pytest.fixture
def trainings(monkeypatch):
    """Every client's full model state at the start and the end of each local training."""
    import fedkws.core.loops as loops

    seen: list[dict] = []
    real = loops.train_epochs

    def recording(model, *args, **kwargs):
        start = {k: v.clone() for k, v in model.state_dict().items()}
        stats = real(model, *args, **kwargs)
        seen.append({"start": start, "end": {k: v.clone() for k, v in model.state_dict().items()}})
        return stats

    monkeypatch.setattr(loops, "train_epochs", recording)
    return seen


def _weighted(states: list[dict], counts: list[int], key: str) -> torch.Tensor:
    total = float(sum(counts))
    return sum(s[key].double() * (n / total) for s, n in zip(states, counts, strict=True))


def test_silo_run_shares_bn_parameters_and_keeps_statistics_per_client(
    make_cfg, tmp_path, wire, trainings
):
    # Catches: statistics on the wire, a client starting from the server's (or another
    # client's) statistics, BatchNorm parameters that stay on the client as under FedBN.
    cfg = make_cfg([*BASE, "bn=silo"])
    spec = from_config(cfg)
    seed_model_init(spec.seed)
    initial = build_model(**spec.model.build_args(NUM_CLASSES)).state_dict()
    bn_params, bn_buffers = _bn_split(build_model(**spec.model.build_args(NUM_CLASSES)))
    result = run(cfg, tmp_path / "run")

    for m in (m for m in wire if m["type"] != "query.hello"):
        assert bn_params <= m["sent"] and not (m["sent"] & bn_buffers), m["type"]
        assert not (m["replied"] & bn_buffers), m["type"]
    trained = [m["pid"] for m in wire if m["type"] == "train"]
    assert trained == [0, 1, 0, 1] and len(trainings) == 4
    rounds = [trainings[:2], trainings[2:]]
    counts = [int(result.rounds[0].clients[str(p)]["num-examples"]) for p in (0, 1)]

    # Round 1 starts from the initial model; round 2 from the weighted mean of round 1's
    # BatchNorm parameters (the global ones) but with each client's own statistics.
    for key in bn_params | bn_buffers:
        assert all(torch.equal(t["start"][key], initial[key]) for t in rounds[0]), key
    for key in bn_params:
        mean = _weighted([t["end"] for t in rounds[0]], counts, key)
        for t in rounds[1]:
            assert torch.allclose(t["start"][key].double(), mean, atol=1e-6), key
    for pid in (0, 1):
        for key in bn_buffers:
            assert torch.equal(rounds[1][pid]["start"][key], rounds[0][pid]["end"][key]), key
    # The clients' statistics are their own: different from each other's after training.
    means = sorted(k for k in bn_buffers if k.endswith("running_mean"))
    for key in means:
        assert not torch.allclose(rounds[1][0]["end"][key], rounds[1][1]["end"][key]), key

    # The server: BatchNorm parameters aggregated, its statistics never changed.
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    counts = [int(result.rounds[1].clients[str(p)]["num-examples"]) for p in (0, 1)]
    for key in bn_params:
        mean = _weighted([t["end"] for t in rounds[1]], counts, key)
        assert torch.allclose(state[key].double(), mean, atol=1e-6), key
    for key in bn_buffers:
        assert torch.equal(state[key], initial[key]), key
    # What each client kept on disk: its statistics only, as they ended its last round.
    for pid in (0, 1):
        own = torch.load(tmp_path / "run" / "client_state" / f"client{pid}" / "fedbn_round2.pt")
        assert set(own) == bn_buffers
        assert all(torch.equal(own[k], rounds[1][pid]["end"][k]) for k in bn_buffers)

    # Evaluated as FedBN is: per client every round, each client's model on the test split.
    final = result.rounds[-1].metrics
    assert "fed/eval/acc_mean" in final and not any(k.startswith("val/") for k in final)
    assert {"test/fedbn/eval/acc_mean", "test/fedbn/eval/acc_client0"} <= set(result.summary)
    for info in result.rounds[-1].clients.values():
        assert info["bn_keys_received"] == len(bn_params)
