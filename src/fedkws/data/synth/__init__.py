"""The embedded default dataset: synthesised speech laid out like Speech Commands.

:func:`generate` writes ``<root>/<word>/<8-hex speaker>_nohash_<n>.wav`` for
words of Speech Commands v0.02, six background-noise recordings in
``_background_noise_/`` and the official ``validation_list.txt`` /
``testing_list.txt``, so every reader of the real dataset reads it unchanged.
Every speaker says each of the ten command words; of the other 25 words the
default dataset records only what the 12-class protocol's ``_unknown_`` class
draws (a few per speaker, in rotation; :mod:`fedkws.data.synth.plan`), and
``unknown_words=None`` records all of them (for ``protocol=35class``).

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
utterances never changes existing clips. Speakers are rendered in parallel
worker processes (``workers``, default every CPU); since no clip depends on
what else a process rendered, the files are the same for any worker count.

Splits
------
The split of a file is decided, as in the real dataset, by hashing the
speaker id (:func:`fedkws.data.speech_commands.which_set`). With a few dozen
speakers a pure hash can leave the validation or testing split empty, so
speaker ids are drawn deterministically from the seed and kept only while
their split still needs speakers: the result has ``held_out_speakers`` (by
default ``round(10 %)``, at least one) speakers in each held-out split and the
rest in training, and the split lists agree with ``which_set`` by
construction. The default dataset asks for 60 held-out speakers per split out
of 360, so that validation and testing hold 1,440 examples each under the
12-class protocol.

Background noise is long (120 s per file by default) because
:func:`fedkws.data.speech_commands.build_index` draws each split's silence
from its own time range of every file (training first, then validation,
then testing; :func:`fedkws.data.speech_commands.silence_ranges`).

Modules
-------
``voice``     espeak-ng through ctypes (:class:`Espeak`)
``speakers``  speaker ids, voices and recording channels (:func:`make_speaker`)
``plan``      which speaker records which clip, by split (:func:`plan_dataset`)
``render``    one utterance in a one-second clip (:func:`render_utterance`)
``noise``     the background-noise recordings (:func:`make_noise`)
``dataset``   writing, markers and checks (:func:`generate`, :func:`is_complete`)
"""

from fedkws.data.synth.dataset import (
    DEFAULT_GENERATE,
    DEFAULT_HELD_OUT_SPEAKERS,
    DEFAULT_NOISE_SECONDS,
    DEFAULT_SEED,
    DEFAULT_SPEAKERS,
    DEFAULT_UNKNOWN_WORDS,
    DEFAULT_UTTERANCES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MARKER_FILE,
    README_FILE,
    SynthSummary,
    add_generate_arguments,
    arguments_params,
    config_params,
    default_workers,
    generate,
    is_complete,
    lock_path,
    main_generate,
    other_settings,
    read_marker,
)
from fedkws.data.synth.noise import NOISE_FILES, make_noise
from fedkws.data.synth.plan import SpeakerPlan, SynthPlan, plan_dataset
from fedkws.data.synth.render import render_utterance
from fedkws.data.synth.speakers import (
    SpeakerProfile,
    choose_speaker_ids,
    held_out_allowed,
    held_out_count,
    make_speaker,
    max_held_out,
    speaker_profiles,
)
from fedkws.data.synth.voice import Espeak

__all__ = [
    "DEFAULT_GENERATE",
    "DEFAULT_HELD_OUT_SPEAKERS",
    "DEFAULT_NOISE_SECONDS",
    "DEFAULT_SEED",
    "DEFAULT_SPEAKERS",
    "DEFAULT_UNKNOWN_WORDS",
    "DEFAULT_UTTERANCES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MARKER_FILE",
    "NOISE_FILES",
    "README_FILE",
    "Espeak",
    "SpeakerPlan",
    "SpeakerProfile",
    "SynthPlan",
    "SynthSummary",
    "add_generate_arguments",
    "arguments_params",
    "choose_speaker_ids",
    "config_params",
    "default_workers",
    "generate",
    "held_out_count",
    "is_complete",
    "lock_path",
    "other_settings",
    "main_generate",
    "make_noise",
    "make_speaker",
    "held_out_allowed",
    "max_held_out",
    "plan_dataset",
    "read_marker",
    "render_utterance",
    "speaker_profiles",
]
