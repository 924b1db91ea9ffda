"""Randomness and noise shared by the speaker, utterance and background generators."""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

from fedkws.data.audio import SAMPLE_RATE


def keyed_rng(*key: int | str) -> np.random.Generator:
    """A generator keyed by a tuple, independent of any iteration order."""
    entropy = [k if isinstance(k, int) else _str_key(k) for k in key]
    return np.random.default_rng(np.random.SeedSequence(entropy))


@lru_cache(maxsize=None)
def _str_key(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def coloured_noise(rng: np.random.Generator, n: int, tilt: float) -> np.ndarray:
    """Gaussian noise with power spectrum ~ f**(-tilt), unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, d=1.0 / SAMPLE_RATE)
    freqs[0] = freqs[1]
    spectrum *= freqs ** (-tilt / 2.0)
    noise = np.fft.irfft(spectrum, n)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)
