"""fedkws's ArrayRecord codec writes and reads exactly what Flower's own conversions do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedkws.core.models import build_model
from fedkws.fl import arrays

ARRAYS = {
    "float32": np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
    "float64": np.linspace(-1, 1, 10),
    "int64 counter": np.array(17, dtype=np.int64),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "bool": np.array([True, False, True]),
    "big-endian": np.arange(6, dtype=">f4"),
    "fortran order": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    "strided": np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2],
    "channels last": torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last).numpy(),
    "structured a": np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")]),
    "structured b": np.zeros(3, dtype=[("x", "<i8")]),  # the same dtype.str, |V8, as a
}


@pytest.mark.parametrize("name", list(ARRAYS))
def test_bytes_and_values_are_flowers(name):
    # Catches: a remembered header reused for another dtype, shape or order (the second
    # call of a C-ordered or strided case takes the remembered path; structured dtypes,
    # which share one dtype.str, never do), and a decoded copy that differs in dtype,
    # shape or values from np.load's, or aliases the message's bytes.
    value = ARRAYS[name]
    for _ in range(2):
        ours, flowers = arrays.encode(value), Array.from_numpy_ndarray(value)
        assert (ours.data, ours.dtype, ours.shape, ours.stype) == (
            flowers.data, flowers.dtype, flowers.shape, flowers.stype,
        )  # fmt: skip
        decoded, expected = arrays.decode(flowers), flowers.numpy()
        assert decoded.dtype == expected.dtype and decoded.shape == expected.shape
        assert np.array_equal(decoded, expected)
        assert decoded.flags.writeable and not np.shares_memory(decoded, np.frombuffer(
            flowers.data, dtype=np.uint8))  # fmt: skip


def test_a_model_state_round_trips_as_through_flower():
    # Catches: keys reordered or lost, int64 counters turned into floats, tensors
    # still on a device or attached to autograd in the record.
    state = build_model("resnet10", 12, width=8).state_dict()
    ours, flowers = arrays.to_record(state), ArrayRecord(torch_state_dict=state)
    assert list(ours) == list(flowers) == list(state)
    assert all(ours[k].data == flowers[k].data for k in state)
    back = arrays.to_state(flowers)
    assert list(back) == list(state)
    for key, tensor in state.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def test_a_damaged_array_is_read_by_numpy_and_refused():
    # Catches: a truncated array decoded into a shorter or zero-padded one instead of an error.
    good = Array.from_numpy_ndarray(np.arange(8, dtype=np.float32))
    arrays.decode(good)  # its header is now remembered
    cut = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-4])
    with pytest.raises(ValueError):
        arrays.decode(cut)


def test_structured_dtypes_of_one_size_keep_their_own_fields():
    # Catches: the header remembered for one structured dtype written for another of the
    # same size (both are |V8 to dtype.str), which Flower would read as the first.
    first = np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")])
    second = np.zeros(3, dtype=[("x", "<i8")])
    for value in (first, second, first):
        assert arrays.encode(value).data == Array.from_numpy_ndarray(value).data
