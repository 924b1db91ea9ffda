"""One utterance: a word spoken by a speaker, placed in a one-second clip."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from fedkws.data.audio import CLIP_SAMPLES, SAMPLE_RATE
from fedkws.data.synth.common import coloured_noise, keyed_rng
from fedkws.data.synth.speakers import SpeakerProfile, channel_sos, room_impulse
from fedkws.data.synth.voice import Espeak

# scipy.signal (1 s to import) is imported inside the functions that use it, so a run
# on a dataset that is already generated never loads it.

# Clause endings change espeak's intonation contour (statement, question,
# exclamation, continuation), the way a keyword is said differently each time.
_ENDINGS = (".", "?", "!", ",")
_ENDING_P = (0.55, 0.15, 0.15, 0.15)

_MAX_WORD_SECONDS = 0.92  # leave room for an onset and a short tail
_SPEECH_LEVEL_FLOOR = 1e-4


def _trim_silence(wave: np.ndarray, threshold_db: float = -40.0) -> np.ndarray:
    """Cut leading and trailing near-silence, keeping 10 ms of margin."""
    if wave.size == 0:
        return wave
    envelope = np.abs(wave)
    peak = envelope.max()
    if peak <= 0:
        return wave[:0]
    active = np.nonzero(envelope > peak * 10.0 ** (threshold_db / 20.0))[0]
    margin = int(0.01 * SAMPLE_RATE)
    return wave[max(0, active[0] - margin) : active[-1] + margin + 1]


@lru_cache(maxsize=4)
def _resampling_filter(up: int, down: int) -> np.ndarray:
    # resample_poly's own default design, computed once instead of per call
    from scipy import signal

    max_rate = max(up, down)
    return signal.firwin(20 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))


def _to_16k(samples: np.ndarray, native_rate: int) -> np.ndarray:
    from scipy import signal

    wave = samples.astype(np.float64) / 32768.0
    if native_rate == SAMPLE_RATE:
        return wave
    g = np.gcd(native_rate, SAMPLE_RATE)
    up, down = SAMPLE_RATE // g, native_rate // g
    return signal.resample_poly(wave, up, down, window=_resampling_filter(up, down))


def _fade_out(wave: np.ndarray, seconds: float = 0.02) -> np.ndarray:
    n = min(wave.size, int(seconds * SAMPLE_RATE))
    if n > 0:
        wave = wave.copy()
        wave[-n:] *= np.linspace(1.0, 0.0, n)
    return wave


def _speak_word(
    engine: Espeak,
    speaker: SpeakerProfile,
    word: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """Synthesise one utterance of ``word`` at 16 kHz, trimmed, at most ~0.9 s."""
    rate = speaker.rate * float(np.exp(rng.normal(0.0, 0.08)))
    pitch = speaker.pitch + rng.normal(0.0, 4.0)
    pitch_range = speaker.pitch_range + rng.normal(0.0, 8.0)
    ending = _ENDINGS[rng.choice(len(_ENDINGS), p=_ENDING_P)]
    noise_seed = int(rng.integers(1, 2**31 - 1))
    max_samples = int(_MAX_WORD_SECONDS * SAMPLE_RATE)
    wave = np.zeros(0)
    for _ in range(3):
        raw = engine.synth(word + ending, speaker.voice, rate, pitch, pitch_range, noise_seed)
        wave = _trim_silence(_to_16k(raw, engine.sample_rate))
        if wave.size <= max_samples:
            return wave
        # Talk faster rather than truncate: a slow speaker still says the whole word.
        rate = min(450.0, rate * wave.size / max_samples * 1.05)
    return _fade_out(wave[:max_samples])


def render_utterance(
    engine: Espeak,
    speaker: SpeakerProfile,
    word: str,
    index: int,
    seed: int,
) -> np.ndarray:
    """One clip: exactly one second of int16 audio at 16 kHz.

    The word is placed at a random onset in the window, passed through the
    speaker's room and channel, and mixed with the speaker's noise floor at
    the speaker's SNR (jittered per utterance).

    Parameters
    ----------
    engine
        The synthesiser (see :meth:`Espeak.get`).
    speaker
        Voice and channel of the speaker.
    word
        Text to speak.
    index
        Utterance number ``n`` of this speaker and word.
    seed
        Dataset seed.
    """
    from scipy import signal

    rng = keyed_rng(seed, int(speaker.speaker_id, 16), word, index)
    speech = _speak_word(engine, speaker, word, rng)
    dry_len = speech.size
    speech = signal.fftconvolve(speech, room_impulse(speaker, seed))

    # Real recordings are started by hand: the word can begin anywhere the
    # dry word still fits, and a reverberant tail may be cut at the end.
    onset = int(rng.integers(0, max(1, CLIP_SAMPLES - dry_len + 1)))
    clip = np.zeros(CLIP_SAMPLES)
    part = speech[: CLIP_SAMPLES - onset]
    clip[onset : onset + part.size] = part

    active = np.abs(part) > np.abs(part).max() * 0.05 if part.size else np.zeros(0, bool)
    speech_rms = np.sqrt(np.mean(part[active] ** 2)) if active.any() else 0.0
    level = 10.0 ** ((speaker.level_db + rng.normal(0.0, 2.0)) / 20.0)
    clip *= level / max(speech_rms, _SPEECH_LEVEL_FLOOR)

    snr_db = speaker.snr_db + rng.normal(0.0, 2.5)
    clip += coloured_noise(rng, CLIP_SAMPLES, speaker.noise_tilt) * level * 10.0 ** (-snr_db / 20)
    if np.isfinite(speaker.hum_db):
        t = np.arange(CLIP_SAMPLES) / SAMPLE_RATE
        phase = rng.uniform(0.0, 2.0 * np.pi)
        hum = sum(
            np.sin(2.0 * np.pi * k * speaker.hum_hz * t + k * phase) / k**1.5 for k in (1, 2, 3)
        )
        clip += hum * level * 10.0 ** (speaker.hum_db / 20.0)

    clip = signal.sosfilt(channel_sos(speaker), clip)
    peak = np.abs(clip).max()
    if peak > 0.98:  # a careful recordist backs off the gain instead of clipping
        clip *= 0.98 / peak
    return np.round(clip * 32767.0).astype(np.int16)
