"""BatchNorm statistics: per-layer input moments, exact pooling, layer-by-layer recalibration."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedkws.core.models import KWSCNN, BasicBlock, Bottleneck, ResNet, bn_layers
from fedkws.data.cache import CachedDataset
from fedkws.data.loader import iterate_batches, to_device

# (count, per-channel sum, per-channel sum of squares) of one layer's input on one holder
Moments = tuple[float, torch.Tensor, torch.Tensor]


class _StopForward(Exception):
    pass


def _segments(model: nn.Module) -> list[nn.Module] | None:
    """The model's trunk as modules applied one after the other, or None if unknown.

    Every BatchNorm lies in exactly one segment, and running the segments in
    order runs exactly the operations of ``model.forward`` up to the head, so a
    segment's input can be cached and the forward resumed from it.
    """
    if isinstance(model, ResNet):
        return [model.stem, *(block for stage in model.stages for block in stage)]
    if isinstance(model, KWSCNN):
        layers = list(model.features)
        return [nn.Sequential(*layers[:4]), nn.Sequential(*layers[4:])]
    return None


def _entry(segment: nn.Module, bn: nn.Module) -> nn.Module:
    """The part of ``segment`` that reaches ``bn`` from the segment's input.

    A residual block's projection BatchNorm sees only ``shortcut(x)``: running the
    projection alone gives it the same input without the block's main-branch convs.
    """
    shortcut = getattr(segment, "shortcut", None)
    if isinstance(shortcut, nn.Module) and any(m is bn for m in shortcut.modules()):
        return shortcut
    return segment


def _chain(segment: nn.Module) -> list[tuple[nn.Module, nn.Module]] | None:
    """A residual block's main branch as (conv, norm) pairs, or None for other segments.

    The input of ``norm[i + 1]`` is ``conv[i + 1](relu(norm[i](input of norm[i])))``:
    with the input of ``norm[i]`` cached, the next query runs one conv, not the
    branch from the block's input.
    """
    if isinstance(segment, BasicBlock):
        return [(segment.conv1, segment.norm1), (segment.conv2, segment.norm2)]
    if isinstance(segment, Bottleneck):
        return [(segment.conv1, segment.norm1), (segment.conv2, segment.norm2),
                (segment.conv3, segment.norm3)]  # fmt: skip
    return None


def _position(chain: list[tuple[nn.Module, nn.Module]] | None, bn: nn.Module) -> int | None:
    """The index of ``bn`` among the chain's norms, or None."""
    return next((i for i, (_, norm) in enumerate(chain or []) if norm is bn), None)


def _chain_key(block_key: str, chain: list[tuple[nn.Module, nn.Module]], i: int) -> str:
    """What the input of ``chain[i]``'s norm depends on: the block's input and what runs before."""
    convs = (t for conv, _ in chain[: i + 1] for t in conv.state_dict().values())
    norms = (t for _, norm in chain[:i] for t in norm.state_dict().values())
    return _digest(block_key, "chain", i, *convs, *norms)


def _digest(*parts: Any) -> str:
    h = hashlib.sha1()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:20]


