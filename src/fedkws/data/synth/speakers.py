"""Synthetic speakers: who they are (voice) and how they were recorded (channel)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fedkws.data.audio import SAMPLE_RATE
from fedkws.data.speech_commands import which_set
from fedkws.data.synth.common import keyed_rng
from fedkws.data.synth.voice import Espeak

# scipy.signal (1 s to import) is imported inside the functions that use it, so a run
# on a dataset that is already generated never loads it.

# Held-out split sizes, in percent, of the speaker-hash rule (as in the real dataset).
VALIDATION_PCT = 10.0
TESTING_PCT = 10.0


def max_held_out(num_speakers: int) -> int:
    """The most speakers each held-out split may take: training keeps at least one."""
    return (num_speakers - 1) // 2


def held_out_allowed(num_speakers: int) -> str:
    """The held-out speaker counts allowed with ``num_speakers``, in words ("1 to 7", "1")."""
    most = max_held_out(num_speakers)
    return "1" if most == 1 else f"1 to {most}"


def held_out_count(num_speakers: int, held_out_speakers: int | None = None) -> int:
    """Speakers in each of the validation and testing splits.

    ``round(num_speakers / 10)`` (at least one) unless ``held_out_speakers``
    asks for a number; training keeps at least one speaker.

    Raises
    ------
    ValueError
        If ``num_speakers < 3`` or the request leaves no training speaker.
    """
    if num_speakers < 3:
        raise ValueError(f"need at least 3 speakers (one per split), got {num_speakers}")
    if held_out_speakers is None:
        return max(1, round(num_speakers * VALIDATION_PCT / 100.0))
    most = max_held_out(num_speakers)
    if not 1 <= held_out_speakers <= most:
        raise ValueError(
            f"held_out_speakers={held_out_speakers} must be between 1 and "
            f"{most} for {num_speakers} speakers (training keeps at least one)"
        )
    return held_out_speakers


def choose_speaker_ids(
    seed: int, num_speakers: int, held_out_speakers: int | None = None
) -> list[str]:
    """Deterministic 8-hex speaker ids with a guaranteed number per split.

    Candidates are hashes of ``(seed, counter)``; a candidate is kept only
    while the split :func:`which_set` assigns it to still has room. The
    held-out splits get :func:`held_out_count` speakers each (by default
    ``round(num_speakers / 10)``, at least one), training the rest.

    Raises
    ------
    ValueError
        If ``num_speakers < 3`` (one per split is the minimum) or
        ``held_out_speakers`` leaves no training speaker.
    """
    held_out = held_out_count(num_speakers, held_out_speakers)
    quota = {"validation": held_out, "testing": held_out}
    quota["training"] = num_speakers - 2 * held_out
    chosen: list[str] = []
    seen: set[str] = set()
    counter = 0
    while len(chosen) < num_speakers:
        digest = hashlib.sha256(f"fedkws-synth-speaker:{seed}:{counter}".encode()).hexdigest()
        counter += 1
        candidate = digest[:8]
        if candidate in seen:
            continue
        seen.add(candidate)
        split = which_set(f"{candidate}_nohash_0.wav", VALIDATION_PCT, TESTING_PCT)
        if quota[split] > 0:
            quota[split] -= 1
            chosen.append(candidate)
    return chosen


@dataclass(frozen=True)
class SpeakerProfile:
    """Everything fixed about one synthetic speaker and their recording channel."""

    speaker_id: str
    accent: str
    variant: str
    pitch: float  # espeak 0-100, 50 = variant default
    pitch_range: float  # espeak 0-100
    rate: float  # words per minute
    level_db: float  # speech RMS, dBFS
    snr_db: float  # speech RMS over noise-floor RMS
    noise_tilt: float  # noise spectrum ~ f**(-tilt): 0 white, 1 pink, 2 brown
    hum_db: float  # mains hum relative to the speech level; -inf for none
    hum_hz: float
    highpass_hz: float
    lowpass_hz: float
    eq_hz: float
    eq_gain_db: float
    eq_q: float
    rt60: float  # reverberation time, seconds
    reverb_wet: float  # 0 dry .. 1 mostly reverberant

    @property
    def voice(self) -> str:
        """The espeak voice name, accent plus variant."""
        return f"{self.accent}+{self.variant}"


def make_speaker(
    speaker_id: str,
    seed: int,
    accents: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
) -> SpeakerProfile:
    """Draw the voice and channel of one speaker from ``(seed, speaker_id)``.

    Parameters
    ----------
    speaker_id
        8-hex speaker id.
    seed
        Dataset seed.
    accents, variants
        Choices available; by default those shipped with espeak-ng.
    """
    if accents is None or variants is None:
        engine = Espeak.get()
        accents = engine.accents() if accents is None else accents
        variants = engine.variants() if variants is None else variants
    if not accents or not variants:
        raise RuntimeError("no English espeak-ng voices found in the shipped data")
    rng = keyed_rng(seed, int(speaker_id, 16), "speaker")
    has_hum = rng.random() < 0.2
    return SpeakerProfile(
        speaker_id=speaker_id,
        accent=str(accents[rng.integers(len(accents))]),
        variant=str(variants[rng.integers(len(variants))]),
        pitch=float(np.clip(rng.normal(50.0, 14.0), 10.0, 90.0)),
        pitch_range=float(rng.uniform(15.0, 90.0)),
        # log-uniform: slow and fast talkers are equally common around 170 wpm
        rate=float(np.exp(rng.uniform(np.log(120.0), np.log(250.0)))),
        level_db=float(rng.uniform(-32.0, -14.0)),
        # mostly clean with a tail of noisy recordings, like crowd-sourced audio
        snr_db=float(np.clip(rng.gamma(4.5, 5.5), 3.0, 45.0)),
        noise_tilt=float(rng.uniform(0.3, 2.0)),
        hum_db=float(rng.uniform(-35.0, -15.0)) if has_hum else float("-inf"),
        hum_hz=float(rng.choice([50.0, 60.0])),
        highpass_hz=float(np.exp(rng.uniform(np.log(40.0), np.log(350.0)))),
        lowpass_hz=float(rng.uniform(3400.0, 7600.0)),
        eq_hz=float(np.exp(rng.uniform(np.log(250.0), np.log(5000.0)))),
        eq_gain_db=float(rng.uniform(-9.0, 9.0)),
        eq_q=float(rng.uniform(0.5, 2.5)),
        rt60=float(rng.uniform(0.1, 0.7)),
        reverb_wet=float(rng.beta(1.5, 4.0)),
    )


def _peaking_sos(freq_hz: float, gain_db: float, q: float) -> np.ndarray:
    """Second-order peaking EQ section (the usual bilinear-transform design)."""
    amp = 10.0 ** (gain_db / 40.0)
    w0 = 2.0 * np.pi * freq_hz / SAMPLE_RATE
    alpha = np.sin(w0) / (2.0 * q)
    b = np.array([1.0 + alpha * amp, -2.0 * np.cos(w0), 1.0 - alpha * amp])
    a = np.array([1.0 + alpha / amp, -2.0 * np.cos(w0), 1.0 - alpha / amp])
    return np.concatenate([b / a[0], a / a[0]])[None, :]


@lru_cache(maxsize=4096)
def channel_sos(speaker: SpeakerProfile) -> np.ndarray:
    """The microphone/line response: high-pass, low-pass and a peaking EQ, as SOS."""
    from scipy import signal

    high = signal.butter(2, speaker.highpass_hz, "highpass", fs=SAMPLE_RATE, output="sos")
    low = signal.butter(4, speaker.lowpass_hz, "lowpass", fs=SAMPLE_RATE, output="sos")
    peak = _peaking_sos(speaker.eq_hz, speaker.eq_gain_db, speaker.eq_q)
    return np.concatenate([high, low, peak])


@lru_cache(maxsize=4096)
def room_impulse(speaker: SpeakerProfile, seed: int) -> np.ndarray:
    """A direct path plus exponentially decaying diffuse noise: a small room."""
    rng = keyed_rng(seed, int(speaker.speaker_id, 16), "room")
    n = max(8, int(speaker.rt60 * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    # 60 dB amplitude decay over rt60; early part sparse like first reflections
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / speaker.rt60)
    tail[: int(0.003 * SAMPLE_RATE)] = 0.0
    tail /= np.sqrt(np.sum(tail**2)) + 1e-12
    ir = speaker.reverb_wet * tail
    ir[0] += 1.0 - speaker.reverb_wet
    return ir


def speaker_profiles(
    seed: int, num_speakers: int, held_out_speakers: int | None = None
) -> list[SpeakerProfile]:
    """The speakers :func:`generate` would create, for inspection."""
    ids = choose_speaker_ids(seed, num_speakers, held_out_speakers)
    return [make_speaker(s, seed) for s in ids]
