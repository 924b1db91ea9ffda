"""Aggregation and Flower's server rules on hand-made states, against values computed by hand.

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

The server rules are Flower's own strategies (:class:`fedkws.fl.strategy.FlowerServerRule`);
the expected values below follow Flower 1.42's formulas, written out by hand.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

from fedkws.core.aggregation import (
    aggregate,
    average_params,
    combine_buffers,
    key_plan,
    weighted_average,
)
from fedkws.fl.strategy import FlowerServerRule

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


def _rule(class_name: str, **kwargs) -> FlowerServerRule:
    return FlowerServerRule.from_spec(class_name, kwargs)


def _aggregate(class_name: str, sync: str = "full", **kwargs) -> tuple[dict, FlowerServerRule]:
    rule = _rule(class_name, **kwargs)
    return _step(rule, GLOBAL, sync=sync), rule


def _step(rule, state, clients=(CLIENT_A, CLIENT_B), sync="full", round_=1) -> dict:
    plan = key_plan(_model(), sync)
    return aggregate(state, list(clients), COUNTS, plan, functools.partial(rule.update, round_))


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


def test_combine_buffers_by_hand():
    out = combine_buffers(GLOBAL, [CLIENT_A, CLIENT_B], COUNTS, key_plan(_model(), "full"))
    assert set(out) == {MEAN, VAR, COUNT}
    assert out[MEAN].tolist() == [4.0, -1.0] and out[VAR].tolist() == [5.0, 7.0]
    assert out[MEAN].dtype == out[VAR].dtype == torch.float32
    assert out[COUNT].dtype == torch.int64 and int(out[COUNT]) == 6  # round(5.75)


# Each rule with arguments that make its parameter update differ from the plain mean
# (FedAvg and FedProx are the mean: there the check is that statistics are the mean too).
RULES = {
    "FedAvg": {},
    "FedProx": {"proximal_mu": 0.1},
    "FedAvgM": {"server_learning_rate": 0.5, "server_momentum": 0.9},
    "FedAdam": {"eta": 0.1},
    "FedYogi": {"eta": 0.1},
    "FedAdagrad": {"eta": 0.1},
}


@pytest.mark.parametrize("class_name", sorted(RULES))
def test_running_statistics_are_the_weighted_mean_under_every_rule(class_name):
    # Catches: running statistics pushed through the server rule (momentum or Adam can
    # drive running_var negative), counters averaged as floats or truncated, a rule
    # that is handed anything but the parameters.
    rule = _rule(class_name, **RULES[class_name])
    seen: list[set[str]] = []
    real = rule.strategy.aggregate_train

    def spy(server_round, replies):
        replies = list(replies)
        seen.extend(set(r.content["arrays"].keys()) for r in replies)
        return real(server_round, replies)

    rule.strategy.aggregate_train = spy
    state = dict(GLOBAL)
    for round_ in (1, 2):  # the second round runs with the rule's state set
        state = _step(rule, state, round_=round_)
        assert state[MEAN].tolist() == [4.0, -1.0]
        assert state[VAR].tolist() == [5.0, 7.0]
        assert state[COUNT].dtype == torch.int64 and int(state[COUNT]) == 6  # round(5.75)
        assert state[MEAN].dtype == state[VAR].dtype == torch.float32
    assert seen == [{W, BN_W, BN_B}] * 4
    if class_name not in ("FedAvg", "FedProx"):  # the parameters did go through the rule
        assert _w(state) != [2.75, 4.5]


def test_params_only_keeps_the_global_statistics_and_local_keeps_all_bn():
    # Catches: buffers averaged although they never crossed the wire.
    state, _ = _aggregate("FedAvg", "params_only")
    assert state[MEAN].tolist() == [0.0, 0.0] and state[VAR].tolist() == [1.0, 1.0]
    assert int(state[COUNT]) == 0
    assert state[BN_W].tolist() == [1.5, 1.0] and state[BN_B].tolist() == [1.0, 0.0]
    state, _ = _aggregate("FedAvg", "local")
    for key in (BN_W, BN_B, MEAN, VAR, COUNT):
        assert torch.equal(state[key], GLOBAL[key]), key
    assert _w(state) == [2.75, 4.5]


def test_fedavg_and_fedprox_are_the_weighted_mean():
    for class_name in ("FedAvg", "FedProx"):
        state, _ = _aggregate(class_name)
        assert _w(state) == [2.75, 4.5]
        assert state[BN_W].tolist() == [1.5, 1.0] and state[BN_B].tolist() == [1.0, 0.0]
    # The core's reference rule agrees.
    plan = key_plan(_model(), "full")
    assert _w(aggregate(GLOBAL, [CLIENT_A, CLIENT_B], COUNTS, plan, average_params)) == [2.75, 4.5]
    # With a server learning rate (FedAvgM without momentum):
    # global - lr * (global - mean) = [1 + 0.5*1.75, 2 + 0.5*2.5]
    state, _ = _aggregate("FedAvgM", server_learning_rate=0.5, server_momentum=0.0)
    assert _w(state) == [1.875, 3.25]


def test_fedavgm_momentum_step_by_hand():
    # Catches: momentum ignored (FedAvgM == FedAvg), momentum not kept between rounds.
    # Flower keeps the pseudo-gradient g = global - mean (the opposite of delta).
    rule = _rule("FedAvgM", server_learning_rate=1.0, server_momentum=0.9)
    s1 = _step(rule, GLOBAL)
    # Round 1: m = g = [-1.75, -2.5]; w = [1, 2] - m
    assert _w(s1) == [2.75, 4.5]
    momentum = rule.state_dict()["state"]["momentum_vector"]["value"]
    assert momentum[0].flatten().tolist() == [-1.75, -2.5]
    # Round 2: both clients send [3.75, 4.5], so g = [-1, 0];
    # m = 0.9 * [-1.75, -2.5] + [-1, 0] = [-2.575, -2.25]; w = [2.75, 4.5] - m = [5.325, 6.75].
    both = {**s1, W: torch.tensor([3.75, 4.5]).reshape(2, 1, 1, 1)}
    s2 = _step(rule, s1, clients=(both, both), round_=2)
    assert _w(s2) == pytest.approx([5.325, 6.75], abs=1e-6)
    # Plain FedAvg would stop at the clients' value.
    assert _w(s2) != pytest.approx([3.75, 4.5], abs=1e-3)


def _eta_norm(eta: float, b1: float, b2: float, server_round: int) -> float:
    """Flower's FedAdam step size: bias-corrected with exponent ``server_round + 1``."""
    return eta * math.sqrt(1 - b2 ** (server_round + 1)) / (1 - b1 ** (server_round + 1))