class _Rows:
    """A float32 array of ``shape`` filled batch by batch, front to back.

    In memory, or streamed to a ``.npy`` file at ``path`` with plain writes: no
    memory map to synchronise (``msync`` wrote every cached input through to the
    disk, about a tenth of a recalibration's time). Other processes on this machine
    read the page cache; a shared file system shows the file once it is closed.
    """

    def __init__(self, shape: tuple[int, ...], path: Path | None = None) -> None:
        self.shape, self.filled, self.path = tuple(int(d) for d in shape), 0, path
        self.array = np.empty(self.shape, dtype=np.float32) if path is None else None
        self.file = None if path is None else open(path, "wb")  # noqa: SIM115 (closed by close)
        if self.file is not None:
            header = {"descr": "<f4", "fortran_order": False, "shape": self.shape}
            np.lib.format.write_array_header_1_0(self.file, header)

    def write(self, batch: np.ndarray) -> None:
        """Append ``batch`` (rows ``filled:filled + len(batch)``)."""
        batch = np.ascontiguousarray(batch, dtype="<f4")
        if self.array is not None:
            self.array[self.filled : self.filled + len(batch)] = batch
        else:
            self.file.write(batch.data)
        self.filled += len(batch)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def discard(self) -> None:
        """Close and delete what was written (an incomplete or failed entry)."""
        self.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class ActivationCache:
    """Segment inputs kept between the layer-by-layer moment queries of one holder.

    Layer-by-layer recalibration asks for the input moments of every BatchNorm
    in turn, each with the layers before it already recalibrated. Without a
    cache every query reruns the forward pass from the input: the cost grows
    with the square of the depth. With one, a query resumes from the input of
    the segment (stem, residual block, ...) that holds its layer; that input
    is written once, when the first layer of the segment is queried. Inside a
    residual block the input of the branch's last queried norm is kept too, so
    the next norm of the branch runs one conv, and the projection's norm runs
    the projection alone; the inputs of the branch's last norm and of the
    projection's norm give the block's output to the next block's query without
    its convs. The whole recalibration costs about one forward pass (the stem's
    convs twice) plus the cache's copies. The result is bitwise the same.

    Entries are keyed by the holder's rows and a digest of every tensor that
    the cached input depends on, so a stale entry is never used. ``folder``
    keeps them as ``.npy`` files (any process of the same holder can resume,
    as Ray actors do); ``None`` keeps them in memory. Only the newest entry
    per holder is kept (the branch norms' inputs are a holder of their own,
    ``<holder>-chain``, and so is the projection norm's, ``<holder>-shortcut``).
    Inputs larger than ``max_bytes`` are not cached (the query then reruns the
    forward pass from the nearest cached segment).
    """

    def __init__(self, folder: Path | str | None = None, max_bytes: int = 4 << 30) -> None:
        self.folder = None if folder is None else Path(folder)
        self.max_bytes = max_bytes
        self._memory: dict[str, tuple[str, np.ndarray]] = {}

    def get(self, holder: str, key: str) -> np.ndarray | None:
        """The cached array for ``holder`` under ``key``, if that is the one kept."""
        if self.folder is None:
            kept = self._memory.get(holder)
            return kept[1] if kept is not None and kept[0] == key else None
        path = self.folder / holder / f"{key}.npy"
        try:
            return np.load(path, mmap_mode="r") if path.is_file() else None
        except ValueError:  # cut short (a host that went down before its pages were written)
            return None

    def writer(self, holder: str, key: str, shape: tuple[int, ...]) -> _Rows | None:
        """Rows to fill, front to back, for ``holder``/``key``; :meth:`commit` them when full."""
        if int(np.prod(shape)) * 4 > self.max_bytes:
            return None
        if self.folder is None:
            return _Rows(shape)
        folder = self.folder / holder
        folder.mkdir(parents=True, exist_ok=True)
        return _Rows(shape, folder / f".{key}.{os.getpid()}.npy")

    def commit(self, holder: str, key: str, rows: _Rows) -> None:
        """Keep ``rows`` as the holder's entry; older entries of the holder are dropped."""
        if rows.filled != rows.shape[0]:
            rows.discard()
            raise ValueError(f"{rows.filled} of {rows.shape[0]} rows written: nothing to keep")
        rows.close()
        if self.folder is None:
            self._memory[holder] = (key, rows.array)
            return
        folder = self.folder / holder
        os.replace(folder / f".{key}.{os.getpid()}.npy", folder / f"{key}.npy")
        for old in folder.glob("*.npy"):
            # Scratch files (".<key>.<pid>.npy") may be another process's, still being written.
            if old.name != f"{key}.npy" and not old.name.startswith("."):
                old.unlink(missing_ok=True)

    def clear(self) -> None:
        """Drop every entry."""
        self._memory.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


# Examples converted to float64 at a time on a CPU (a whole batch at once: 4x slower there).
ACCUMULATE_EXAMPLES = 16


