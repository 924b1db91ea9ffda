"""Background-noise recordings named and shaped like those of the real dataset."""

from __future__ import annotations

import numpy as np

from fedkws.data.audio import SAMPLE_RATE
from fedkws.data.synth.common import coloured_noise, keyed_rng

# scipy.signal (1 s to import) is imported inside the functions that use it, so a run
# on a dataset that is already generated never loads it.

NOISE_FILES = (
    "doing_the_dishes.wav",
    "dude_miaowing.wav",
    "exercise_bike.wav",
    "pink_noise.wav",
    "running_tap.wav",
    "white_noise.wav",
)


def _normalise(wave: np.ndarray, rms_db: float) -> np.ndarray:
    wave = wave - wave.mean()
    wave = wave * (10.0 ** (rms_db / 20.0) / (np.sqrt(np.mean(wave**2)) + 1e-12))
    peak = np.abs(wave).max()
    return wave * (0.95 / peak) if peak > 0.95 else wave


def _bandpass(wave: np.ndarray, low_hz: float, high_hz: float, order: int = 2) -> np.ndarray:
    from scipy import signal

    sos = signal.butter(order, [low_hz, high_hz], "bandpass", fs=SAMPLE_RATE, output="sos")
    return signal.sosfilt(sos, wave)


def _smooth_random(rng: np.random.Generator, n: int, rate_hz: float) -> np.ndarray:
    """A slowly wandering curve with values in about [-1, 1]."""
    knots = max(4, int(n / SAMPLE_RATE * rate_hz) + 2)
    values = rng.uniform(-1.0, 1.0, knots)
    return np.interp(np.arange(n), np.linspace(0, n - 1, knots), values)


def _noise_white(rng: np.random.Generator, n: int) -> np.ndarray:
    return _normalise(rng.standard_normal(n), -16.0)


def _noise_pink(rng: np.random.Generator, n: int) -> np.ndarray:
    return _normalise(coloured_noise(rng, n, 1.0), -16.0)


def _noise_tap(rng: np.random.Generator, n: int) -> np.ndarray:
    # A steady hiss of water in the sink, with a wandering brightness ...
    hiss = _bandpass(rng.standard_normal(n), 400.0, 5000.0)
    hiss *= 1.0 + 0.3 * _smooth_random(rng, n, 2.0)
    # ... and bubbles: short upward-gliding resonances at random times.
    bubbles = np.zeros(n)
    for start in np.sort(rng.integers(0, n, size=int(n / SAMPLE_RATE * 40))):
        dur = int(rng.uniform(0.004, 0.02) * SAMPLE_RATE)
        t = np.arange(min(dur, n - start)) / SAMPLE_RATE
        f0 = rng.uniform(600.0, 3000.0)
        glide = f0 * (1.0 + 8.0 * t)
        bubbles[start : start + t.size] += (
            np.sin(2.0 * np.pi * np.cumsum(glide) / SAMPLE_RATE) * np.exp(-t / 0.005)
        ) * rng.uniform(0.2, 1.0)
    return _normalise(hiss / np.std(hiss) + 0.6 * bubbles / (np.std(bubbles) + 1e-12), -20.0)


def _noise_bike(rng: np.random.Generator, n: int) -> np.ndarray:
    cadence = rng.uniform(1.1, 1.5) * (1.0 + 0.05 * _smooth_random(rng, n, 0.2))
    pedal_phase = 2.0 * np.pi * np.cumsum(cadence) / SAMPLE_RATE
    # flywheel whir: harmonics of a rotation that speeds up with each stroke
    wheel_hz = 38.0 * cadence * (1.0 + 0.08 * np.sin(2.0 * pedal_phase))
    wheel_phase = 2.0 * np.pi * np.cumsum(wheel_hz) / SAMPLE_RATE
    whir = sum(np.sin(k * wheel_phase) / k for k in range(1, 12))
    whoosh = _bandpass(rng.standard_normal(n), 150.0, 2500.0)
    whoosh *= 0.6 + 0.4 * np.sin(2.0 * pedal_phase) ** 2
    # a click of the crank once per revolution
    clicks = np.zeros(n)
    step = np.diff(np.floor(pedal_phase / (2.0 * np.pi)), prepend=0.0)
    for start in np.nonzero(step > 0)[0]:
        m = min(int(0.03 * SAMPLE_RATE), n - start)
        clicks[start : start + m] += rng.standard_normal(m) * np.exp(-np.arange(m) / 80.0)
    mix = whir / np.std(whir) + 0.5 * whoosh / np.std(whoosh) + 0.3 * clicks
    return _normalise(mix, -20.0)


