"""FixBN: ordinary federated BatchNorm for T rounds, then exact pooled statistics, frozen."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedkws.core import loops
from fedkws.core.bn import bn_input_moments, recalibrate
from fedkws.core.models import build_model
from fedkws.recipes.common import load_data
from fedkws.run import run
from fedkws.spec import from_config
from helpers import SMALL_FEDERATION

BASE = [*SMALL_FEDERATION, "federation.backend=inprocess", "train.local_epochs=1",
        "bn=fixbn", "bn.freeze_after=1", "train.rounds=3", "logger=disabled"]  # fmt: skip


def _stats(state):
    return {k: v.clone() for k, v in state.items() if "running_" in k}


def test_frozen_training_keeps_statistics_and_learns(tiny_data_rows):
    data, rows = tiny_data_rows
    torch.manual_seed(0)
    model = build_model("resnet", 12, depth=10, width=8)
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loops.train_epochs(model, data, rows, 1, 16, opt, torch.Generator().manual_seed(0),
                       frozen_bn=True)  # fmt: skip
    after = model.state_dict()
    for key in before:
        if "running_" in key or "num_batches" in key:
            assert torch.equal(after[key], before[key]), key
    bn_weights = [k for k in before if k.endswith("norm1.weight")]
    assert any(not torch.equal(after[k], before[k]) for k in bn_weights)  # affine still learns


@pytest.fixture(scope="module")
def tiny_data_rows(data_dir, tiny_root):
    from fedkws.data.cache import DataConfig, prepare
    from fedkws.data.features import FeatureConfig

    data = prepare(DataConfig(root=str(tiny_root)), FeatureConfig(), data_dir / "cache", False)
    return data, np.sort(data.split_indices("training"))[:64]


def _record_frozen_flags(monkeypatch) -> list[tuple[int, bool]]:
    """(round, bn_frozen) of every training message the in-process grid carries."""
    from fedkws.fl.inprocess import InProcessGrid
    from fedkws.fl.messages import ClientTask

    seen: list[tuple[int, bool]] = []
    handle = InProcessGrid._handle

    def recording(self, message):
        if message.metadata.message_type == "train":
            task = ClientTask.from_record(message.content["config"])
            seen.append((task.round, task.bn_frozen))
        return handle(self, message)

    monkeypatch.setattr(InProcessGrid, "_handle", recording)
    return seen


def test_statistics_are_pooled_after_warmup_then_frozen(make_cfg, tmp_path, monkeypatch):
    flags = _record_frozen_flags(monkeypatch)
    run_dir = tmp_path / "run"
    cfg = make_cfg([*BASE, "train.stop_after_round=1"])
    run(cfg, run_dir)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    frozen = _stats(ckpt["model"])
    # Independently of the run: the pooled statistics of the union of the clients'
    # training rows for the round-1 global model (its parameters).
    spec = from_config(cfg)
    data = load_data(spec)
    model = build_model(**spec.model.build_args(data.num_classes))
    model.load_state_dict(ckpt["model"])
    with np.load(run_dir / "clients.npz") as npz:
        union = np.sort(np.concatenate([npz[k] for k in npz.files if k.startswith("train_")]))
    want = _stats(recalibrate(model, lambda net, layer: [
        bn_input_moments(net, data, union, layer, 64)]).state_dict())  # fmt: skip
    for key, value in want.items():
        assert torch.allclose(frozen[key], value, rtol=1e-4, atol=1e-5), key
    # Resume to the end: the statistics never move again, the weights do.
    run(make_cfg([*BASE, "resume=true"]), run_dir)
    final = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    for key, value in frozen.items():
        assert torch.equal(final[key], value), key
    weights = [k for k in final if k.endswith("conv1.weight")]
    assert any(not torch.equal(final[k], ckpt["model"][k]) for k in weights)
    # Catches: clients never told to train with the frozen statistics (nor told too early).
    assert sorted(set(flags)) == [(1, False), (2, True), (3, True)]


def test_aggregated_statistics_are_frozen_as_the_warmup_left_them(make_cfg, tmp_path):
    # bn.freeze_stats=aggregated (Zhong et al.): the statistics frozen are the running ones
    # the warm-up's aggregation left, bit for bit those of a bn=full run after that round.
    # Catches: the exact pooled ones installed instead, or the statistics moving later.
    agg = [*BASE, "bn.freeze_stats=aggregated"]
    run(make_cfg([*agg, "train.stop_after_round=1"]), tmp_path / "fixbn")
    full = [*(o for o in BASE if not o.startswith("bn.")), "bn=full", "train.stop_after_round=1"]
    run(make_cfg(full), tmp_path / "full")
    frozen = _stats(torch.load(tmp_path / "fixbn" / "checkpoint.pt", weights_only=True)["model"])
    averaged = _stats(torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"])
    assert frozen.keys() == averaged.keys() and frozen
    assert all(torch.equal(frozen[k], averaged[k]) for k in frozen)
    run(make_cfg([*agg, "resume=true"]), tmp_path / "fixbn")
    final = torch.load(tmp_path / "fixbn" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], v) for k, v in frozen.items())


def test_freeze_keys_belong_to_fixbn(make_cfg):
    # Catches: +bn.freeze_stats (the not-a-key message's own advice) on bn=full, silently
    # ignored (exit 0, a plain full-state run).
    from fedkws.errors import ConfigError

    for key in ("+bn.freeze_stats=aggregated", "+bn.freeze_after=3"):
        with pytest.raises(ConfigError, match=r"applies to bn=fixbn only \(bn.sync=full\)"):
            from_config(make_cfg([*(o for o in BASE if not o.startswith("bn")), "bn=full", key]))


def test_fixbn_needs_batchnorm(make_cfg):
    from fedkws.errors import ConfigError

    with pytest.raises(ConfigError, match="FixBN"):
        from_config(make_cfg([*BASE, "norm=group"]))
