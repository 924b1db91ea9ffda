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

Modules
-------
``voice``     espeak-ng through ctypes (:class:`Espeak`)
``speakers``  speaker ids, voices and recording channels (:func:`make_speaker`)
``render``    one utterance in a one-second clip (:func:`render_utterance`)
``noise``     the background-noise recordings (:func:`make_noise`)
``dataset``   writing, markers and checks (:func:`generate`, :func:`is_complete`)
"""

from fedkws.data.synth.dataset import (
    DEFAULT_NOISE_SECONDS,
    DEFAULT_SEED,
    DEFAULT_SPEAKERS,
    DEFAULT_UTTERANCES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MARKER_FILE,
    README_FILE,
    SynthSummary,
    generate,
    is_complete,
    lock_path,
    main_generate,
    read_marker,
)
from fedkws.data.synth.noise import NOISE_FILES, make_noise
from fedkws.data.synth.render import render_utterance
from fedkws.data.synth.speakers import (
    SpeakerProfile,
    choose_speaker_ids,
    make_speaker,
    speaker_profiles,
)
from fedkws.data.synth.voice import Espeak

__all__ = [
    "DEFAULT_NOISE_SECONDS",
    "DEFAULT_SEED",
    "DEFAULT_SPEAKERS",
    "DEFAULT_UTTERANCES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MARKER_FILE",
    "NOISE_FILES",
    "README_FILE",
    "Espeak",
    "SpeakerProfile",
    "SynthSummary",
    "choose_speaker_ids",
    "generate",
    "is_complete",
    "lock_path",
    "main_generate",
    "make_noise",
    "make_speaker",
    "read_marker",
    "render_utterance",
    "speaker_profiles",
]
