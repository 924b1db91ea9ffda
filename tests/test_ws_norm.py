"""``norm=ws``: normalisation-free models with weight-standardised convolutions (FedWon).

The convolution is checked against a kernel standardised by hand and
``F.conv2d``; every model family against its module tree (every convolution
standardised, projection shortcuts included, no norm layer, no buffers); the
config against the rules of the other norms without BatchNorm.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedkws.core.models import MODEL_NAMES, WSConv2d, bn_layers, build_model, make_norm
from fedkws.errors import user_errors
from fedkws.recipes.common import final_modes
from fedkws.run import run
from fedkws.spec import from_config
from helpers import CHANCE, SMALL_FEDERATION, compose_cfg, error_lines

NUM_CLASSES = 12
NORM_TYPES = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
SMALL = {
    "cnn": {"channels": (8, 8)},
    "res8": {"maps": 8},
    "res15": {"maps": 8},
    "resnet": {"width": 8},
    "resnet10": {"width": 8},
    "resnet18": {"width": 8},
    "resnet34": {"width": 8},
    "resnet50": {"width": 8},
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _by_hand(conv: nn.Conv2d, x: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    """Standardise each output channel's kernel in float64, scale it, convolve."""
    w = conv.weight.detach().double()
    out_channels = w.shape[0]
    flat = w.reshape(out_channels, -1)
    fan_in = flat.shape[1]
    mean = flat.sum(dim=1) / fan_in
    var = ((flat - mean[:, None]) ** 2).sum(dim=1) / fan_in
    standard = (flat - mean[:, None]) / torch.sqrt(var[:, None] + eps)
    gain = conv.gain.detach().double().reshape(out_channels, 1)
    kernel = (gain * gamma / math.sqrt(fan_in) * standard).reshape(w.shape)
    bias = None if conv.bias is None else conv.bias.detach().double()
    return F.conv2d(
        x.double(), kernel, bias, conv.stride, conv.padding, conv.dilation, conv.groups
    ).float()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "padding": 1, "bias": True},
        {"kernel_size": (4, 10), "padding": (2, 5), "bias": False},
        {"kernel_size": 3, "stride": 2, "dilation": 2, "padding": 2, "groups": 2, "bias": True},
        {"kernel_size": 1, "stride": 2, "bias": False},
    ],
)
def test_ws_conv_equals_a_kernel_standardised_by_hand(kwargs):
    conv = WSConv2d(4, 6, **kwargs)
    with torch.no_grad():  # a kernel far from zero mean / unit scale, gains away from 1
        conv.weight.mul_(7.0).add_(3.0)
        conv.gain.copy_(torch.rand(6, 1, 1, 1) + 0.5)
    x = torch.randn(3, 4, 12, 17)
    want = _by_hand(conv, x, conv.gamma, conv.eps)
    assert torch.allclose(conv(x), want, atol=1e-5, rtol=1e-4)
    # The same output in train and eval mode; the stored weight is left as it is.
    stored = conv.weight.detach().clone()
    assert torch.equal(conv.eval()(x), conv.train()(x))
    assert torch.equal(conv.weight, stored)


def test_standardised_kernel_is_zero_mean_unit_variance_per_output_channel():
    conv = WSConv2d(5, 7, 3, bias=False)
    with torch.no_grad():
        conv.weight.mul_(11.0).sub_(2.0)
    kernel = conv.standardized_weight().detach().double().reshape(7, -1)
    fan_in = kernel.shape[1]
    unscaled = kernel * math.sqrt(fan_in) / conv.gamma
    assert torch.allclose(unscaled.mean(dim=1), torch.zeros(7, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(unscaled.var(dim=1, unbiased=False), torch.ones(7, dtype=torch.float64),
                          atol=1e-4)  # fmt: skip


def test_the_fixed_gain_gives_relu_outputs_unit_variance():
    # Monte Carlo, not the closed form: Var(gamma * relu(z)) = 1 for z ~ N(0, 1).
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert float((WSConv2d(1, 1, 1).gamma * torch.relu(z)).var()) == pytest.approx(1.0, abs=5e-3)


def test_gradients_reach_weight_gain_and_bias():
    conv = WSConv2d(3, 4, 3, padding=1, bias=True)
    conv(torch.randn(2, 3, 8, 8)).pow(2).sum().backward()
    for p in (conv.weight, conv.gain, conv.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_conv_of_every_model_is_standardised_and_there_is_no_norm(name):
    model = build_model(name, NUM_CLASSES, norm="ws", **SMALL[name])
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    reference = build_model(name, NUM_CLASSES, norm="batch", **SMALL[name])
    # The same convolutions as the BatchNorm model, by name: none left plain.
    assert set(convs) == {n for n, m in reference.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs and all(type(m) is WSConv2d for m in convs.values())
    # Without a norm after it, every convolution has its own offset.
    assert all(m.bias is not None for m in convs.values())
    assert not any(isinstance(m, NORM_TYPES) for m in model.modules())
    assert not list(model.buffers()) and bn_layers(model) == []
    if name.startswith("resnet"):  # projection shortcuts are standardised as well
        assert any(".shortcut.0" in n for n in convs)


def test_ws_is_not_norm_none():
    assert isinstance(make_norm("ws", 8), nn.Identity)
    plain = build_model("res8", NUM_CLASSES, norm="none", maps=8)
    assert not any(isinstance(m, WSConv2d) for m in plain.modules())
    ws = build_model("res8", NUM_CLASSES, norm="ws", maps=8)
    ws.load_state_dict(plain.state_dict(), strict=False)  # same weights, the gains at 1
    x = torch.randn(2, 1, 40, 101)
    assert not torch.allclose(ws(x), plain(x))


def test_outputs_do_not_depend_on_the_batch():
    model = build_model("resnet10", NUM_CLASSES, norm="ws", width=8).train()
    x = torch.randn(6, 1, 40, 101)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(6)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_ws_has_no_batchnorm_to_handle(tmp_path, capsys):
    # As for norm=group/none: no recalibration, and FedBN/SiloBN refused.
    spec = from_config(compose_cfg(["norm=ws"], tmp_path / "data"))
    assert spec.model.norm == "ws"
    model = build_model(**spec.model.build_args(NUM_CLASSES))
    assert "recalibrated" not in final_modes(spec, model)
    for sync, method in (("local", "FedBN"), ("silo", "SiloBN")):
        cfg = compose_cfg(["norm=ws", f"bn={sync}"], tmp_path / "data")
        with pytest.raises(SystemExit), user_errors():
            from_config(cfg)
        (line,) = error_lines(capsys.readouterr().err)
        assert f"{method} needs a model with BatchNorm (norm=batch, not ws)" in line


def test_ws_trains_end_to_end_through_flower(make_cfg, tmp_path):
    # Catches: a norm kind the federated path cannot build, ship or evaluate.
    cfg = make_cfg([*SMALL_FEDERATION, "federation.backend=inprocess", "norm=ws",
                    "model.width=8", "optimizer.lr=1e-3", "train.rounds=2"])  # fmt: skip
    result = run(cfg, tmp_path / "run")
    assert result.summary["complete"] and result.summary["norm"] == "ws"
    first, last = (r.metrics for r in result.rounds)
    assert last["train/acc"] > max(first["train/acc"], 3 * CHANCE)
    # Nothing to recalibrate: the final evaluation has eval and train mode only.
    assert {"test/eval/acc", "test/train/acc"} <= set(result.summary)
    assert not any("recalibrated" in k or "fresh_average" in k for k in result.summary)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert any(k.endswith(".gain") for k in state) and not any("running" in k for k in state)
