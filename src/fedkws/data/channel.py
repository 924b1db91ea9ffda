"""Feature-shift clients: each client records through its own channel.

FedBN (Li et al. 2021) and SiloBN (Andreux et al. 2020) are claimed to win
when clients differ in their *inputs* (scanner, microphone, room), not in
their labels. ``partition.channels=K`` gives every client one of ``K``
recording channels on top of any label partition: client ``k`` hears every
clip through channel ``k mod K``. A channel is a fixed, seeded chain of

- equalisation: a smooth random gain curve over frequency (about +/- 12 dB),
- gain: -12 to +6 dB,
- a noise floor: white noise at -60 to -35 dB relative to full scale,
- reverberation: exponentially decaying noise, RT60 up to 0.5 s (half the
  channels are dry),

applied to the waveform, after which the features are recomputed. Rows that
no client holds (the validation and test splits) go through the channel of
a speaker-seeded choice, so the shared splits mix every channel, as a new
user population would. The shifted waveforms and features are a variant of
the cache entry (``waves@<key>.npy``, ``features-<fkey>@<key>.npy``), built
once per channel assignment and opened by the clients like any entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from fedkws.data.audio import SAMPLE_RATE
from fedkws.data.features import FeatureConfig, FeatureExtractor

log = logging.getLogger(__name__)

VARIANT_SEPARATOR = "@"
_CHANNEL_SEED = 20_240_601  # the channel families are the same for every run and seed
_VERSION = 1  # part of every variant's name: a changed channel model never reuses old files


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([_CHANNEL_SEED, *parts])


def channel_response(channel: int, num_samples: int) -> dict[str, np.ndarray | float]:
    """The fixed parameters of one channel: EQ curve, gain, noise level, impulse response."""
    rng = _rng(channel)
    bins = num_samples // 2 + 1
    # Smooth EQ: a few random control points over log frequency, interpolated (dB).
    freqs = np.linspace(0, SAMPLE_RATE / 2, bins)
    points = np.geomspace(50, SAMPLE_RATE / 2, 6)
    curve_db = np.interp(np.log(np.maximum(freqs, 50)), np.log(points), rng.uniform(-12, 12, 6))
    rt60 = 0.0 if channel % 2 == 0 else float(rng.uniform(0.15, 0.5))
    length = int(rt60 * SAMPLE_RATE)
    impulse = np.zeros(max(length, 1))
    impulse[0] = 1.0
    if length > 1:
        t = np.arange(length) / SAMPLE_RATE
        tail = rng.standard_normal(length) * np.exp(-6.9 * t / rt60) * 0.3
        impulse[1:] += tail[1:]
        impulse /= np.sqrt(np.sum(impulse**2))
    return {
        "eq": 10 ** (curve_db / 20),
        "gain": float(10 ** (rng.uniform(-12, 6) / 20)),
        "noise": float(10 ** (rng.uniform(-60, -35) / 20)),
        "impulse": impulse,
    }


def apply_channel(waves: np.ndarray, channel: int, seeds: np.ndarray) -> np.ndarray:
    """``waves`` (batch, samples) through ``channel``; ``seeds[i]`` draws clip i's noise."""
    n = waves.shape[1]
    params = channel_response(channel, n)
    spectrum = np.fft.rfft(waves, axis=1) * params["eq"]
    out = np.fft.irfft(spectrum, n=n, axis=1)
    impulse = params["impulse"]
    if len(impulse) > 1:  # reverberation, cut to the clip's length
        size = n + len(impulse) - 1
        out = np.fft.irfft(np.fft.rfft(out, size, axis=1) * np.fft.rfft(impulse, size), size)[:, :n]
    out = out * params["gain"]
    for i, seed in enumerate(np.asarray(seeds, dtype=np.int64)):
        out[i] += params["noise"] * _rng(channel, int(seed)).standard_normal(n)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def assignment(
    num_rows: int, speakers: np.ndarray, held: list[np.ndarray], channels: int
) -> np.ndarray:
    """Each row's channel: its client's (``held[k]`` are client ``k``'s rows), else by speaker."""
    out = np.empty(num_rows, dtype=np.int64)
    codes = np.unique(speakers, return_inverse=True)[1]
    out[:] = _rng(channels).integers(0, channels, size=codes.max() + 1)[codes]
    for k, rows in enumerate(held):
        out[rows] = k % channels
    return out


def variant_key(channels: np.ndarray) -> str:
    """The name of one channel assignment."""
    digest = hashlib.sha1(f"v{_VERSION}".encode() + np.ascontiguousarray(channels).tobytes())
    return "ch" + digest.hexdigest()[:12]


def build_variant(entry: Path, features: FeatureConfig, channels: np.ndarray, progress) -> str:
    """Write the shifted waveforms and features of ``entry`` (once); return the feature key.

    ``progress(n)`` is called as rows are done. As the entry's own files, the two
    files are checked against the size and SHA-1 recorded when they were written
    (``features-<key>.json``); missing or damaged ones are written again, never used.
    """
    from fedkws.data.cache import _file_problem, _file_record
    from fedkws.fileio import write_json

    key = variant_key(channels)
    fkey = f"{features.key()}{VARIANT_SEPARATOR}{key}"
    waves_path, feats_path = (
        entry / f"waves{VARIANT_SEPARATOR}{key}.npy",
        entry / f"features-{fkey}.npy",
    )
    records_path = feats_path.with_suffix(".json")
    try:
        records = json.loads(records_path.read_text())
    except (OSError, ValueError):
        records = None
    if isinstance(records, dict):
        problem = next(filter(None, (_file_problem(p, records.get(p.name))
                                     for p in (waves_path, feats_path))), None)  # fmt: skip
        if problem is None:
            return fkey
        log.warning("feature-shift variant %s in %s is damaged (%s); rebuilding it",
                    key, entry, problem)  # fmt: skip
    source = np.load(entry / "waves.npy", mmap_mode="r")
    extractor = FeatureExtractor(features)
    frames = features.num_frames(source.shape[1])
    tmp_w, tmp_f = (p.with_name(f".{p.name}.{os.getpid()}") for p in (waves_path, feats_path))
    shifted = np.lib.format.open_memmap(tmp_w, "w+", np.float32, source.shape)
    feats = np.lib.format.open_memmap(tmp_f, "w+", np.float32,
                                      (len(source), 1, features.num_bins, frames))  # fmt: skip
    for start in range(0, len(source), 256):
        stop = min(start + 256, len(source))
        for channel in np.unique(channels[start:stop]):
            rows = np.arange(start, stop)[channels[start:stop] == channel]
            shifted[rows] = apply_channel(np.asarray(source[rows]), int(channel), rows)
        feats[start:stop] = extractor(torch.from_numpy(np.array(shifted[start:stop]))).numpy()
        progress(stop - start)
    for array, tmp, final in ((shifted, tmp_w, waves_path), (feats, tmp_f, feats_path)):
        array.flush()
        os.replace(tmp, final)
    write_json(records_path, {p.name: _file_record(p) for p in (waves_path, feats_path)})
    return fkey
