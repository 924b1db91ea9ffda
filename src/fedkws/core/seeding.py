"""Named random streams: every random choice of a run comes from one of these.

A stream is a pure function of the run's seed and a few integers (round,
client), so a resumed run draws exactly what an uninterrupted one would, and
no stream depends on how many numbers another one consumed.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    """Tags that keep the streams of one seed apart (values fixed: changing one changes results)."""

    MODEL_INIT = 0x1E17  # initial global model weights
    CLIENT_SAMPLING = 0x5A3  # which clients train in a round
    CENTRAL_TRAINING = 0xCE47  # batch order and augmentation of the centralised baseline
    LOCAL_TEST_SPLIT = 0x5EED  # which of a client's rows form its local test split
    EVALUATION_ORDER = 0xE7A1  # the shuffled order of every evaluation (same for every arm)


def stream_seed(*parts: int) -> int:
    """A 63-bit seed for one (seed, round, client, ...) stream, independent of the others."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def make_generator(*parts: int) -> torch.Generator:
    """A ``torch.Generator`` for one stream; also seeds torch's global RNG (dropout)."""
    seed = stream_seed(*parts)
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def seed_model_init(seed: int) -> None:
    """Seed torch's global RNG so the next model built has the run's initial weights."""
    torch.manual_seed(stream_seed(seed, Stream.MODEL_INIT))


def sampling_rng(seed: int, round_: int) -> np.random.Generator:
    """The stream that picks the clients of ``round_``."""
    return np.random.default_rng(stream_seed(seed, round_, Stream.CLIENT_SAMPLING))


def evaluation_rng(seed: int) -> np.random.Generator:
    """The stream that orders evaluation examples (a fresh generator per call: same order)."""
    return np.random.default_rng(stream_seed(seed, Stream.EVALUATION_ORDER))


def client_training_generator(seed: int, round_: int, pid: int) -> torch.Generator:
    """Batch order and augmentation of client ``pid`` in ``round_``."""
    return make_generator(seed, round_, pid)


def central_training_generator(seed: int, round_: int) -> torch.Generator:
    """Batch order and augmentation of the centralised baseline in ``round_``."""
    return make_generator(seed, round_, Stream.CENTRAL_TRAINING)
