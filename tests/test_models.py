import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedkws.core.models import (
    MODEL_NAMES,
    NORM_KINDS,
    MaxPool2d,
    bn_layers,
    bn_state_keys,
    build_model,
    count_parameters,
    group_count,
    is_bn_key,
    make_norm,
)

NUM_CLASSES = 12
NORM_TYPES = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)

# Small-width variants keep the all-models x all-norms sweep fast on CPU; the
# architecture is identical apart from channel counts.
SMALL = {
    "cnn": {},
    "res8": {},
    "res15": {"maps": 16},
    "resnet": {"width": 8},
    "resnet10": {"width": 8},
    "resnet18": {"width": 8},
    "resnet34": {"width": 8},
    "resnet50": {"width": 8},
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _batch(n=2, h=40, w=101):
    return torch.randn(n, 1, h, w)


def test_small_covers_every_model():
    assert set(SMALL) == set(MODEL_NAMES)


@pytest.mark.parametrize("norm", NORM_KINDS)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shape_train_and_eval(name, norm):
    model = build_model(name, NUM_CLASSES, norm=norm, **SMALL[name])
    x = _batch()
    model.train()
    assert model(x).shape == (2, NUM_CLASSES)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["cnn", "res8", "res15", "resnet10"])
def test_other_input_sizes(name):
    model = build_model(name, 5, **SMALL[name]).eval()
    with torch.no_grad():
        assert model(_batch(1, 32, 64)).shape == (1, 5)
        assert model(_batch(1, 64, 151)).shape == (1, 5)


def test_default_sizes_forward():
    for name in ("res8", "res15", "resnet10"):
        model = build_model(name, NUM_CLASSES).eval()
        with torch.no_grad():
            assert model(_batch(1)).shape == (1, NUM_CLASSES)


def test_param_counts():
    res15 = count_parameters(build_model("res15", NUM_CLASSES))
    assert abs(res15 - 238_000) <= 0.1 * 238_000
    res8 = count_parameters(build_model("res8", NUM_CLASSES))
    assert abs(res8 - 110_000) <= 0.1 * 110_000
    resnet34 = build_model("resnet34", NUM_CLASSES, width=64)
    assert abs(count_parameters(resnet34) - 21.3e6) <= 0.1 * 21.3e6
    assert count_parameters(build_model("resnet", NUM_CLASSES, depth=34)) == count_parameters(
        resnet34
    )


def test_resnet_depth_alias_and_width():
    r18 = count_parameters(build_model("resnet18", NUM_CLASSES, width=16))
    assert r18 == count_parameters(build_model("resnet", NUM_CLASSES, depth=18, width=16))
    assert count_parameters(build_model("resnet10", NUM_CLASSES, width=16)) < r18
    with pytest.raises(ValueError, match="depth"):
        build_model("resnet18", NUM_CLASSES, depth=34)
    with pytest.raises(ValueError, match="10, 18, 34, 50"):
        build_model("resnet", NUM_CLASSES, depth=101)


def test_norm_none_has_no_norm_modules():
    for name in MODEL_NAMES:
        model = build_model(name, NUM_CLASSES, norm="none", **SMALL[name])
        assert not any(isinstance(m, NORM_TYPES) for m in model.modules())
        assert not list(model.buffers())


@pytest.mark.parametrize("norm", ["group", "layer", "instance"])
def test_batch_free_norms_have_no_running_stats(norm):
    for name in MODEL_NAMES:
        model = build_model(name, NUM_CLASSES, norm=norm, **SMALL[name])
        assert not any(isinstance(m, _BatchNorm) for m in model.modules())
        assert not any("running_" in n for n, _ in model.named_buffers())
        assert bn_layers(model) == []
        assert bn_state_keys(model) == set()
        assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