def _accumulate(acc: dict[str, Any], x: torch.Tensor) -> None:
    # Per-channel count, sum and sum of squares in float64, on x's device; on a CPU a few
    # examples at a time, so the float64 copy stays in its caches.
    dims = (0, *range(2, x.dim()))
    acc["n"] += float(x.numel() // x.shape[1])
    step = ACCUMULATE_EXAMPLES if x.device.type == "cpu" else max(x.shape[0], 1)
    for lo in range(0, x.shape[0], step):
        part = x[lo : lo + step].to(torch.float64)
        s, ss = part.sum(dims), part.square().sum(dims)
        acc["s"] = s if acc["s"] is None else acc["s"] + s
        acc["ss"] = ss if acc["ss"] is None else acc["ss"] + ss


@torch.no_grad()
def bn_input_moments(
    model: nn.Module,
    data: CachedDataset,
    rows: np.ndarray,
    layer: int,
    batch_size: int,
    cache: ActivationCache | None = None,
    device: torch.device | str = "cpu",
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Per-channel count, sum and sum of squares of the input of BatchNorm ``layer``.

    The model runs in eval mode, so the BatchNorm layers before ``layer``
    normalise with whatever running statistics they hold (the pooled ones, in
    layer-by-layer recalibration). The forward pass stops at ``layer``. With a
    ``cache`` it resumes from the newest valid cached segment input and caches
    the input of ``layer``'s segment (see :class:`ActivationCache`).

    Runs on ``device`` (where ``model`` is); the sums are accumulated there in
    float64 and returned as float64 CPU tensors, whatever the device.
    """
    name, bn = bn_layers(model)[layer]
    acc: dict[str, Any] = {"n": 0.0, "s": None, "ss": None}

    def grab(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        _accumulate(acc, inputs[0])
        raise _StopForward

    model.eval()
    rows = np.sort(rows)
    segments = _segments(model) if cache is not None else None
    handle = bn.register_forward_pre_hook(grab)
    try:
        if segments is None:
            for x, _ in iterate_batches(data, rows, batch_size, device=device):
                try:
                    model(x)
                except _StopForward:
                    pass
        else:
            _segment_pass(segments, bn, data, rows, batch_size, cache, device)
    finally:
        handle.remove()
    if acc["s"] is None:
        zeros = torch.zeros(bn.num_features, dtype=torch.float64)
        return 0.0, zeros, zeros.clone()
    return acc["n"], acc["s"].cpu(), acc["ss"].cpu()


def _segment_pass(
    segments: list[nn.Module],
    bn: nn.Module,
    data: CachedDataset,
    rows: np.ndarray,
    batch_size: int,
    cache: ActivationCache,
    device: torch.device | str = "cpu",
) -> None:
    """Run the segments up to ``bn`` (whose hook stops the pass), resuming from the cache.

    Cached inputs are float32 arrays on the host (memory or ``.npy``), moved to
    ``device`` one batch at a time. Inside a residual block the input of the
    branch's previous norm is kept too (its own slot, beside the block's input),
    so each norm of the branch costs one conv, and the block before the target's
    is built from its kept norm inputs (:func:`_block_output`).
    """
    target = next(k for k, seg in enumerate(segments) if any(m is bn for m in seg.modules()))
    holder = _digest(str(data.path), data.feature_key, rows)
    keys = [_digest(k, *(t for seg in segments[:k] for t in seg.state_dict().values()))
            for k in range(target + 1)]  # fmt: skip
    chain = _chain(segments[target])
    pos = _position(chain, bn)
    slot = _kept_slot(segments[target], bn, holder, keys[target], target == len(segments) - 1)
    if pos is not None and pos > 0:
        source = cache.get(_branch(holder), _chain_key(keys[target], chain, pos - 1))
        if source is not None:
            with _keeping_input(bn, cache, slot, len(rows)):
                _chain_step(chain, pos, bn, source, batch_size, device)
            return
    start = next((k for k in range(target, 0, -1) if cache.get(holder, keys[k]) is not None), 0)
    source = cache.get(holder, keys[start]) if start else None
    # The output of block ``start`` from its norms' kept inputs, without its convs.
    parts = _block_parts(segments[start], cache, holder, keys[start]) if start < target else None
    out: _Rows | None = None
    try:
        with _keeping_input(bn, cache, slot, len(rows)):
            for lo in range(0, len(rows), batch_size):
                x = _batch_input(data, rows, source, lo, batch_size, device)
                first = start
                if parts is not None:
                    x = _block_output(x, parts, lo, batch_size, device)
                    first += 1
                for seg in segments[first:target]:
                    x = seg(x)
                if start < target:
                    if out is None and lo == 0:
                        out = cache.writer(holder, keys[target], (len(rows), *x.shape[1:]))
                    if out is not None:
                        out.write(x.cpu().numpy())
                try:
                    _entry(segments[target], bn)(x)
                except _StopForward:
                    pass
    except BaseException:
        if out is not None:
            out.discard()  # a stopped or failed pass keeps nothing
        raise
    if out is not None:
        cache.commit(holder, keys[target], out)


def _batch_input(data, rows, source, lo: int, batch_size: int, device) -> torch.Tensor:
    """Rows ``lo:lo + batch_size`` of a segment's input: cached, or the features of ``rows``."""
    if source is not None:
        return _cached_batch(source, lo, batch_size, device)
    x, _ = next(iterate_batches(data, rows[lo : lo + batch_size], batch_size, device=device))
    return x


def _cached_batch(source: np.ndarray, lo: int, batch_size: int, device) -> torch.Tensor:
    """Rows ``lo:lo + batch_size`` of a cached input, as a tensor on ``device``."""
    return to_device(torch.from_numpy(np.array(source[lo : lo + batch_size])), device)


def _branch(holder: str) -> str:
    """The cache holder of a block's branch inputs (a slot beside the block's input)."""
    return holder + "-chain"


class _InputWriter:
    """A pre-hook on a norm that keeps its input, batch by batch (see :func:`_kept_slot`)."""

    def __init__(self, cache: ActivationCache, holder: str, key: str, n: int) -> None:
        self.cache, self.holder, self.key, self.n = cache, holder, key, n
        self.out: _Rows | None = None
        self.failed = False

    def __call__(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        if self.out is None and not self.failed:
            self.out = self.cache.writer(self.holder, self.key, (self.n, *x.shape[1:]))
            self.failed = self.out is None  # too large to keep: the next norm reruns the branch
        if self.out is not None:
            self.out.write(x.cpu().numpy())

    def commit(self) -> None:
        """Keep what was written, if the whole input was."""
        if self.out is not None and self.out.filled == self.n:
            self.cache.commit(self.holder, self.key, self.out)
        elif self.out is not None:
            self.out.discard()


def _shortcut(holder: str) -> str:
    """The cache holder of a block's projection-norm input (a slot of its own)."""
    return holder + "-shortcut"


def _projection_norm(segment: nn.Module) -> nn.Module | None:
    """The BatchNorm of a block's (conv, norm) projection shortcut, or None (identity, other)."""
    shortcut = getattr(segment, "shortcut", None)
    if (
        _chain(segment) is not None
        and isinstance(shortcut, nn.Sequential)
        and len(shortcut) == 2
        and isinstance(shortcut[1], nn.modules.batchnorm._BatchNorm)
    ):
        return shortcut[1]  # models._projection: (conv, norm)
    return None


def _shortcut_key(block_key: str, segment: nn.Module) -> str:
    """What the input of the projection's norm depends on: the block's input and its conv."""
    return _digest(block_key, "shortcut", *segment.shortcut[0].state_dict().values())


def _kept_slot(segment: nn.Module, bn: nn.Module, holder: str, block_key: str, final: bool):
    """Where a query of ``bn`` keeps ``bn``'s input: (holder, key), or None.

    Every norm of a residual block's branch (the next norm runs one conv from it; the last
    one's, with the projection norm's, gives the block's output without its convs), and
    the projection's norm; in the ``final`` segment only what its next norm reads (no
    block comes after it to need its output).
    """
    chain = _chain(segment)
    pos = _position(chain, bn)
    if pos is not None and not (final and pos == len(chain) - 1):
        return _branch(holder), _chain_key(block_key, chain, pos)
    if bn is _projection_norm(segment) and not final:
        return _shortcut(holder), _shortcut_key(block_key, segment)
    return None


def _block_parts(segment, cache, holder, block_key) -> tuple | None:
    """A block's last branch norm and projection norm with their kept inputs, if all kept.

    ``(last_norm, its input, projection_norm, its input)``; the projection's pair is
    ``(None, None)`` for an identity shortcut.
    """
    chain = _chain(segment)
    projection = _projection_norm(segment)
    identity = isinstance(getattr(segment, "shortcut", None), nn.Identity)
    if chain is None or (projection is None and not identity):  # unknown shortcut: rerun it
        return None
    last = cache.get(_branch(holder), _chain_key(block_key, chain, len(chain) - 1))
    if last is None:
        return None
    if projection is None:
        return chain[-1][1], last, None, None
    projected = cache.get(_shortcut(holder), _shortcut_key(block_key, segment))
    return None if projected is None else (chain[-1][1], last, projection, projected)


def _block_output(x, parts, lo, batch_size, device) -> torch.Tensor:
    """The block's output for rows ``lo:lo + batch_size`` (input ``x``), from ``parts``.

    The block's forward is ``relu(last_norm(last_conv(...)) + shortcut(x))``; the kept
    inputs (:func:`_block_parts`) are the outputs of ``last_conv`` and of the
    projection's conv, so only the norms, the sum and the ReLU run (the same operations
    on the same values: bitwise).
    """
    last_norm, last, projection, projected = parts
    y = last_norm(_cached_batch(last, lo, batch_size, device))
    if projection is None:
        return torch.relu(y + x)
    return torch.relu(y + projection(_cached_batch(projected, lo, batch_size, device)))


@contextmanager
def _keeping_input(bn, cache, slot, n) -> Iterator[None]:
    """While inside, keep ``bn``'s input in ``slot`` (see :func:`_kept_slot`), if any.

    Kept only when the pass inside completes (an error leaves the cache as it was).
    """
    if slot is None:
        yield
        return
    writer = _InputWriter(cache, *slot, n)
    handle = bn.register_forward_pre_hook(writer, prepend=True)  # before the moments' hook
    try:
        yield
    except BaseException:
        if writer.out is not None:
            writer.out.discard()
        raise
    finally:
        handle.remove()
    writer.commit()


def _chain_step(chain, pos, bn, source, batch_size, device) -> None:
    """The input of ``chain[pos]``'s norm from the cached input of the norm before it."""
    conv, (_, before) = chain[pos][0], chain[pos - 1]
    for lo in range(0, len(source), batch_size):
        try:
            bn(conv(torch.relu(before(_cached_batch(source, lo, batch_size, device)))))
        except _StopForward:
            pass


def pooled_statistics(
    moments: list[tuple[float, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and unbiased variance of the union, from per-part (n, sum, sum of squares).

    Unlike averaging per-client variances, this includes the spread of the
    client means around the global mean.
    """
    n = sum(m[0] for m in moments)
    if n < 2:
        raise ValueError("need at least two values per channel to estimate a variance")
    s = sum(m[1] for m in moments)
    ss = sum(m[2] for m in moments)
    mean = s / n
    var = (ss - n * mean * mean) / (n - 1)
    return mean, var.clamp_min(0.0)


def recalibrate(
    model: nn.Module,
    moments_of: Callable[[nn.Module, int], list[Moments]],
    record: list[list[Moments]] | None = None,
) -> nn.Module:
    """Set every BatchNorm's running statistics to the exact pooled ones, layer by layer.

    ``moments_of(model, layer)`` returns the (n, sum, sum of squares) of layer
    ``layer``'s input from each data holder, computed with the model as it is
    now, i.e. with the layers before ``layer`` already recalibrated. Returns a
    recalibrated copy; ``model`` itself is unchanged. Each layer's per-holder
    moments are appended to ``record`` when one is given.
    """
    twin = copy.deepcopy(model).eval()
    for layer, (_, bn) in enumerate(bn_layers(twin)):
        moments = moments_of(twin, layer)
        if record is not None:
            record.append(moments)
        mean, var = pooled_statistics(moments)
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
    return twin


def averaged_statistics(moments: list[Moments]) -> tuple[torch.Tensor, torch.Tensor]:
    """Example-weighted average of each holder's own mean and unbiased variance.

    What averaging the holders' freshly computed running statistics gives: the
    mean equals the pooled mean, the variance misses the spread of the holder
    means around it (:func:`pooled_statistics` includes it). Holders with fewer
    than two values are left out of the variance.
    """
    n = sum(m[0] for m in moments)
    mean = sum(m[1] for m in moments) / n
    var_weights = [m[0] for m in moments if m[0] >= 2]
    var = sum(m[0] * (m[2] - m[1] * m[1] / m[0]) / (m[0] - 1) for m in moments if m[0] >= 2) / sum(
        var_weights
    )
    return mean, var.clamp_min(0.0)


def averaged_twin(model: nn.Module, recorded: list[list[Moments]]) -> nn.Module:
    """A copy of ``model`` with :func:`averaged_statistics` of ``recorded`` in every BatchNorm.

    ``recorded`` holds the per-layer, per-holder moments that :func:`recalibrate` recorded.
    """
    twin = copy.deepcopy(model).eval()
    for (_, bn), moments in zip(bn_layers(twin), recorded, strict=True):
        mean, var = averaged_statistics(moments)
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
    return twin
