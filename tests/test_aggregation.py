"""Aggregation and server optimisers on hand-made states, against values computed by hand.

The model is a 1x1 convolution and a BatchNorm over two channels, so every state
entry is a 2-element tensor. Two clients reply, with 1 and 3 examples:

====================  ============  ============  ============
key                   global        client A (1)  client B (3)
====================  ============  ============  ============
0.weight (param)      [1, 2]        [2, 0]        [3, 6]
1.weight (param)      [1, 1]        [3, 1]        [1, 1]
1.bias (param)        [0, 0]        [4, 0]        [0, 0]
1.running_mean        [0, 0]        [1, 2]        [5, -2]
1.running_var         [1, 1]        [2, 4]        [6, 8]
1.num_batches_tracked 0             2             7
====================  ============  ============  ============

Weighted averages (weights 1/4, 3/4): ``0.weight`` [2.75, 4.5], so delta [1.75, 2.5];
``1.weight`` [1.5, 1] (delta [0.5, 0]); ``1.bias`` [1, 0] (delta [1, 0]);
``running_mean`` [4, -1]; ``running_var`` [5, 7]; ``num_batches_tracked`` 5.75 -> 6.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedkws.core.aggregation import ServerOptimizer, aggregate, key_plan, weighted_average

W = "0.weight"
BN_W, BN_B = "1.weight", "1.bias"
MEAN, VAR, COUNT = "1.running_mean", "1.running_var", "1.num_batches_tracked"
COUNTS = [1, 3]


def _t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2))


def _state(w, bn_w, bn_b, mean, var, count) -> dict[str, torch.Tensor]:
    return {
        W: torch.tensor(w, dtype=torch.float32).reshape(2, 1, 1, 1),
        BN_W: _t(*bn_w),
        BN_B: _t(*bn_b),
        MEAN: _t(*mean),
        VAR: _t(*var),
        COUNT: torch.tensor(count, dtype=torch.int64),
    }


GLOBAL = _state([1, 2], [1, 1], [0, 0], [0, 0], [1, 1], 0)
CLIENT_A = _state([2, 0], [3, 1], [4, 0], [1, 2], [2, 4], 2)
CLIENT_B = _state([3, 6], [1, 1], [0, 0], [5, -2], [6, 8], 7)


def _aggregate(rule: str, sync: str = "full", **kwargs) -> tuple[dict, ServerOptimizer]:
    opt = ServerOptimizer(rule, **kwargs)
    plan = key_plan(_model(), sync)
    return aggregate(GLOBAL, [CLIENT_A, CLIENT_B], COUNTS, plan, opt), opt


def _w(state) -> list[float]:
    return state[W].flatten().tolist()


def test_key_plan_sorts_the_keys_by_hand():
    # Catches: running statistics taken for parameters, counters for statistics, a BN
    # key that leaves the client under FedBN, a buffer that travels under params_only.
    full = key_plan(_model(), "full")
    assert (full.params, full.stats, full.counters, full.local) == (
        (W, BN_W, BN_B), (MEAN, VAR), (COUNT,), ())  # fmt: skip
    only = key_plan(_model(), "params_only")
    assert (only.params, only.stats, only.counters) == ((W, BN_W, BN_B), (), ())
    assert set(only.local) == {MEAN, VAR, COUNT}
    local = key_plan(_model(), "local")
    assert local.shared == (W,) and set(local.local) == {BN_W, BN_B, MEAN, VAR, COUNT}


def test_weighted_average_by_hand():
    avg = weighted_average([CLIENT_A, CLIENT_B], [1.0, 3.0], [W, MEAN, VAR])
    assert avg[W].flatten().tolist() == [2.75, 4.5]
    assert avg[MEAN].tolist() == [4.0, -1.0]
    assert avg[VAR].tolist() == [5.0, 7.0]


@pytest.mark.parametrize("rule", ServerOptimizer.RULES)
def test_running_statistics_are_the_weighted_mean_under_every_rule(rule):
    # Catches: running statistics pushed through the server optimiser (momentum or
    # Adam can drive running_var negative), counters averaged as floats or truncated.
    # server_lr 0.5 makes even FedAvg's parameter update differ from the plain mean.
    opt = ServerOptimizer(rule, lr=0.5, momentum=0.9)
    plan = key_plan(_model(), "full")
    state = dict(GLOBAL)
    for _ in range(2):  # the second round runs with the optimiser's state set
        state = aggregate(state, [CLIENT_A, CLIENT_B], COUNTS, plan, opt)
        assert state[MEAN].tolist() == [4.0, -1.0]
        assert state[VAR].tolist() == [5.0, 7.0]
        assert state[COUNT].dtype == torch.int64 and int(state[COUNT]) == 6  # round(5.75)
        assert state[MEAN].dtype == state[VAR].dtype == torch.float32
    # The parameters, by contrast, did go through the optimiser (not the plain mean).
    assert _w(state) != [2.75, 4.5]


def test_params_only_keeps_the_global_statistics_and_local_keeps_all_bn():
    # Catches: buffers averaged although they never crossed the wire.
    state, _ = _aggregate("fedavg", "params_only")
    assert state[MEAN].tolist() == [0.0, 0.0] and state[VAR].tolist() == [1.0, 1.0]
    assert int(state[COUNT]) == 0
    assert state[BN_W].tolist() == [1.5, 1.0] and state[BN_B].tolist() == [1.0, 0.0]
    state, _ = _aggregate("fedavg", "local")
    for key in (BN_W, BN_B, MEAN, VAR, COUNT):
        assert torch.equal(state[key], GLOBAL[key]), key
    assert _w(state) == [2.75, 4.5]


def test_fedavg_and_fedprox_are_the_weighted_mean():
    for rule in ("fedavg", "fedprox"):
        state, _ = _aggregate(rule)
        assert _w(state) == [2.75, 4.5]
        assert state[BN_W].tolist() == [1.5, 1.0] and state[BN_B].tolist() == [1.0, 0.0]
    # With a server learning rate: global + lr * delta = [1 + 0.5*1.75, 2 + 0.5*2.5]
    state, _ = _aggregate("fedavg", lr=0.5)
    assert _w(state) == [1.875, 3.25]


def test_fedavgm_momentum_step_by_hand():
    # Catches: momentum ignored (FedAvgM == FedAvg), momentum not kept between rounds.
    opt = ServerOptimizer("fedavgm", lr=1.0, momentum=0.9)
    plan = key_plan(_model(), "full")
    s1 = aggregate(GLOBAL, [CLIENT_A, CLIENT_B], COUNTS, plan, opt)
    # Round 1: m = delta = [1.75, 2.5]; w = [1, 2] + m
    assert _w(s1) == [2.75, 4.5]
    assert opt.state_dict()["m"][W].flatten().tolist() == [1.75, 2.5]
    # Round 2: both clients send [3.75, 4.5], so delta = [1, 0];
    # m = 0.9 * [1.75, 2.5] + [1, 0] = [2.575, 2.25]; w = [2.75, 4.5] + m = [5.325, 6.75].
    both = {**s1, W: torch.tensor([3.75, 4.5]).reshape(2, 1, 1, 1)}
    s2 = aggregate(s1, [both, both], COUNTS, plan, opt)
    assert _w(s2) == pytest.approx([5.325, 6.75], abs=1e-6)
    # Plain FedAvg would stop at the clients' value.
    assert _w(s2) != pytest.approx([3.75, 4.5], abs=1e-3)


def test_fedadam_first_step_by_hand():
    # From m = 0, v = tau^2: m = (1 - b1) delta, v = b2 tau^2 + (1 - b2) delta^2,
    # w += lr m / (sqrt(v) + tau), with lr 0.1, b1 0.9, b2 0.99, tau 1e-3.
    state, opt = _aggregate("fedadam", lr=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    expected = []
    for w0, delta in ((1.0, 1.75), (2.0, 2.5)):
        m = 0.1 * delta
        v = 0.99 * 1e-6 + 0.01 * delta**2
        expected.append(w0 + 0.1 * m / (math.sqrt(v) + 1e-3))
    assert _w(state) == pytest.approx(expected, rel=1e-6)
    assert opt.state_dict()["v"][W].flatten().tolist() == pytest.approx(
        [0.99e-6 + 0.01 * 1.75**2, 0.99e-6 + 0.01 * 2.5**2], rel=1e-9
    )


# A server optimiser in mid-run: m = [0.5, -0.5], v = [4, 0.01] on 0.weight, and
# beta_2 = 0.5 so that v moves a lot. With delta^2 = [3.0625, 6.25], Yogi's
# sign(v - delta^2) is +1 for the first entry and -1 for the second, so Adam, Yogi and
# a sign-flipped Yogi (negative v in the second entry) all differ.
MID_RUN = {
    "m": {W: torch.tensor([0.5, -0.5], dtype=torch.float64).reshape(2, 1, 1, 1)},
    "v": {W: torch.tensor([4.0, 0.01], dtype=torch.float64).reshape(2, 1, 1, 1)},
}


def _mid_run_step(rule: str) -> list[float]:
    opt = ServerOptimizer(rule, lr=0.1, beta_1=0.9, beta_2=0.5, tau=1e-3)
    opt.load_state_dict(MID_RUN)
    plan = key_plan(_model(), "full")
    return _w(aggregate(GLOBAL, [CLIENT_A, CLIENT_B], COUNTS, plan, opt))


def _adaptive_expected(v_new: tuple[float, float]) -> list[float]:
    out = []
    for w0, m0, delta, v in zip((1.0, 2.0), (0.5, -0.5), (1.75, 2.5), v_new, strict=True):
        m = 0.9 * m0 + 0.1 * delta
        out.append(w0 + 0.1 * m / (math.sqrt(v) + 1e-3))
    return out


def test_fedadam_step_from_a_mid_run_state_by_hand():
    # v = 0.5 v + 0.5 delta^2 = [0.5*4 + 0.5*3.0625, 0.5*0.01 + 0.5*6.25]
    expected = _adaptive_expected((2.0 + 1.53125, 0.005 + 3.125))
    assert _mid_run_step("fedadam") == pytest.approx(expected, rel=1e-6)


def test_fedyogi_step_from_a_mid_run_state_by_hand():
    # Catches: Yogi's sign flipped, Yogi computed as Adam.
    # v = v - 0.5 delta^2 sign(v - delta^2) = [4 - 1.53125, 0.01 + 3.125]
    expected = _adaptive_expected((4.0 - 1.53125, 0.01 + 3.125))
    got = _mid_run_step("fedyogi")
    assert got == pytest.approx(expected, rel=1e-6)
    assert got[0] != pytest.approx(_mid_run_step("fedadam")[0], rel=1e-3)


def test_aggregate_leaves_its_inputs_alone():
    before = [{k: v.clone() for k, v in s.items()} for s in (GLOBAL, CLIENT_A, CLIENT_B)]
    _aggregate("fedadam", lr=0.1)
    for old, new in zip(before, (GLOBAL, CLIENT_A, CLIENT_B), strict=True):
        assert all(torch.equal(old[k], new[k]) for k in old)
