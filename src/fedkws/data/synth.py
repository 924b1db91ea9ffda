"""The embedded default dataset: synthesised speech laid out like Speech Commands.

:func:`generate` writes ``<root>/<word>/<8-hex speaker>_nohash_<n>.wav`` for
the 35 words of Speech Commands v0.02, six background-noise recordings in
``_background_noise_/`` and the official ``validation_list.txt`` /
``testing_list.txt``, so every reader of the real dataset reads it unchanged.

Speech comes from espeak-ng (the library and its data ship inside the
``espeakng-loader`` wheel, so nothing is downloaded). Each synthetic speaker
is a fixed combination of an English accent, a voice variant, pitch, pitch
range and speaking rate, recorded through its own channel: a room (short
synthetic reverb), a microphone/line response (high-pass, low-pass and a
peaking EQ), a level and a coloured noise floor with optional mains hum.
Every utterance then varies a little (rate, pitch, intonation, level, SNR,
onset), so that speakers differ from each other more than from themselves,
as real ones do.

Reproducibility
---------------
The same seed and sizes give byte-identical files. All randomness comes from
NumPy generators seeded per (seed, speaker, word, utterance), and the
synthesiser is reloaded before each (speaker, word): libespeak-ng keeps
waveform phase, pitch flutter and gain-control state in static variables
across calls, so without a reload a clip would depend on everything
synthesised before it in the process. As a result a clip depends only on
the seed, its speaker, its word and its own utterance index (plus the earlier
utterance indices of the same speaker and word): adding speakers, words or
utterances never changes existing clips.

Splits
------
The split of a file is decided, as in the real dataset, by hashing the
speaker id (:func:`fedkws.data.speech_commands.which_set`). With a few dozen
speakers a pure hash can leave the validation or testing split empty, so
speaker ids are drawn deterministically from the seed and kept only while
their split still needs speakers: the result has ``round(10 %)`` (at least
one) speakers in each held-out split and the rest in training, and the split
lists agree with ``which_set`` by construction.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal

from fedkws.data.audio import CLIP_SAMPLES, SAMPLE_RATE
from fedkws.data.speech_commands import BACKGROUND_NOISE_DIR, WORDS_V2, which_set

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_NOISE_SECONDS",
    "DEFAULT_SEED",
    "DEFAULT_SPEAKERS",
    "DEFAULT_UTTERANCES",
    "MARKER_FILE",
    "NOISE_FILES",
    "Espeak",
    "SpeakerProfile",
    "SynthSummary",
    "choose_speaker_ids",
    "generate",
    "is_complete",
    "main_generate",
    "make_speaker",
    "read_marker",
    "render_utterance",
]

# 96 speakers x 2 utterances x 35 words = 6,720 clips (~220 MB, about half a
# minute on 2 cores): 76 training speakers for natural-id partitions, 70 clips
# per speaker (real Speech Commands averages ~40), ~150 training clips per
# keyword; small enough that every preset trains in minutes on a CPU.
DEFAULT_SPEAKERS = 96
DEFAULT_UTTERANCES = 2
DEFAULT_SEED = 0
DEFAULT_NOISE_SECONDS = 30.0

MARKER_FILE = "fedkws_synth.json"
README_FILE = "README.txt"
FORMAT_NAME = "fedkws-synth"
FORMAT_VERSION = 1
NOISE_FILES = (
    "doing_the_dishes.wav",
    "dude_miaowing.wav",
    "exercise_bike.wav",
    "pink_noise.wav",
    "running_tap.wav",
    "white_noise.wav",
)

# Marks a root that generate() owns while it is being (re)written; a root
# that has neither this nor the marker is someone else's folder.
_IN_PROGRESS_FILE = ".fedkws_synth_in_progress"
_CLIP_NAME_RE = re.compile(r"^[0-9a-f]{8}_nohash_\d+\.wav$")
_VALIDATION_PCT = 10.0
_TESTING_PCT = 10.0

# English accents in preference order; only those present in the shipped
# espeak-ng data are used. en-Shaw is left out: it is a spelling, not an accent.
_ACCENTS = (
    "en",
    "en-US",
    "en-GB-scotland",
    "en-GB-x-rp",
    "en-GB-x-gbclan",
    "en-GB-x-gbcwmd",
    "en-029",
    "en-US-nyc",
)
# Voice variants that sound like people. Robotic, whispering and effect
# variants (robosoft*, Demonic, Tweaky, UniRobot, whisper...) are left out:
# they would make speakers trivially separable rather than realistic.
_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8",
    "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6",
    "croak", "Alex", "Alicia", "Andrea", "Andy", "Annie", "Denis", "Diogo",
    "Gene", "Gene2", "Henrique", "Hugo", "Jacky", "Lee", "Mario", "Michael",
    "Mike", "Nguyen", "Reed", "RicishayMax", "Storm", "adam", "anika",
    "announcer", "antonio", "aunty", "belinda", "benjamin", "boris", "caleb",
    "david", "ed", "edward", "edward2", "grandma", "grandpa", "gustave", "ian",
    "iven", "iven3", "iven4", "john", "kaukovalta", "linda", "marcelo", "max",
    "michel", "miguel", "mike2", "norbert", "pablo", "paul", "pedro", "quincy",
    "rob", "robert", "sandro", "shelby", "steph", "steph2", "steph3", "travis",
    "victor", "zac",
)  # fmt: skip
# Clause endings change espeak's intonation contour (statement, question,
# exclamation, continuation), the way a keyword is said differently each time.
_ENDINGS = (".", "?", "!", ",")
_ENDING_P = (0.55, 0.15, 0.15, 0.15)

_MAX_WORD_SECONDS = 0.92  # leave room for an onset and a short tail
_SPEECH_LEVEL_FLOOR = 1e-4


# --------------------------------------------------------------------------
# espeak-ng through ctypes
# --------------------------------------------------------------------------

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class Espeak:
    """A minimal ctypes binding to libespeak-ng in synchronous mode.

    The library is process-global state, so there is one instance per process
    (:meth:`get`) and it must not be used from several threads at once.
    :meth:`reset` unloads and reloads the shared library, which restores every
    static variable of the synthesiser to its initial value; it costs about
    0.3 ms plus about 3 ms for the next voice load.

    Attributes
    ----------
    sample_rate
        Native output rate of espeak-ng (22050 Hz).
    reproducible
        Whether :meth:`reset` was verified to restore a fresh state. It is
        False if another component of the process holds the same library
        open, in which case clips are still valid but not byte-reproducible.
    """

    _AUDIO_OUTPUT_SYNCHRONOUS = 2
    _POS_CHARACTER = 1
    _CHARS_UTF8 = 1
    _PARAM_RATE = 1
    _PARAM_PITCH = 3
    _PARAM_RANGE = 4

    _instance: Espeak | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        import espeakng_loader

        self._lib_path = espeakng_loader.get_library_path()
        self.data_path = Path(espeakng_loader.get_data_path())
        self._chunks: list[np.ndarray] = []
        # ctypes only keeps a raw pointer: the Python callback object must
        # outlive every synthesis, hence an attribute.
        self._callback = _SYNTH_CALLBACK(self._collect)
        self._lib: ctypes.CDLL | None = None
        self.lock = threading.Lock()
        self.sample_rate = 0
        self.version = ""
        self._load()
        self.reproducible = self._check_reset()
        if not self.reproducible:
            log.warning(
                "libespeak-ng is held open elsewhere in this process; synthetic clips "
                "will not be byte-reproducible"
            )

    @classmethod
    def get(cls) -> Espeak:
        """The process-wide instance, created (and the library loaded) on first use."""
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _load(self) -> None:
        lib = ctypes.CDLL(self._lib_path)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_Terminate.restype = ctypes.c_int
        rate = lib.espeak_Initialize(
            self._AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(), 0
        )
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed with data at {self.data_path}")
        lib.espeak_SetSynthCallback(self._callback)
        # Breath and Klatt noise draw from espeak's own generator; older
        # builds lack the setter and use libc rand(), reset by the reload.
        self._set_seed = getattr(lib, "espeak_ng_SetRandSeed", None)
        if self._set_seed is not None:
            self._set_seed.argtypes = [ctypes.c_long]
        self._lib = lib
        self.sample_rate = rate
        self.version = (lib.espeak_Info(None) or b"").decode()

    def _unload(self) -> None:
        if self._lib is None:
            return
        import _ctypes

        lib, self._lib = self._lib, None
        lib.espeak_Terminate()
        close = getattr(_ctypes, "dlclose", None) or getattr(_ctypes, "FreeLibrary", None)
        if close is not None:
            close(lib._handle)

    def reset(self) -> None:
        """Reload the library so the next synthesis starts from a fresh state."""
        self._unload()
        self._load()

    def _check_reset(self) -> bool:
        # Without a real unload the second call would continue from the state
        # the first left behind and come out different.
        first = self.synth("yes", "gmw/en")
        self.reset()
        second = self.synth("yes", "gmw/en")
        self.reset()
        return np.array_equal(first, second)

    def _collect(self, wav, num_samples, events) -> int:
        if num_samples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0

    def synth(
        self,
        text: str,
        voice: str,
        rate: float = 175,
        pitch: float = 50,
        pitch_range: float = 50,
        noise_seed: int = 1,
    ) -> np.ndarray:
        """Speak ``text`` and return int16 samples at :attr:`sample_rate`.

        Hold :attr:`lock` around calls (and around :meth:`reset`) if other
        threads may use the synthesiser.

        Parameters
        ----------
        text
            UTF-8 text; punctuation shapes the intonation.
        voice
            espeak voice name such as ``"gmw/en-US+f2"`` (language file, then an
            optional ``+variant``).
        rate
            Words per minute (80 to 450).
        pitch, pitch_range
            Base pitch and pitch range, 0 to 100 (50 is the voice's default).
        noise_seed
            Seed for the synthesiser's internal noise generator.

        Raises
        ------
        ValueError
            If espeak-ng does not know the voice.
        RuntimeError
            If synthesis fails.
        """
        lib = self._lib
        if lib is None:
            raise RuntimeError("espeak-ng is not loaded")
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        lib.espeak_SetParameter(self._PARAM_RATE, int(np.clip(rate, 80, 450)), 0)
        lib.espeak_SetParameter(self._PARAM_PITCH, int(np.clip(pitch, 0, 100)), 0)
        lib.espeak_SetParameter(self._PARAM_RANGE, int(np.clip(pitch_range, 0, 100)), 0)
        if self._set_seed is not None:
            self._set_seed(int(noise_seed))
        self._chunks = []
        data = text.encode("utf-8") + b"\0"
        status = lib.espeak_Synth(
            data, len(data), 0, self._POS_CHARACTER, 0, self._CHARS_UTF8, None, None
        )
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed ({status}) for {text!r} with {voice!r}")
        chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)

    def accents(self) -> tuple[str, ...]:
        """English accents shipped with the data, as voice names (``gmw/en-US``)."""
        lang_dir = self.data_path / "lang" / "gmw"
        return tuple(f"gmw/{a}" for a in _ACCENTS if (lang_dir / a).is_file())

    def variants(self) -> tuple[str, ...]:
        """Human-sounding voice variants shipped with the data."""
        variant_dir = self.data_path / "voices" / "!v"
        return tuple(v for v in _VARIANTS if (variant_dir / v).is_file())


# --------------------------------------------------------------------------
# Speakers
# --------------------------------------------------------------------------


def _rng(*key: int | str) -> np.random.Generator:
    """A generator keyed by a tuple, independent of any iteration order."""
    entropy = [k if isinstance(k, int) else _str_key(k) for k in key]
    return np.random.default_rng(np.random.SeedSequence(entropy))


@lru_cache(maxsize=None)
def _str_key(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def choose_speaker_ids(seed: int, num_speakers: int) -> list[str]:
    """Deterministic 8-hex speaker ids with a guaranteed ~80/10/10 split.

    Candidates are hashes of ``(seed, counter)``; a candidate is kept only
    while the split :func:`which_set` assigns it to still has room. The
    held-out splits get ``round(num_speakers / 10)`` speakers each, at least
    one.

    Raises
    ------
    ValueError
        If ``num_speakers < 3`` (one per split is the minimum).
    """
    if num_speakers < 3:
        raise ValueError(f"need at least 3 speakers (one per split), got {num_speakers}")
    held_out = max(1, round(num_speakers * _VALIDATION_PCT / 100.0))
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
        split = which_set(f"{candidate}_nohash_0.wav", _VALIDATION_PCT, _TESTING_PCT)
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
    rng = _rng(seed, int(speaker_id, 16), "speaker")
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


# --------------------------------------------------------------------------
# Signal processing
# --------------------------------------------------------------------------


def _peaking_sos(freq_hz: float, gain_db: float, q: float) -> np.ndarray:
    """Second-order peaking EQ section (the usual bilinear-transform design)."""
    amp = 10.0 ** (gain_db / 40.0)
    w0 = 2.0 * np.pi * freq_hz / SAMPLE_RATE
    alpha = np.sin(w0) / (2.0 * q)
    b = np.array([1.0 + alpha * amp, -2.0 * np.cos(w0), 1.0 - alpha * amp])
    a = np.array([1.0 + alpha / amp, -2.0 * np.cos(w0), 1.0 - alpha / amp])
    return np.concatenate([b / a[0], a / a[0]])[None, :]


@lru_cache(maxsize=4096)
def _channel_sos(speaker: SpeakerProfile) -> np.ndarray:
    high = signal.butter(2, speaker.highpass_hz, "highpass", fs=SAMPLE_RATE, output="sos")
    low = signal.butter(4, speaker.lowpass_hz, "lowpass", fs=SAMPLE_RATE, output="sos")
    peak = _peaking_sos(speaker.eq_hz, speaker.eq_gain_db, speaker.eq_q)
    return np.concatenate([high, low, peak])


@lru_cache(maxsize=4096)
def _room_impulse(speaker: SpeakerProfile, seed: int) -> np.ndarray:
    """A direct path plus exponentially decaying diffuse noise: a small room."""
    rng = _rng(seed, int(speaker.speaker_id, 16), "room")
    n = max(8, int(speaker.rt60 * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    # 60 dB amplitude decay over rt60; early part sparse like first reflections
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / speaker.rt60)
    tail[: int(0.003 * SAMPLE_RATE)] = 0.0
    tail /= np.sqrt(np.sum(tail**2)) + 1e-12
    ir = speaker.reverb_wet * tail
    ir[0] += 1.0 - speaker.reverb_wet
    return ir


def _coloured_noise(rng: np.random.Generator, n: int, tilt: float) -> np.ndarray:
    """Gaussian noise with power spectrum ~ f**(-tilt), unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, d=1.0 / SAMPLE_RATE)
    freqs[0] = freqs[1]
    spectrum *= freqs ** (-tilt / 2.0)
    noise = np.fft.irfft(spectrum, n)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


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
    max_rate = max(up, down)
    return signal.firwin(20 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))


