"""Layer-by-layer recalibration with cached segment inputs: the same numbers, less work."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from fedkws.core import bn as bn_module
from fedkws.core.bn import ActivationCache, bn_input_moments, recalibrate
from fedkws.core.models import bn_layers, build_model


@pytest.fixture(scope="module")
def tiny_data(data_dir, tiny_root):
    from fedkws.data.cache import DataConfig, prepare
    from fedkws.data.features import FeatureConfig

    return prepare(DataConfig(root=str(tiny_root)), FeatureConfig(), data_dir / "cache", False)


def _holders(data):
    rows = np.sort(data.split_indices("training"))
    return [rows[: len(rows) // 3], rows[len(rows) // 3 :]]


def _recorded(model, data, holders, cache):
    record: list = []
    twin = recalibrate(
        model,
        lambda net, layer: [bn_input_moments(net, data, h, layer, 16, cache) for h in holders],
        record=record,
    )
    return twin, record


def _assert_bitwise(a, b):
    assert len(a) == len(b)
    for layer_a, layer_b in zip(a, b, strict=True):
        for (na, sa, ssa), (nb, sb, ssb) in zip(layer_a, layer_b, strict=True):
            assert na == nb and torch.equal(sa, sb) and torch.equal(ssa, ssb)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("resnet", {"depth": 10, "width": 8}),
        ("cnn", {"channels": (8, 8)}),
        # bottleneck blocks: three norms per branch (a few rows: 53 layers without a cache)
        ("resnet", {"depth": 50, "width": 4, "rows": 40}),
    ],
)
@pytest.mark.parametrize("where", ["memory", "folder"])
def test_cached_moments_are_bitwise_those_of_the_full_prefix(
    tiny_data, tmp_path, name, kwargs, where
):
    # Catches: a cached input computed with stale statistics, a segment skipped or run
    # twice, rows or batches reordered between the cached and the resumed pass.
    torch.manual_seed(0)
    kwargs = dict(kwargs)
    rows = kwargs.pop("rows", None)
    model = build_model(name, 12, **kwargs)
    holders = [h[:rows] for h in _holders(tiny_data)]
    cache = ActivationCache(tmp_path / "act" if where == "folder" else None)
    _, plain = _recorded(model, tiny_data, holders, None)
    _, cached = _recorded(model, tiny_data, holders, cache)
    _assert_bitwise(plain, cached)


def test_cache_resumes_from_segments_instead_of_the_input(tiny_data, tmp_path, monkeypatch):
    # The point of the cache: later layers do not rerun the stem over the data.
    torch.manual_seed(0)
    model = build_model("resnet", 12, depth=10, width=8)
    holders = _holders(tiny_data)
    calls = {"stem": 0}
    model.stem.register_forward_pre_hook(lambda *_: calls.__setitem__("stem", calls["stem"] + 1))
    batches = sum(-(-len(h) // 16) for h in holders)
    _recorded(model, tiny_data, holders, None)
    plain_calls, calls["stem"] = calls["stem"], 0
    _recorded(model, tiny_data, holders, ActivationCache(tmp_path / "act"))
    layers = len(bn_layers(model))
    assert plain_calls == layers * batches
    # Layer 0 (inside the stem), then the one pass that caches the stem's output.
    assert calls["stem"] == 2 * batches


def test_a_projection_batchnorm_runs_only_the_projection(tiny_data, tmp_path):
    # Its input is shortcut(x) of the block's cached input: the block's 3x3 convs add nothing.
    torch.manual_seed(0)
    model = build_model("resnet", 12, depth=10, width=8)
    block = next(b for stage in model.stages for b in stage if len(list(b.shortcut.children())))
    layers = bn_layers(model)
    target = next(i for i, (_, bn) in enumerate(layers) if bn is block.shortcut[1])
    rows = _holders(tiny_data)[0]
    cache = ActivationCache(tmp_path / "act")
    for layer in range(target):  # the block's input is cached by then
        bn_input_moments(model, tiny_data, rows, layer, 16, cache)
    convs = {"main": 0, "projection": 0}
    block.conv1.register_forward_pre_hook(lambda *_: convs.__setitem__("main", convs["main"] + 1))
    block.shortcut[0].register_forward_pre_hook(
        lambda *_: convs.__setitem__("projection", convs["projection"] + 1)
    )
    got = bn_input_moments(model, tiny_data, rows, target, 16, cache)
    assert convs == {"main": 0, "projection": -(-len(rows) // 16)}
    want = bn_input_moments(model, tiny_data, rows, target, 16, None)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_a_branch_norm_runs_one_conv_from_the_previous_norms_input(tiny_data, tmp_path):
    # The second norm of a block's branch resumes from the first norm's cached input:
    # conv2 only, never conv1 again; the moments are those of the full prefix.
    torch.manual_seed(0)
    model = build_model("resnet", 12, depth=10, width=8)
    block = model.stages[1][0]
    layers = bn_layers(model)
    target = next(i for i, (_, bn) in enumerate(layers) if bn is block.norm2)
    rows = _holders(tiny_data)[0]
    cache = ActivationCache(tmp_path / "act")
    for layer in range(target):
        bn_input_moments(model, tiny_data, rows, layer, 16, cache)
    convs = {"conv1": 0, "conv2": 0}
    for name in convs:
        getattr(block, name).register_forward_pre_hook(
            lambda *_, n=name: convs.__setitem__(n, convs[n] + 1)
        )
    got = bn_input_moments(model, tiny_data, rows, target, 16, cache)
    assert convs == {"conv1": 0, "conv2": -(-len(rows) // 16)}
    # The block's own input is still kept beside it: the projection's norm comes next.
    convs.update(conv1=0, conv2=0)
    bn_input_moments(model, tiny_data, rows, target + 1, 16, cache)
    assert convs == {"conv1": 0, "conv2": 0}
    want = bn_input_moments(model, tiny_data, rows, target, 16, None)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_a_changed_model_never_reads_a_stale_entry(tiny_data, tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet", 12, depth=10, width=8)
    rows = _holders(tiny_data)[0]
    cache = ActivationCache(tmp_path / "act")
    last = len(bn_layers(model)) - 1
    for layer in range(last):  # fills the cache up to the last segment
        bn_input_moments(model, tiny_data, rows, layer, 16, cache)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.stem[0].weight.mul_(1.5)
    got = bn_input_moments(changed, tiny_data, rows, last, 16, cache)
    want = bn_input_moments(changed, tiny_data, rows, last, 16, None)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_clear_removes_the_files_and_size_limit_falls_back(tiny_data, tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet", 12, depth=10, width=8)
    rows = _holders(tiny_data)[0]
    cache = ActivationCache(tmp_path / "act")
    bn_input_moments(model, tiny_data, rows, 1, 16, cache)
    assert list((tmp_path / "act").rglob("*.npy"))
    cache.clear()
    assert not (tmp_path / "act").exists()
    tiny = ActivationCache(tmp_path / "small", max_bytes=1)
    got = bn_input_moments(model, tiny_data, rows, 3, 16, tiny)
    want = bn_input_moments(model, tiny_data, rows, 3, 16, None)
    assert torch.equal(got[1], want[1]) and not list((tmp_path / "small").rglob("*.npy"))


def test_models_without_segments_use_the_full_prefix(tiny_data, tmp_path):
    torch.manual_seed(0)
    model = build_model("res8", 12)
    assert bn_module._segments(model) is None
    holders = _holders(tiny_data)
    _, plain = _recorded(model, tiny_data, holders, None)
    _, cached = _recorded(model, tiny_data, holders, ActivationCache(tmp_path / "act"))
    _assert_bitwise(plain, cached)


def test_a_commit_keeps_another_processs_scratch_file(tmp_path):
    # Catches: a commit that deletes every other .npy of the holder, including the scratch
    # file another process is still filling (it would then fail to publish its entry).
    cache = ActivationCache(tmp_path)
    theirs = cache.writer("client0", "theirs", (2, 3))
    theirs.write(np.full((2, 3), 2.0))
    theirs.close()
    scratch = tmp_path / "client0" / ".theirs.0.npy"
    (tmp_path / "client0" / f".theirs.{os.getpid()}.npy").rename(scratch)
    ours = cache.writer("client0", "ours", (2, 3))
    ours.write(np.full((2, 3), 1.0))
    cache.commit("client0", "ours", ours)
    older = cache.writer("client0", "older", (1,))
    older.write(np.zeros(1))
    cache.commit("client0", "older", older)
    assert scratch.is_file()  # still being written elsewhere
    assert sorted(p.name for p in (tmp_path / "client0").glob("[!.]*.npy")) == ["older.npy"]
    assert cache.get("client0", "ours") is None and cache.get("client0", "older") is not None


@pytest.mark.parametrize("where", ["memory", "folder"])
def test_rows_written_in_batches_read_back_as_one_array(tmp_path, where):
    # Catches: batches stored out of order or in memory order instead of C order (the
    # channels_last inputs of model.channels_last are not C-contiguous), a header that
    # np.load reads as another shape or dtype, and an incomplete entry kept.
    cache = ActivationCache(tmp_path / "act" if where == "folder" else None)
    values = np.arange(5 * 3 * 2 * 4, dtype=np.float32).reshape(5, 3, 2, 4)
    channels_last = np.ascontiguousarray(values.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert not channels_last.flags.c_contiguous and np.array_equal(channels_last, values)
    rows = cache.writer("client0", "key", values.shape)
    for lo in (0, 2, 4):
        rows.write(channels_last[lo : lo + 2])
    cache.commit("client0", "key", rows)
    kept = cache.get("client0", "key")
    assert kept.dtype == np.float32 and kept.shape == values.shape
    assert np.array_equal(kept, values)
    partial = cache.writer("client0", "other", values.shape)
    partial.write(values[:2])
    with pytest.raises(ValueError, match="2 of 5 rows"):
        cache.commit("client0", "other", partial)
    assert np.array_equal(cache.get("client0", "key"), values)  # the complete entry stays
    if where == "folder":  # and the refused one leaves no file
        assert [p.name for p in (tmp_path / "act" / "client0").iterdir()] == ["key.npy"]


@pytest.mark.parametrize("which", ["projection", "first of a branch"])
def test_a_pass_that_fails_keeps_no_partial_entry(tiny_data, tmp_path, which):
    # Catches: a query stopped mid-pass (Ctrl-C, an error) leaving its half-written segment
    # or branch input behind as a file, and a file cut short (a host that went down before
    # writing its pages) read as an entry instead of a miss.
    torch.manual_seed(0)
    model = build_model("resnet", 12, depth=10, width=8)
    holder = _holders(tiny_data)[0][:40]
    cache = ActivationCache(tmp_path / "act")
    layers = bn_layers(model)
    names = [name for name, _ in layers]
    last = (
        len(layers) - 1
        if which == "projection"
        else max(i for i, name in enumerate(names) if name.endswith("norm1"))
    )
    calls = {"n": 0}

    def fail_on_second_batch(_module, _inputs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    handle = layers[last][1].register_forward_pre_hook(fail_on_second_batch, prepend=True)
    with pytest.raises(KeyboardInterrupt):
        bn_input_moments(model, tiny_data, holder, last, 16, cache)
    handle.remove()
    assert calls["n"] == 2
    assert not [p for p in (tmp_path / "act").rglob("*.npy")]
    n, s, ss = bn_input_moments(model, tiny_data, holder, last, 16, cache)  # then works
    assert n > 0 and [p for p in (tmp_path / "act").rglob("*.npy") if p.name.startswith(".")] == []
    kept = sorted((tmp_path / "act").rglob("*.npy"))
    assert kept
    with open(kept[0], "r+b") as f:
        f.truncate(200)  # header and a few values
    holder_dir = kept[0].parent.name
    assert cache.get(holder_dir, kept[0].stem) is None


@pytest.mark.parametrize("depth,rows", [(10, None), (50, 40)])
def test_each_block_conv_runs_once_per_batch(tiny_data, tmp_path, depth, rows):
    # Catches: a block's convs rerun to produce the next block's input (the block's
    # output is its last norm's and its projection norm's kept inputs, normalised,
    # summed and rectified), and a kept input that is never used.
    torch.manual_seed(0)
    model = build_model("resnet", 12, depth=depth, width=4 if depth == 50 else 8)
    holders = [h[:rows] for h in _holders(tiny_data)]
    batches = sum(-(-len(h) // 16) for h in holders)
    calls: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_pre_hook(
                lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1)
            )
    _recorded(model, tiny_data, holders, ActivationCache(tmp_path / "act"))
    stem = {n for n in calls if n.startswith("stem")}
    assert stem and all(calls[n] == 2 * batches for n in stem)  # its norm, then block 1's input
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert {n: c for n, c in calls.items() if n not in stem} == {
        n: batches for n in convs if n not in stem
    }


def test_the_final_blocks_output_is_not_kept(tiny_data, tmp_path, monkeypatch):
    # Catches: the last block's last norm input and projection input written (as large as
    # its output) although no block comes after it to read them.
    from fedkws.data.loader import iterate_batches

    torch.manual_seed(0)
    model = build_model("resnet", 12, depth=10, width=8).eval()
    holders = [h[:40] for h in _holders(tiny_data)]
    final = model.stages[-1][-1]
    assert isinstance(final.shortcut, torch.nn.Sequential)  # a projection block: both slots
    shapes: list = []
    hook = final.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:])))
    with torch.no_grad():
        model(next(iterate_batches(tiny_data, holders[0][:2], 2))[0])
    hook.remove()
    kept: list[tuple[str, tuple[int, ...]]] = []
    commit = ActivationCache.commit

    def recording(self, holder, key, rows):
        kept.append((holder.rsplit("-", 1)[-1] if "-" in holder else "segment", rows.shape[1:]))
        return commit(self, holder, key, rows)

    monkeypatch.setattr(ActivationCache, "commit", recording)
    _recorded(model, tiny_data, holders, ActivationCache(tmp_path / "act"))
    counts = {
        slot: sum(s == shapes[0] for k, s in kept if k == slot) for slot in ("chain", "shortcut")
    }
    # Per holder, its norm1's input only (norm2's one-conv step reads it): no norm2 input,
    # no projection input.
    assert counts == {"chain": len(holders), "shortcut": 0}, kept