def test_make_norm_kinds():
    bn = make_norm("batch", 16)
    assert isinstance(bn, nn.BatchNorm2d) and bn.affine and bn.track_running_stats
    gn = make_norm("group", 16, groups=8)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 8 and gn.affine
    assert make_norm("group", 45, groups=8).num_groups == 5
    assert make_norm("layer", 16).num_groups == 1
    assert make_norm("instance", 16).num_groups == 16
    assert isinstance(make_norm("none", 16), nn.Identity)


def test_group_count():
    assert group_count(64, 8) == 8
    assert group_count(45, 8) == 5
    assert group_count(7, 8) == 7
    assert group_count(13, 8) == 1
    assert group_count(4, 32) == 4


def test_unknown_model_and_norm_raise_with_options():
    with pytest.raises(ValueError) as err:
        build_model("vgg", NUM_CLASSES)
    assert all(n in str(err.value) for n in MODEL_NAMES)
    with pytest.raises(ValueError) as err:
        build_model("cnn", NUM_CLASSES, norm="weird")
    assert all(k in str(err.value) for k in NORM_KINDS)
    with pytest.raises(ValueError) as err:
        make_norm("weird", 8)
    assert all(k in str(err.value) for k in NORM_KINDS)


@pytest.mark.parametrize("name", ["cnn", "res8", "resnet18", "resnet50"])
def test_bn_state_keys_exact(name):
    model = build_model(name, NUM_CLASSES, norm="batch", **SMALL[name])
    keys = bn_state_keys(model)
    expected = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            for suffix in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                expected.add(f"{mod_name}.{suffix}")
    assert keys == expected
    assert keys <= set(model.state_dict())
    non_bn = set(model.state_dict()) - keys
    assert non_bn and not any("running_" in k or "num_batches" in k for k in non_bn)
    assert is_bn_key(next(iter(keys)), model)
    assert not is_bn_key(next(iter(non_bn)), model)


@pytest.mark.parametrize("name", ["cnn", "res8", "resnet10"])
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_gradient_step_changes_parameters(name, norm):
    model = build_model(name, NUM_CLASSES, norm=norm, **SMALL[name])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch(4), torch.randint(0, NUM_CLASSES, (4,))
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "classifier.weight" in changed
    assert len(changed) >= len(before) // 2


def test_batch_norm_updates_running_stats_only_in_train():
    model = build_model("res8", NUM_CLASSES)
    _, first = bn_layers(model)[0]
    model.eval()
    with torch.no_grad():
        model(_batch())
    assert int(first.num_batches_tracked) == 0
    model.train()
    model(_batch())
    assert int(first.num_batches_tracked) == 1


# The models' two pools: the ResNet stem's and the tutorial CNN's.
POOLS = [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2, ceil_mode=True)]


@pytest.mark.parametrize("pool", POOLS, ids=["stem", "cnn"])
@pytest.mark.parametrize("levels", [3, 1000], ids=["ties", "few_ties"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_max_pool_is_bitwise_torch_max_pool(pool, levels, layout):
    # Catches: a layout detour that changes a value, a gradient (ties broken at another
    # position of the window: with 3 levels most windows hold several maxima) or the
    # layout the next layer receives.
    torch.manual_seed(0)
    x = torch.randint(0, levels, (4, 6, 11, 13)).float().contiguous(memory_format=layout)
    mine, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = MaxPool2d(**pool)(mine), nn.functional.max_pool2d(ref, **pool)
    assert torch.equal(out, expected)
    assert out.is_contiguous(memory_format=layout)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(mine.grad, ref.grad)
    with torch.no_grad():
        assert torch.equal(MaxPool2d(**pool)(x), expected)


def test_models_pool_with_max_pool2d():
    # Catches: a model built with torch's pool, which misses the faster layout on CPU.
    for name in ("cnn", "resnet10"):
        pools = [m for m in build_model(name, NUM_CLASSES, **SMALL[name]).modules()
                 if isinstance(m, nn.MaxPool2d)]  # fmt: skip
        assert pools and all(type(m) is MaxPool2d for m in pools)
