"""``model.channels_last``: the same network in another memory layout.

The layout changes the order of floating-point sums only, so a channels-last model
computes what the default one computes up to rounding, trains through a federation
and keeps its exact recalibration (tests/test_oracles.py runs the oracle on it too).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedkws.core.models import ChannelsFirstGroupNorm, build_model
from fedkws.errors import user_errors
from fedkws.run import run
from fedkws.spec import from_config
from helpers import SMALL_FEDERATION, compose_cfg, error_lines

CL = torch.channels_last


SIZES = {"cnn": {"channels": (8, 8)}, "res8": {"maps": 16}, "resnet10": {"width": 8}}


def _pair(name: str, norm: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    default = build_model(name, 12, norm=norm, **SIZES[name])
    torch.manual_seed(0)
    return default, build_model(name, 12, norm=norm, channels_last=True, **SIZES[name])


@pytest.mark.parametrize("norm", ["batch", "group", "layer", "ws"])
@pytest.mark.parametrize("name", ["cnn", "res8", "resnet10"])
def test_channels_last_is_the_same_network_in_another_layout(name, norm):
    # Catches: a layout that reorders the weights' values (not only their strides),
    # or a model left channels first.
    default, last = _pair(name, norm)
    a, b = default.state_dict(), last.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    weights = [p for p in last.parameters() if p.dim() == 4 and p[0].numel() > p.shape[1] > 1]
    assert weights and all(p.is_contiguous(memory_format=CL) for p in weights)
    assert not any(p.is_contiguous() for p in weights)
    x = torch.randn(6, 1, 40, 101, generator=torch.Generator().manual_seed(1))
    for mode in ("train", "eval"):
        default.train(mode == "train")
        last.train(mode == "train")
        with torch.no_grad():
            torch.testing.assert_close(last(x), default(x), rtol=1e-4, atol=1e-5)


def test_channels_first_group_norm_is_group_norm(monkeypatch):
    # Catches: the channels-first copy changing what GroupNorm computes, or left out of
    # training (torch's channels-last GroupNorm backward is several times slower on CPU).
    seen: list[bool] = []
    group_norm = nn.functional.group_norm

    def recording(x, *args, **kwargs):
        seen.append(x.is_contiguous())
        return group_norm(x, *args, **kwargs)

    monkeypatch.setattr(nn.functional, "group_norm", recording)
    torch.manual_seed(0)
    ours, ref = ChannelsFirstGroupNorm(4, 8), nn.GroupNorm(4, 8)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(8))
        ours.bias.copy_(torch.randn(8))
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 8, 5, 7)
    assert torch.equal(ours(x), ref(x))  # channels-first input: exactly nn.GroupNorm
    x_last = x.contiguous(memory_format=CL).requires_grad_()
    x_ref = x.clone().requires_grad_()
    seen.clear()
    out = ours(x_last)
    assert seen == [True]  # normalised channels first
    torch.testing.assert_close(out, ref(x_ref))
    assert out.is_contiguous(memory_format=CL)  # the next conv reads its weights' layout
    out.square().sum().backward()
    ref(x_ref).square().sum().backward()
    torch.testing.assert_close(x_last.grad, x_ref.grad)


def test_channels_first_group_norm_evaluates_channels_last_in_place():
    # Catches: evaluation paying the channels-first copies (the study CNN's eval pass with
    # GroupNorm about 1.6x slower, benchmarks/layout.py), or the training path's copy used
    # where nothing records.
    torch.manual_seed(0)
    ours, ref = ChannelsFirstGroupNorm(4, 8), nn.GroupNorm(4, 8)
    ref.load_state_dict(ours.state_dict())
    x_last = torch.randn(3, 8, 5, 7).contiguous(memory_format=CL)
    with torch.no_grad():
        out = ours(x_last)
        assert torch.equal(out, ref(x_last))  # torch's own channels-last kernel
        assert out.is_contiguous(memory_format=CL)
        torch.testing.assert_close(out, ref(x_last.contiguous()))


def test_a_channels_last_federation_trains_as_the_default_layout(make_cfg, tmp_path):
    # Catches: clients that never see the layout (their training would then be bitwise
    # the default's), or a layout that breaks on the way back (state dicts with
    # channels-last strides through the wire, the aggregation, the recalibration).
    overrides = [
        # SGD, not AdamW: Adam's update divides by the gradient's own scale, so rounding
        # in tiny gradients moves the weights by up to the learning rate.
        *SMALL_FEDERATION, "model.width=8", "optimizer=sgd", "federation.backend=inprocess",
        "train.rounds=1",
        "train.local_epochs=1", "bn=full", "bn.eval_modes=[eval,recalibrated]",
    ]  # fmt: skip
    results = {}
    for layout in ("false", "true"):
        cfg = make_cfg([*overrides, f"model.channels_last={layout}"])
        results[layout] = run(cfg, tmp_path / layout).rounds[-1].metrics
    default, last = results["false"], results["true"]
    assert last["train/loss"] != default["train/loss"]  # the clients trained channels last
    # Rounding differences grow through the steps and BatchNorm's batch statistics:
    # observed up to 0.2 % after this round (a broken layout is off by far more).
    for key in ("train/loss", "val/eval/loss", "val/recalibrated/loss"):
        assert abs(last[key] - default[key]) <= 1e-2 * abs(default[key]), key


def test_channels_last_must_be_a_boolean(tmp_path, capsys):
    cfg = compose_cfg(["model.channels_last=yes"], tmp_path / "data")
    with pytest.raises(SystemExit), user_errors():
        from_config(cfg)
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "model.channels_last='yes': must be true or false" in lines[0]


def test_a_checkpoint_from_before_the_option_resumes_with_the_default_layout():
    # Catches: a run saved before model.channels_last existed refused on resume
    # although it ran with the default layout (and a real layout change let through).
    from fedkws.recipes.common import _differences, _with_implied_keys

    old = {"model": {"name": "cnn", "channels": [8, 8]}, "seed": 0}
    for layout, expected in ((False, []), (True, ["model.channels_last"])):
        new = {"model": {"name": "cnn", "channels": [8, 8], "channels_last": layout}, "seed": 0}
        assert _differences(_with_implied_keys(old, new), new) == expected
    assert _differences(old, {**old, "model": {**old["model"], "channels_last": False}})
    assert "channels_last" not in old["model"]  # the checkpoint's config is left alone
    # bn.freeze_stats: implied for a FixBN run (its bn config has it), not for the others.
    full = {"bn": {"sync": "full"}, "seed": 0}
    assert _differences(_with_implied_keys(full, full), full) == []
    fixbn = {"bn": {"sync": "fixbn", "freeze_after": 2}}
    for stats, expected in (("exact", []), ("aggregated", ["bn.freeze_stats"])):
        new = {"bn": {**fixbn["bn"], "freeze_stats": stats}}
        assert _differences(_with_implied_keys(fixbn, new), new) == expected
