"""Model states to and from Flower's ``ArrayRecord``, byte for byte as Flower does it.

Flower stores every array of a message as the bytes of ``np.save``: a header
(format version, dtype, order, shape) and the raw data. Its own conversions
write each header with ``np.save`` and read it back with ``np.load``, which
parses the header's text with ``ast.literal_eval``: about 50 µs per array, so
that a model of 60 tensors costs milliseconds per message, and a recalibration
sends one message per BatchNorm layer to every client.

The two functions here produce and read the very same bytes, but remember
each distinct header (a model has a few dozen shapes): a known array costs a
header lookup and one copy of its data. Anything unusual (a header of another
format version, an object or structured dtype, a layout ``np.save`` would
write in Fortran order) takes Flower's own path, so the bytes never depend on
which path ran.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

_MAGIC = b"\x93NUMPY"
_NUMPY = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY
_MAX_HEADERS = 4096  # distinct (dtype, shape) pairs remembered; then forgotten and relearnt

# header bytes -> (dtype, shape, Fortran order) for reading; (dtype, shape) -> header bytes
_read_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}
_write_headers: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _remember(table: dict, key, value) -> None:
    if len(table) >= _MAX_HEADERS:
        table.clear()
    table[key] = value


def encode(array: np.ndarray) -> Array:
    """``Array.from_numpy_ndarray(array)``: the same fields and bytes, header reused."""
    if array.dtype.hasobject or array.dtype.kind == "V":  # structured: one dtype.str for many
        return Array.from_numpy_ndarray(array)
    if not array.flags.c_contiguous:
        if array.flags.f_contiguous:  # np.save writes it in Fortran order
            return Array.from_numpy_ndarray(array)
        array = np.ascontiguousarray(array)  # np.save writes the C order too (channels_last)
    key = (array.dtype.str, array.shape)
    header = _write_headers.get(key)
    if header is None:
        full = Array.from_numpy_ndarray(array)
        _remember(_write_headers, key, full.data[: len(full.data) - array.nbytes])
        return full
    return Array(
        dtype=str(array.dtype), shape=tuple(array.shape), stype=_NUMPY,
        data=header + array.tobytes(),
    )  # fmt: skip


def decode(array: Array) -> np.ndarray:
    """``array.numpy()``: the same values, dtype, shape and a writable copy."""
    data = array.data
    if array.stype != _NUMPY or len(data) < 10 or data[:8] != _MAGIC + b"\x01\x00":
        return array.numpy()  # not a version 1.0 .npy header: Flower's own reader
    end = 10 + int.from_bytes(data[8:10], "little")
    header = bytes(data[:end])
    known = _read_headers.get(header)
    if known is None:
        buffer = io.BytesIO(header)
        np.lib.format.read_magic(buffer)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(buffer)
        if dtype.hasobject or dtype.kind == "V":
            return array.numpy()
        known = (dtype, shape, fortran)
        _remember(_read_headers, header, known)
    dtype, shape, fortran = known
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - end != count * dtype.itemsize:
        return array.numpy()  # truncated or padded: let numpy say what is wrong
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``ArrayRecord(torch_state_dict=state)``, with :func:`encode`."""
    record = ArrayRecord()
    for key, tensor in state.items():
        record[key] = encode(tensor.detach().cpu().numpy())
    return record


def to_state(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """``record.to_torch_state_dict()``, with :func:`decode`."""
    return OrderedDict((key, torch.from_numpy(decode(array))) for key, array in record.items())