def _to_16k(samples: np.ndarray, native_rate: int) -> np.ndarray:
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
    rng = _rng(seed, int(speaker.speaker_id, 16), word, index)
    speech = _speak_word(engine, speaker, word, rng)
    dry_len = speech.size
    speech = signal.fftconvolve(speech, _room_impulse(speaker, seed))

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
    clip += _coloured_noise(rng, CLIP_SAMPLES, speaker.noise_tilt) * level * 10.0 ** (-snr_db / 20)
    if np.isfinite(speaker.hum_db):
        t = np.arange(CLIP_SAMPLES) / SAMPLE_RATE
        phase = rng.uniform(0.0, 2.0 * np.pi)
        hum = sum(
            np.sin(2.0 * np.pi * k * speaker.hum_hz * t + k * phase) / k**1.5 for k in (1, 2, 3)
        )
        clip += hum * level * 10.0 ** (speaker.hum_db / 20.0)

    clip = signal.sosfilt(_channel_sos(speaker), clip)
    peak = np.abs(clip).max()
    if peak > 0.98:  # a careful recordist backs off the gain instead of clipping
        clip *= 0.98 / peak
    return np.round(clip * 32767.0).astype(np.int16)


# --------------------------------------------------------------------------
# Background noise
# --------------------------------------------------------------------------


