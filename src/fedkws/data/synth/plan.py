"""What the generator writes, decided before any audio: :func:`plan_dataset`.

A plan is a pure function of the sizes and the seed. It names every speaker,
the split the speaker-hash rule puts them in, and every clip they record, so
the held-out sizes of a configuration (and the examples the 12-class protocol
draws from it) can be checked without synthesising anything.

Which clips are recorded
------------------------
Every speaker says each of the ten command words (:data:`TEN_WORDS`)
``utterances_per_word`` times. The other words of ``words`` only feed the
``_unknown_`` class, of which the 12-class protocol keeps about one example
per ten known ones; with ``unknown_words=k`` each speaker records ``k`` of
them, once each, chosen in rotation within the speaker's split so every
non-command word is said about equally often in every split. With
``unknown_words=None`` every speaker says every word ``utterances_per_word``
times (the complete layout that ``protocol=35class`` needs).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from fedkws.data.speech_commands import TEN_WORDS, WORDS_V2, which_set
from fedkws.data.synth.speakers import TESTING_PCT, VALIDATION_PCT, choose_speaker_ids

SPLITS = ("training", "validation", "testing")


@dataclass(frozen=True)
class SpeakerPlan:
    """One speaker: the split the hash rule assigns and the takes of each word."""

    speaker_id: str
    split: str
    takes: tuple[tuple[str, int], ...]  # (word, number of utterances)

    def clips(self) -> list[str]:
        """Relative paths ``<word>/<speaker>_nohash_<n>.wav`` this speaker records."""
        return [
            f"{word}/{self.speaker_id}_nohash_{n}.wav" for word, count in self.takes
            for n in range(count)
        ]  # fmt: skip


@dataclass(frozen=True)
class SynthPlan:
    """Every speaker and clip of a synthetic dataset, by split."""

    seed: int
    words: tuple[str, ...]
    utterances_per_word: int
    held_out_speakers: int  # per held-out split, resolved
    unknown_words: int | None
    speakers: tuple[SpeakerPlan, ...]

    @cached_property
    def clips(self) -> list[str]:
        """Every clip's relative path, speaker by speaker."""
        return [rel for speaker in self.speakers for rel in speaker.clips()]

    @property
    def num_clips(self) -> int:
        """Number of clips."""
        return sum(count for s in self.speakers for _, count in s.takes)

    def speakers_per_split(self) -> dict[str, int]:
        """Number of speakers in each split."""
        counts = Counter(s.split for s in self.speakers)
        return {split: counts[split] for split in SPLITS}

    def clips_per_split(self) -> dict[str, int]:
        """Number of clips in each split."""
        counts: Counter = Counter()
        for s in self.speakers:
            counts[s.split] += sum(count for _, count in s.takes)
        return {split: counts[split] for split in SPLITS}

    def word_counts(self) -> dict[str, Counter]:
        """Clips of each word in each split."""
        out: dict[str, Counter] = {split: Counter() for split in SPLITS}
        for s in self.speakers:
            for word, count in s.takes:
                out[s.split][word] += count
        return out

    def protocol_counts(
        self, silence_percentage: float = 10.0, unknown_percentage: float = 10.0
    ) -> dict[str, dict[str, int]]:
        """Examples per split under the 12-class protocol (TensorFlow ``train.py``).

        The rule of :func:`fedkws.data.speech_commands.build_index`: every
        command-word clip, plus ``ceil(known * silence_percentage / 100)``
        silence slices and ``min(pool, ceil(known * unknown_percentage / 100))``
        of the other words' clips.

        Returns
        -------
        dict
            ``{split: {"known", "silence", "unknown", "unknown_pool", "total",
            "min_per_keyword", "speakers"}}``.
        """
        out: dict[str, dict[str, int]] = {}
        words = self.word_counts()
        speakers = self.speakers_per_split()
        for split in SPLITS:
            known = sum(words[split][w] for w in TEN_WORDS)
            pool = sum(c for w, c in words[split].items() if w not in TEN_WORDS)
            silence = math.ceil(known * silence_percentage / 100)
            unknown = min(pool, math.ceil(known * unknown_percentage / 100))
            out[split] = {
                "speakers": speakers[split],
                "known": known,
                "silence": silence,
                "unknown": unknown,
                "unknown_pool": pool,
                "total": known + silence + unknown,
                "min_per_keyword": min(words[split][w] for w in TEN_WORDS),
            }
        return out


def check_plan_arguments(
    seed: int, utterances_per_word: int, words: Sequence[str], unknown_words: int | None
) -> None:
    """Raise ValueError for arguments no plan can be made of."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if utterances_per_word < 1:
        raise ValueError(f"utterances_per_word must be >= 1, got {utterances_per_word}")
    if not words or len(set(words)) != len(words):
        raise ValueError("words must be a non-empty sequence without duplicates")
    if unknown_words is not None and unknown_words < 0:
        raise ValueError(f"unknown_words must be >= 0 or None, got {unknown_words}")


def plan_dataset(
    num_speakers: int,
    utterances_per_word: int,
    seed: int,
    words: Sequence[str] = WORDS_V2,
    held_out_speakers: int | None = None,
    unknown_words: int | None = None,
) -> SynthPlan:
    """Which speakers record which clips, and in which split they land.

    Parameters
    ----------
    num_speakers
        Number of speakers (at least 3).
    utterances_per_word
        Takes of each command word per speaker (of every word when
        ``unknown_words`` is None).
    seed
        Dataset seed; it draws the speaker ids.
    words
        Words of the corpus (default: the 35 of v0.02).
    held_out_speakers
        Speakers in each of validation and testing; None: 10 % of
        ``num_speakers`` (at least one).
    unknown_words
        Non-command words each speaker records once; None: every word,
        ``utterances_per_word`` times.

    Raises
    ------
    ValueError
        For sizes no plan can be made of.
    """
    words = tuple(words)
    check_plan_arguments(seed, utterances_per_word, words, unknown_words)
    ids = choose_speaker_ids(seed, num_speakers, held_out_speakers)
    others = [w for w in words if w not in TEN_WORDS]
    per_speaker = None if unknown_words is None else min(unknown_words, len(others))
    rank: Counter = Counter()  # position of each speaker within its split
    speakers = []
    for speaker_id in ids:
        split = which_set(f"{speaker_id}_nohash_0.wav", VALIDATION_PCT, TESTING_PCT)
        if per_speaker is None:
            takes = tuple((w, utterances_per_word) for w in words)
        else:
            first = rank[split] * per_speaker
            chosen = {others[(first + j) % len(others)] for j in range(per_speaker)}
            takes = tuple(
                (w, utterances_per_word if w in TEN_WORDS else 1)
                for w in words
                if w in TEN_WORDS or w in chosen
            )
        rank[split] += 1
        speakers.append(SpeakerPlan(speaker_id, split, takes))
    held_out = sum(1 for s in speakers if s.split == "validation")
    return SynthPlan(seed, words, utterances_per_word, held_out, unknown_words, tuple(speakers))
