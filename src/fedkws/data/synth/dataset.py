"""Writing the synthetic dataset: :func:`generate`, its marker files and its checks."""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from fedkws.data.audio import SAMPLE_RATE
from fedkws.data.speech_commands import BACKGROUND_NOISE_DIR, WORDS_V2, which_set
from fedkws.data.synth.noise import NOISE_FILES, make_noise
from fedkws.data.synth.render import render_utterance
from fedkws.data.synth.speakers import (
    TESTING_PCT,
    VALIDATION_PCT,
    SpeakerProfile,
    choose_speaker_ids,
    make_speaker,
)
from fedkws.data.synth.voice import Espeak
from fedkws.fileio import file_lock, write_text, write_with

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

# Marks a root that generate() owns while it is being (re)written; a root
# that has neither this nor the marker is someone else's folder.
_IN_PROGRESS_FILE = ".fedkws_synth_in_progress"
_CLIP_NAME_RE = re.compile(r"^[0-9a-f]{8}_nohash_\d+\.wav$")
_SPLITS = ("training", "validation", "testing")


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


def lock_path(root: Path | str) -> Path:
    """The lock file that serialises writers of ``root`` (beside it, in its parent)."""
    root = Path(root).absolute()
    return root.parent / f".{root.name}.lock"


def _write_wav(path: Path, data: np.ndarray) -> int:
    """Write 16-bit PCM atomically; return the size in bytes."""
    write_with(
        path, lambda tmp: sf.write(str(tmp), data, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    )
    return path.stat().st_size


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


@dataclass
class _Tally:
    """What the writing steps of :func:`generate` have written so far."""

    written: list[str] = field(default_factory=list)
    total_bytes: int = 0
    speakers_per_split: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_SPLITS, 0))
    clips_per_split: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_SPLITS, 0))


def _check_arguments(
    seed: int, utterances_per_word: int, noise_seconds: float, words: tuple[str, ...]
) -> None:
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if utterances_per_word < 1:
        raise ValueError(f"utterances_per_word must be >= 1, got {utterances_per_word}")
    if noise_seconds <= 0:
        raise ValueError(f"noise_seconds must be positive, got {noise_seconds}")
    if not words or len(set(words)) != len(words):
        raise ValueError("words must be a non-empty sequence without duplicates")


def _write_clips(
    root: Path,
    engine: Espeak,
    speakers: Sequence[SpeakerProfile],
    words: Sequence[str],
    utterances_per_word: int,
    seed: int,
    advance: Callable[[int], object],
    tally: _Tally,
) -> None:
    """Render and write every (speaker, word, utterance) clip."""
    for word in words:
        (root / word).mkdir(exist_ok=True)
    with engine.lock:
        for speaker in speakers:
            split = which_set(f"{speaker.speaker_id}_nohash_0.wav")
            tally.speakers_per_split[split] += 1
            for word in words:
                # A fresh synthesiser per (speaker, word): see the package docstring.
                engine.reset()
                for n in range(utterances_per_word):
                    clip = render_utterance(engine, speaker, word, n, seed)
                    rel = f"{word}/{speaker.speaker_id}_nohash_{n}.wav"
                    tally.total_bytes += _write_wav(root / rel, clip)
                    tally.written.append(rel)
                    tally.clips_per_split[split] += 1
                advance(utterances_per_word)


def _write_noise(
    root: Path, noise_seconds: float, seed: int, advance: Callable[[int], object], tally: _Tally
) -> None:
    """Write the background-noise recordings."""
    (root / BACKGROUND_NOISE_DIR).mkdir(exist_ok=True)
    for name in NOISE_FILES:
        noise = make_noise(name, noise_seconds, seed)
        pcm = np.round(noise * 32767.0).astype(np.int16)
        tally.total_bytes += _write_wav(root / BACKGROUND_NOISE_DIR / name, pcm)
        advance(1)


def _write_split_lists(root: Path, written: Iterable[str]) -> None:
    """``validation_list.txt`` and ``testing_list.txt``, as in the real dataset."""
    lists: dict[str, list[str]] = {"validation": [], "testing": []}
    for rel in sorted(written):
        split = which_set(rel, VALIDATION_PCT, TESTING_PCT)
        if split in lists:
            lists[split].append(rel)
    for split, lines in lists.items():
        write_text(root / f"{split}_list.txt", "".join(f"{line}\n" for line in lines))


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


def _finish(root: Path, params: dict, summary: SynthSummary, start_time: float) -> None:
    """Write the README, then the marker: its presence means every file is final."""
    summary.seconds = time.perf_counter() - start_time
    write_text(root / README_FILE, _readme(params, summary))
    write_text(root / MARKER_FILE, json.dumps(params, indent=2, sort_keys=True) + "\n")
    (root / _IN_PROGRESS_FILE).unlink(missing_ok=True)
    summary.seconds = time.perf_counter() - start_time


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

    Writers of the same ``root`` are serialised by a lock file beside it
    (:func:`lock_path`): a second process waits, then rewrites the same
    bytes. To reuse a finished dataset instead, check :func:`is_complete`
    while holding the lock (as :func:`fedkws.data.pipeline.ensure_dataset` does).

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
    words = tuple(words)
    _check_arguments(seed, utterances_per_word, noise_seconds, words)
    start_time = time.perf_counter()
    root = Path(root)
    speaker_ids = choose_speaker_ids(seed, num_speakers)
    engine = Espeak.get()
    accents, variants = engine.accents(), engine.variants()
    speakers = [make_speaker(s, seed, accents, variants) for s in speaker_ids]
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(lock_path(root)):
        return _generate_locked(
            root, engine, speakers, words, utterances_per_word, seed, noise_seconds, progress,
            start_time,
        )  # fmt: skip


def _generate_locked(
    root: Path,
    engine: Espeak,
    speakers: list[SpeakerProfile],
    words: tuple[str, ...],
    utterances_per_word: int,
    seed: int,
    noise_seconds: float,
    progress: bool,
    start_time: float,
) -> SynthSummary:
    from fedkws.progress import progress_bar

    _claim_root(root)
    tally = _Tally()
    num_clips = len(speakers) * len(words) * utterances_per_word
    total = num_clips + len(NOISE_FILES)
    with progress_bar("synthesising speech and noise", total, enabled=progress) as advance:
        _write_clips(root, engine, speakers, words, utterances_per_word, seed, advance, tally)
        _write_noise(root, noise_seconds, seed, advance, tally)
    _remove_stale(root, sorted(set(WORDS_V2) | set(words)), set(tally.written))
    _write_split_lists(root, tally.written)
    summary = SynthSummary(
        root=str(root),
        seed=seed,
        num_speakers=len(speakers),
        utterances_per_word=utterances_per_word,
        num_words=len(words),
        num_clips=num_clips,
        num_noise_files=len(NOISE_FILES),
        speakers_per_split=tally.speakers_per_split,
        clips_per_split=tally.clips_per_split,
        bytes_on_disk=tally.total_bytes,
    )
    params = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "seed": seed,
        "num_speakers": len(speakers),
        "utterances_per_word": utterances_per_word,
        "words": list(words),
        "noise_seconds": float(noise_seconds),
        "num_clips": num_clips,
        "speakers_per_split": tally.speakers_per_split,
        "clips_per_split": tally.clips_per_split,
        "espeak_ng": engine.version,
        "reproducible": engine.reproducible,
    }
    _finish(root, params, summary, start_time)
    return summary


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