def _normalise(wave: np.ndarray, rms_db: float) -> np.ndarray:
    wave = wave - wave.mean()
    wave = wave * (10.0 ** (rms_db / 20.0) / (np.sqrt(np.mean(wave**2)) + 1e-12))
    peak = np.abs(wave).max()
    return wave * (0.95 / peak) if peak > 0.95 else wave


def _bandpass(wave: np.ndarray, low_hz: float, high_hz: float, order: int = 2) -> np.ndarray:
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
    return _normalise(_coloured_noise(rng, n, 1.0), -16.0)


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
    room = _coloured_noise(rng, n, 1.5) * 0.02
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
    return _NOISE_MAKERS[name](_rng(seed, "noise", name), n)


# --------------------------------------------------------------------------
# Writing the dataset
# --------------------------------------------------------------------------


@dataclass
class SynthSummary:
    """What :func:`generate` wrote."""

    root: str
    seed: int
    num_speakers: int
    utterances_per_word: int
    num_words: int
    num_clips: int
    num_noise_files: int
    speakers_per_split: dict[str, int] = field(default_factory=dict)
    clips_per_split: dict[str, int] = field(default_factory=dict)
    bytes_on_disk: int = 0
    seconds: float = 0.0

    @property
    def ms_per_clip(self) -> float:
        """Wall time per clip, in milliseconds."""
        return 1000.0 * self.seconds / max(1, self.num_clips)

    def describe(self, timing: bool = True) -> str:
        """A few human-readable lines (``timing=False`` leaves out the wall time)."""
        splits = ", ".join(
            f"{s} {self.speakers_per_split.get(s, 0)} speakers/"
            f"{self.clips_per_split.get(s, 0)} clips"
            for s in ("training", "validation", "testing")
        )
        return (
            f"Synthetic Speech Commands at {self.root}\n"
            f"  {self.num_clips} clips = {self.num_speakers} speakers x {self.num_words} words"
            f" x {self.utterances_per_word} utterances, {self.num_noise_files} noise files\n"
            f"  {splits}\n"
            f"  {self.bytes_on_disk / 1e6:.1f} MB, seed {self.seed}"
        ) + (f", {self.seconds:.1f} s ({self.ms_per_clip:.1f} ms/clip)" if timing else "")

    def __str__(self) -> str:
        return self.describe()