def test_fedadam_first_step_by_hand():
    # From m = 0, v = 0 (Flower's init): m = (1 - b1) delta, v = (1 - b2) delta^2,
    # w += eta_norm m / (sqrt(v) + tau), with eta 0.1, b1 0.9, b2 0.99, tau 1e-3.
    state, rule = _aggregate("FedAdam", eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    step = _eta_norm(0.1, 0.9, 0.99, 1)
    expected = []
    for w0, delta in ((1.0, 1.75), (2.0, 2.5)):
        m = 0.1 * delta
        v = 0.01 * delta**2
        expected.append(w0 + step * m / (math.sqrt(v) + 1e-3))
    assert _w(state) == pytest.approx(expected, rel=1e-6)
    saved = rule.state_dict()["state"]["v_t"]
    v = dict(zip(saved["keys"], saved["value"], strict=True))[W]
    assert v.flatten().tolist() == pytest.approx([0.01 * 1.75**2, 0.01 * 2.5**2], rel=1e-6)


# A server rule in mid-run: m = [0.5, -0.5], v = [4, 0.01] on 0.weight, and
# beta_2 = 0.5 so that v moves a lot. With delta^2 = [3.0625, 6.25], Yogi's
# sign(v - delta^2) is +1 for the first entry and -1 for the second, so Adam, Yogi and
# a sign-flipped Yogi (negative v in the second entry) all differ.
def _mid_run_step(class_name: str) -> list[float]:
    rule = _rule(class_name, eta=0.1, beta_1=0.9, beta_2=0.5, tau=1e-3)
    zeros = {k: np.zeros(GLOBAL[k].shape, np.float32) for k in (W, BN_W, BN_B)}
    rule.strategy.m_t = {**zeros, W: np.array([0.5, -0.5], np.float32).reshape(2, 1, 1, 1)}
    rule.strategy.v_t = {**zeros, W: np.array([4.0, 0.01], np.float32).reshape(2, 1, 1, 1)}
    return _w(_step(rule, GLOBAL, round_=3))


def _adaptive_expected(v_new: tuple[float, float], step: float) -> list[float]:
    out = []
    for w0, m0, delta, v in zip((1.0, 2.0), (0.5, -0.5), (1.75, 2.5), v_new, strict=True):
        m = 0.9 * m0 + 0.1 * delta
        out.append(w0 + step * m / (math.sqrt(v) + 1e-3))
    return out


def test_fedadam_step_from_a_mid_run_state_by_hand():
    # v = 0.5 v + 0.5 delta^2 = [0.5*4 + 0.5*3.0625, 0.5*0.01 + 0.5*6.25]; round 3's step.
    expected = _adaptive_expected((2.0 + 1.53125, 0.005 + 3.125), _eta_norm(0.1, 0.9, 0.5, 3))
    assert _mid_run_step("FedAdam") == pytest.approx(expected, rel=1e-6)


def test_fedyogi_step_from_a_mid_run_state_by_hand():
    # Catches: Yogi's sign flipped, Yogi computed as Adam. No bias correction in Flower's Yogi.
    # v = v - 0.5 delta^2 sign(v - delta^2) = [4 - 1.53125, 0.01 + 3.125]
    expected = _adaptive_expected((4.0 - 1.53125, 0.01 + 3.125), 0.1)
    got = _mid_run_step("FedYogi")
    assert got == pytest.approx(expected, rel=1e-6)
    assert got[0] != pytest.approx(_mid_run_step("FedAdam")[0], rel=1e-3)


def test_a_rule_that_declines_the_round_keeps_the_whole_global_state():
    # Bulyan needs 4 f + 3 replies: with two it returns no arrays (Flower keeps the model).
    state, rule = _aggregate("Bulyan", num_malicious_nodes=0)
    assert all(torch.equal(state[k], GLOBAL[k]) for k in GLOBAL)
    assert rule.skipped_rounds == [1]


def test_aggregate_leaves_its_inputs_alone():
    before = [{k: v.clone() for k, v in s.items()} for s in (GLOBAL, CLIENT_A, CLIENT_B)]
    _aggregate("FedAdam", eta=0.1)
    for old, new in zip(before, (GLOBAL, CLIENT_A, CLIENT_B), strict=True):
        assert all(torch.equal(old[k], new[k]) for k in old)