def _noise_dishes(rng: np.random.Generator, n: int) -> np.ndarray:
    room = _bandpass(rng.standard_normal(n), 200.0, 4000.0) * 0.05
    clatter = np.zeros(n)
    # clusters of knocks: plates and cutlery are handled in bursts
    events = rng.integers(0, n, size=int(n / SAMPLE_RATE * 6))
    for centre in events:
        for start in centre + rng.integers(0, int(0.4 * SAMPLE_RATE), size=rng.integers(1, 5)):
            if start >= n:
                continue
            dur = int(rng.uniform(0.05, 0.35) * SAMPLE_RATE)
            t = np.arange(min(dur, n - start)) / SAMPLE_RATE
            # inharmonic partials with fast decay: ceramic and metal clinks
            partials = rng.uniform(800.0, 7000.0, size=4)
            decay = rng.uniform(0.01, 0.12)
            ring = sum(np.sin(2.0 * np.pi * f * t + rng.uniform(0, 6.3)) for f in partials)
            knock = ring * np.exp(-t / decay) * rng.uniform(0.2, 1.0)
            knock[: min(40, knock.size)] += rng.standard_normal(min(40, knock.size))
            clatter[start : start + t.size] += knock
    return _normalise(room + clatter / (np.abs(clatter).max() + 1e-12), -22.0)


def _noise_miaow(rng: np.random.Generator, n: int) -> np.ndarray:
    from scipy import signal

    room = coloured_noise(rng, n, 1.5) * 0.02
    out = room.copy()
    start = int(rng.uniform(0.2, 1.0) * SAMPLE_RATE)
    while start < n:
        dur = int(rng.uniform(0.5, 1.3) * SAMPLE_RATE)
        t = np.arange(min(dur, n - start)) / SAMPLE_RATE
        x = t / (dur / SAMPLE_RATE)
        # the rise-and-fall of a miaow: f0 up then down, with vibrato
        f_peak = rng.uniform(600.0, 900.0)
        f0 = 400.0 + (f_peak - 400.0) * np.sin(np.pi * x) ** 0.7
        f0 *= 1.0 + 0.02 * np.sin(2.0 * np.pi * 6.0 * t)
        phase = 2.0 * np.pi * np.cumsum(f0) / SAMPLE_RATE
        tone = sum(np.sin(k * phase) * 0.7**k for k in range(1, 7))
        # an opening vowel: brighter in the middle ("mi-aa-ow")
        tone = _bandpass(tone, 300.0, 3000.0 + 2000.0 * rng.random())
        env = np.sin(np.pi * x) ** 0.5 * np.exp(-2.0 * x)
        out[start : start + t.size] += tone * env * rng.uniform(0.3, 1.0)
        start += t.size + int(rng.uniform(0.8, 4.0) * SAMPLE_RATE)
    # a person murmuring in the background: low, voiced babble
    babble_f0 = 110.0 * (1.0 + 0.15 * _smooth_random(rng, n, 3.0))
    babble = signal.sawtooth(2.0 * np.pi * np.cumsum(babble_f0) / SAMPLE_RATE)
    babble = _bandpass(babble, 200.0, 1200.0) * np.clip(_smooth_random(rng, n, 4.0), 0.0, 1.0)
    return _normalise(out + 0.05 * babble, -24.0)


_NOISE_MAKERS = {
    "doing_the_dishes.wav": _noise_dishes,
    "dude_miaowing.wav": _noise_miaow,
    "exercise_bike.wav": _noise_bike,
    "pink_noise.wav": _noise_pink,
    "running_tap.wav": _noise_tap,
    "white_noise.wav": _noise_white,
}


def make_noise(name: str, seconds: float, seed: int) -> np.ndarray:
    """One background-noise recording (float in [-1, 1]) named as in the real dataset."""
    n = int(round(seconds * SAMPLE_RATE))
    return _NOISE_MAKERS[name](keyed_rng(seed, "noise", name), n)