def read_marker(root: Path | str) -> dict | None:
    """The generation parameters of a complete synthetic dataset, or None."""
    path = Path(root) / MARKER_FILE
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT_NAME:
        return None
    return marker


def is_complete(
    root: Path | str,
    num_speakers: int | None = None,
    utterances_per_word: int | None = None,
    seed: int | None = None,
    words: Sequence[str] | None = None,
    noise_seconds: float | None = None,
) -> bool:
    """Whether ``root`` holds a finished dataset generated with these parameters.

    Parameters left as None are not compared.
    """
    marker = read_marker(root)
    if marker is None or marker.get("version") != FORMAT_VERSION:
        return False
    expected = {
        "num_speakers": num_speakers,
        "utterances_per_word": utterances_per_word,
        "seed": seed,
        "words": list(words) if words is not None else None,
        "noise_seconds": float(noise_seconds) if noise_seconds is not None else None,
    }
    return all(v is None or marker.get(k) == v for k, v in expected.items())


def _write_wav(path: Path, data: np.ndarray) -> int:
    """Write 16-bit PCM atomically; return the size in bytes."""
    tmp = path.with_name(f".{path.name}.tmp")
    sf.write(str(tmp), data, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)
    return path.stat().st_size


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _claim_root(root: Path) -> None:
    """Make sure ``root`` is ours to (re)write, then mark it as in progress."""
    root.mkdir(parents=True, exist_ok=True)
    owned = (root / MARKER_FILE).exists() or (root / _IN_PROGRESS_FILE).exists()
    if not owned and any(root.iterdir()):
        raise FileExistsError(
            f"{root} is not empty and holds no synthetic dataset; refusing to write into it"
        )
    (root / _IN_PROGRESS_FILE).touch()
    # From here on, the dataset is incomplete until the marker is written again.
    (root / MARKER_FILE).unlink(missing_ok=True)


def _remove_stale(root: Path, folders: Iterable[str], keep: set[str]) -> None:
    """Delete clips and temp files of an earlier, different generation."""
    for folder in folders:
        directory = root / folder
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            rel = f"{folder}/{path.name}"
            stale_clip = _CLIP_NAME_RE.match(path.name) and rel not in keep
            if stale_clip or (path.name.startswith(".") and path.name.endswith(".tmp")):
                path.unlink()


def _readme(params: dict, summary: SynthSummary) -> str:
    return (
        "Synthetic Speech Commands (generated by fedkws.data.synth)\n"
        "\n"
        "Speech synthesised with espeak-ng, one voice and recording channel per\n"
        "speaker, in the on-disk layout of Google Speech Commands v0.02:\n"
        "<word>/<speaker>_nohash_<n>.wav (16 kHz mono 16-bit PCM, 1 s each),\n"
        "_background_noise_/ (synthetic noise textures) and the split lists\n"
        "validation_list.txt / testing_list.txt (speaker-hash rule).\n"
        "\n"
        # no root path and no timing: the file must not differ between runs
        f"{summary.describe(timing=False).split(chr(10), 1)[1]}\n"
        "\n"
        "Regenerate with:\n"
        f"  python -m fedkws.data.synth --root <dir> --speakers {params['num_speakers']}"
        f" --utterances {params['utterances_per_word']} --seed {params['seed']}"
        f" --noise-seconds {params['noise_seconds']:g}\n"
        f"{MARKER_FILE} is written last: without it the folder is incomplete.\n"
    )


def generate(
    root: Path | str,
    num_speakers: int = DEFAULT_SPEAKERS,
    utterances_per_word: int = DEFAULT_UTTERANCES,
    seed: int = DEFAULT_SEED,
    words: Sequence[str] = WORDS_V2,
    noise_seconds: float = DEFAULT_NOISE_SECONDS,
    progress: bool = True,
) -> SynthSummary:
    """Write a synthetic Speech Commands dataset to ``root``.

    Parameters
    ----------
    root
        Output folder. It is created if missing; an existing folder must be
        empty or hold an earlier (complete or interrupted) synthetic dataset,
        whose files are replaced.
    num_speakers
        Number of distinct speakers (at least 3); about 80/10/10 % of them go
        to training/validation/testing.
    utterances_per_word
        Recordings per speaker and word.
    seed
        Non-negative seed; the same seed and sizes give byte-identical files.
    words
        Words to record (default: the 35 words of v0.02).
    noise_seconds
        Length of each background-noise file.
    progress
        Show a progress bar.

    Returns
    -------
    SynthSummary
        Counts, bytes on disk and wall time.

    Raises
    ------
    ValueError
        For invalid sizes or seed.
    FileExistsError
        If ``root`` is a non-empty folder that is not a synthetic dataset.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if utterances_per_word < 1:
        raise ValueError(f"utterances_per_word must be >= 1, got {utterances_per_word}")
    if noise_seconds <= 0:
        raise ValueError(f"noise_seconds must be positive, got {noise_seconds}")
    words = tuple(words)
    if not words or len(set(words)) != len(words):
        raise ValueError("words must be a non-empty sequence without duplicates")
    start_time = time.perf_counter()
    root = Path(root)
    speaker_ids = choose_speaker_ids(seed, num_speakers)
    engine = Espeak.get()
    accents, variants = engine.accents(), engine.variants()
    speakers = [make_speaker(s, seed, accents, variants) for s in speaker_ids]
    _claim_root(root)

    num_clips = len(speakers) * len(words) * utterances_per_word
    written: list[str] = []
    total_bytes = 0
    speakers_per_split = {"training": 0, "validation": 0, "testing": 0}
    clips_per_split = dict.fromkeys(speakers_per_split, 0)
    for word in words:
        (root / word).mkdir(exist_ok=True)
    (root / BACKGROUND_NOISE_DIR).mkdir(exist_ok=True)

    from fedkws.progress import progress_bar

    total = num_clips + len(NOISE_FILES)
    with progress_bar("synthesising speech and noise", total, enabled=progress) as advance:
        with engine.lock:
            for speaker in speakers:
                split = which_set(f"{speaker.speaker_id}_nohash_0.wav")
                speakers_per_split[split] += 1
                for word in words:
                    engine.reset()
                    for n in range(utterances_per_word):
                        clip = render_utterance(engine, speaker, word, n, seed)
                        rel = f"{word}/{speaker.speaker_id}_nohash_{n}.wav"
                        total_bytes += _write_wav(root / rel, clip)
                        written.append(rel)
                        clips_per_split[split] += 1
                    advance(utterances_per_word)
        for name in NOISE_FILES:
            noise = make_noise(name, noise_seconds, seed)
            pcm = np.round(noise * 32767.0).astype(np.int16)
            total_bytes += _write_wav(root / BACKGROUND_NOISE_DIR / name, pcm)
            advance(1)

    _remove_stale(root, sorted(set(WORDS_V2) | set(words)), set(written))
    lists = {"validation": [], "testing": []}
    for rel in sorted(written):
        split = which_set(rel, _VALIDATION_PCT, _TESTING_PCT)
        if split in lists:
            lists[split].append(rel)
    for split, lines in lists.items():
        _write_text(root / f"{split}_list.txt", "".join(f"{line}\n" for line in lines))

    summary = SynthSummary(
        root=str(root),
        seed=seed,
        num_speakers=len(speakers),
        utterances_per_word=utterances_per_word,
        num_words=len(words),
        num_clips=num_clips,
        num_noise_files=len(NOISE_FILES),
        speakers_per_split=speakers_per_split,
        clips_per_split=clips_per_split,
        bytes_on_disk=total_bytes,
    )
    params = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "seed": seed,
        "num_speakers": num_speakers,
        "utterances_per_word": utterances_per_word,
        "words": list(words),
        "noise_seconds": float(noise_seconds),
        "num_clips": num_clips,
        "speakers_per_split": speakers_per_split,
        "clips_per_split": clips_per_split,
        "espeak_ng": engine.version,
        "reproducible": engine.reproducible,
    }
    summary.seconds = time.perf_counter() - start_time
    _write_text(root / README_FILE, _readme(params, summary))
    # The marker goes last: its presence means every file above is final.
    _write_text(root / MARKER_FILE, json.dumps(params, indent=2, sort_keys=True) + "\n")
    (root / _IN_PROGRESS_FILE).unlink(missing_ok=True)
    summary.seconds = time.perf_counter() - start_time
    return summary


def speaker_profiles(seed: int, num_speakers: int) -> list[SpeakerProfile]:
    """The speakers :func:`generate` would create, for inspection."""
    return [make_speaker(s, seed) for s in choose_speaker_ids(seed, num_speakers)]


def main_generate(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m fedkws.data.synth --root DIR ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m fedkws.data.synth",
        description="Generate the synthetic Speech Commands dataset.",
    )
    parser.add_argument("--root", required=True, type=Path, help="output folder")
    parser.add_argument("--speakers", type=int, default=DEFAULT_SPEAKERS)
    parser.add_argument("--utterances", type=int, default=DEFAULT_UTTERANCES)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--noise-seconds", type=float, default=DEFAULT_NOISE_SECONDS)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    summary = generate(
        args.root,
        num_speakers=args.speakers,
        utterances_per_word=args.utterances,
        seed=args.seed,
        noise_seconds=args.noise_seconds,
        progress=not args.no_progress,
    )
    print(summary.describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main_generate())
