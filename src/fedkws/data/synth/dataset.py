"""Writing the synthetic dataset: :func:`generate`, its marker files and its checks."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import EllipsisType
from typing import Any

import numpy as np
import soundfile as sf

from fedkws.data.audio import SAMPLE_RATE
from fedkws.data.speech_commands import BACKGROUND_NOISE_DIR, OTHER_WORDS_V2, WORDS_V2, which_set
from fedkws.data.synth.noise import NOISE_FILES, make_noise
from fedkws.data.synth.plan import SpeakerPlan, SynthPlan, check_plan_arguments, plan_dataset
from fedkws.data.synth.render import render_utterance
from fedkws.data.synth.speakers import (
    TESTING_PCT,
    VALIDATION_PCT,
    SpeakerProfile,
    held_out_allowed,
    held_out_count,
    make_speaker,
    max_held_out,
)
from fedkws.data.synth.voice import Espeak
from fedkws.fileio import file_lock, write_text, write_with

# The default embedded dataset (conf/dataset/synthetic.yaml), sized so that
# held-out accuracies resolve differences of about 3 points: 60 speakers in
# each of validation and testing (240 in training), every speaker saying each
# command word twice and 3 of the other 25 words once. Under the 12-class
# protocol that is 1,440 examples in each held-out split (1,200 command words,
# 120 silence, 120 unknown) and 5,760 in training; 8,280 clips in all.
DEFAULT_SPEAKERS = 360
DEFAULT_HELD_OUT_SPEAKERS = 60
DEFAULT_UTTERANCES = 2
DEFAULT_UNKNOWN_WORDS = 3
DEFAULT_SEED = 0
# Long enough that each split's time range of every file (silence slices are
# drawn per split from disjoint ranges) spans many seconds.
DEFAULT_NOISE_SECONDS = 120.0

MARKER_FILE = "fedkws_synth.json"
README_FILE = "README.txt"
FORMAT_NAME = "fedkws-synth"
# 2: held-out speaker count and non-command words per speaker are parameters.
FORMAT_VERSION = 2

# Marks a root that generate() owns while it is being (re)written; a root
# that has neither this nor the marker is someone else's folder.
_IN_PROGRESS_FILE = ".fedkws_synth_in_progress"
_CLIP_NAME_RE = re.compile(r"^[0-9a-f]{8}_nohash_\d+\.wav$")


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
    unknown_words: int | None = None
    # examples per split under the 12-class protocol (10 % silence, 10 % unknown)
    examples_per_split: dict[str, int] = field(default_factory=dict)
    workers: int = 1

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
        if self.unknown_words is None:
            layout = f"{self.num_words} words x {self.utterances_per_word} utterances"
        else:
            layout = (
                f"(10 command words x {self.utterances_per_word} utterances"
                f" + {self.unknown_words} of the other words x 1)"
            )
        examples = ", ".join(
            f"{s} {self.examples_per_split.get(s, 0)}"
            for s in ("training", "validation", "testing")
        )
        return (
            f"Synthetic Speech Commands at {self.root}\n"
            f"  {self.num_clips} clips = {self.num_speakers} speakers x {layout},"
            f" {self.num_noise_files} noise files\n"
            f"  {splits}\n"
            f"  12-class examples: {examples}\n"
            f"  {self.bytes_on_disk / 1e6:.1f} MB, seed {self.seed}"
        ) + (
            f", {self.seconds:.1f} s on {self.workers} process{'es' if self.workers != 1 else ''}"
            f" ({self.ms_per_clip:.1f} ms/clip)"
            if timing
            else ""
        )

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
    held_out_speakers: int | None | EllipsisType = ...,
    unknown_words: int | None | EllipsisType = ...,
) -> bool:
    """Whether ``root`` holds a finished dataset generated with these parameters.

    Parameters left as None are not compared, except ``held_out_speakers`` and
    ``unknown_words``, for which None is a value (as in :func:`generate`) and
    ``...`` (the default) means not compared.
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
    if not all(v is None or marker.get(k) == v for k, v in expected.items()):
        return False
    if unknown_words is not ... and marker.get("unknown_words", ...) != unknown_words:
        return False
    if held_out_speakers is not ...:
        if held_out_speakers is None:
            # the 10 % rule: compare the count it gives for the marker's speakers
            held_out_speakers = held_out_count(int(marker.get("num_speakers", 0)))
        if marker.get("held_out_speakers") != held_out_speakers:
            return False
    return True


# generate()'s parameters by the dataset.generate key a user sets
_CONFIG_KEYS = {"num_speakers": "speakers", "utterances_per_word": "utterances", "seed": "seed",
                "noise_seconds": "noise_seconds", "held_out_speakers": "held_out_speakers",
                "unknown_words": "unknown_words"}  # fmt: skip


def other_settings(root: Path | str, **params: Any) -> list[str] | None:
    """How the finished dataset at ``root`` differs from ``params`` (:func:`config_params`).

    None when ``root`` holds no finished dataset of this format (nothing, an interrupted
    generation, an older format: fedkws's to rewrite); else the differing
    ``dataset.generate`` keys with the value the dataset was generated with (empty: none).
    """
    marker = read_marker(root)
    if marker is None or marker.get("version") != FORMAT_VERSION:
        return None
    if (Path(root) / _IN_PROGRESS_FILE).exists():
        return None

    def shown(value: Any) -> str:
        return "null" if value is None else repr(value)

    return [f"dataset.generate.{_CONFIG_KEYS[key]}={shown(marker.get(key))} there, "
            f"{shown(value)} asked"
            for key, value in params.items()
            if key in _CONFIG_KEYS and not is_complete(root, **{key: value})]  # fmt: skip


def config_params(generate: Mapping) -> dict:
    """Arguments of :func:`generate` / :func:`is_complete` from a ``dataset.generate`` config.

    Keys: ``speakers``, ``utterances``, ``seed``, ``noise_seconds`` and the
    optional ``held_out_speakers`` and ``unknown_words`` (absent or null: the
    10 % speaker rule and every word, as :func:`generate` defaults).
    """

    def optional_int(key: str) -> int | None:
        value = generate.get(key)
        return None if value is None else int(value)

    params = dict(
        num_speakers=int(generate["speakers"]),
        utterances_per_word=int(generate["utterances"]),
        seed=int(generate["seed"]),
        noise_seconds=float(generate.get("noise_seconds", DEFAULT_NOISE_SECONDS)),
        held_out_speakers=optional_int("held_out_speakers"),
        unknown_words=optional_int("unknown_words"),
    )
    held_out, speakers = params["held_out_speakers"], params["num_speakers"]
    from fedkws.data.errors import DataError

    if speakers < 3:
        raise DataError(
            f"dataset.generate.speakers={speakers}: at least 3 (one each for training, "
            "validation and testing)"
        )
    if held_out is not None and not 1 <= held_out <= max_held_out(speakers):
        raise DataError(
            f"dataset.generate.held_out_speakers={held_out} leaves no training speaker with "
            f"dataset.generate.speakers={speakers}; allowed: {held_out_allowed(speakers)} "
            f"(at least {2 * held_out + 1} speakers for {held_out}), or null for 10 %"
        )
    return params


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
            f"{root} is not empty and holds no synthetic dataset (no {MARKER_FILE}); refusing "
            "to write into it: give another folder, or delete this one if it is a synthetic "
            "dataset whose marker was lost, to generate it again"
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


def _check_arguments(noise_seconds: float, workers: int | None) -> None:
    if noise_seconds <= 0:
        raise ValueError(f"noise_seconds must be positive, got {noise_seconds}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1 or None, got {workers}")


def _render_speaker(root: Path, speaker: SpeakerProfile, plan: SpeakerPlan, seed: int) -> int:
    """Render and write one speaker's clips; return the bytes written.

    Runs in a worker process (or in the caller's with one worker).
    """
    engine = Espeak.get()
    total = 0
    with engine.lock:
        for word, count in plan.takes:
            # A fresh synthesiser per (speaker, word): see the package docstring.
            engine.reset()
            for n in range(count):
                clip = render_utterance(engine, speaker, word, n, seed)
                total += _write_wav(root / f"{word}/{speaker.speaker_id}_nohash_{n}.wav", clip)
    return total


def _render_noise(root: Path, name: str, noise_seconds: float, seed: int) -> int:
    """Write one background-noise recording; return its size in bytes."""
    noise = make_noise(name, noise_seconds, seed)
    pcm = np.round(noise * 32767.0).astype(np.int16)
    return _write_wav(root / BACKGROUND_NOISE_DIR / name, pcm)


def _run_task(task: tuple) -> int:
    kind, *args = task
    return _render_noise(*args) if kind == "noise" else _render_speaker(*args)


def default_workers() -> int:
    """Worker processes :func:`generate` uses by default: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _start_pool(workers: int):
    """A pool of forked worker processes, or None to render in this process.

    Fork, not spawn: spawned children re-import the caller's main script, which
    runs it again unless it has an ``if __name__ == "__main__"`` guard. The
    workers only run NumPy, SciPy, libsndfile and espeak-ng (no OpenMP), and
    the pool is started before the progress bar's thread.
    """
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return None
    # Until a worker has its own handlers, the parent's would catch a SIGTERM meant to end
    # it: the workers start with SIGINT and SIGTERM blocked (held until then), not handled.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        return multiprocessing.get_context("fork").Pool(
            workers, initializer=_worker_signals, initargs=(os.getpid(), mask)
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _worker_signals(parent: int, mask: set) -> None:
    """A worker hears only its parent: it ends on the SIGTERM of ``Pool.terminate``.

    Forked workers inherit the parent's handlers. Under ``fedkws-train`` those only
    ask the run to stop (:mod:`fedkws.lifecycle`): a worker would outlive the
    SIGTERM, and ``terminate()`` would wait for it forever. A process group of its
    own keeps a worker out of signals sent to the whole group (a terminal's Ctrl-C,
    ``timeout``): those are the parent's to handle, and a worker killed mid-task
    would leave the pool waiting for a result that never comes.
    """
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _end_with(parent)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _end_with(parent: int) -> None:
    """Have the kernel send this process SIGTERM when ``parent`` ends (Linux), killed or not.

    Out of the parent's process group, a worker would otherwise outlive a parent
    killed with SIGKILL, waiting for tasks that never come.
    """
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: no such call
        return
    if os.getppid() != parent:  # the parent ended before the call
        os._exit(1)


def _write_all(
    root: Path,
    plan: SynthPlan,
    speakers: Sequence[SpeakerProfile],
    noise_seconds: float,
    pool,
    advance: Callable[[int], object],
) -> int:
    """Write every clip and noise file, in ``pool`` if given; return the bytes written.

    Each file depends only on the seed and its own (speaker, word, utterance)
    or noise name, never on which process wrote it or when: the output is
    the same for any number of workers.
    """
    (root / BACKGROUND_NOISE_DIR).mkdir(exist_ok=True)
    for word in {w for s in plan.speakers for w, _ in s.takes}:
        (root / word).mkdir(exist_ok=True)
    # Noise first: a few long tasks are best started early.
    tasks = [("noise", root, name, noise_seconds, plan.seed) for name in NOISE_FILES]
    tasks += [
        ("speaker", root, profile, speaker, plan.seed)
        for profile, speaker in zip(speakers, plan.speakers, strict=True)
    ]
    sizes = [1] * len(NOISE_FILES) + [sum(c for _, c in s.takes) for s in plan.speakers]
    results = map(_run_task, tasks) if pool is None else pool.imap(_run_task, tasks)
    total = 0
    for nbytes, size in zip(results, sizes, strict=True):
        total += nbytes
        advance(size)
    return total


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
        f" --noise-seconds {params['noise_seconds']:g}"
        f" --held-out-speakers {params['held_out_speakers']}"
        + (
            " --all-words"
            if params["unknown_words"] is None
            else f" --unknown-words {params['unknown_words']}"
        )
        + "\n"
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
    held_out_speakers: int | None = None,
    unknown_words: int | None = None,
    workers: int | None = None,
) -> SynthSummary:
    """Write a synthetic Speech Commands dataset to ``root``.

    Writers of the same ``root`` are serialised by a lock file beside it
    (:func:`lock_path`): a second process waits, then rewrites the same
    bytes. To reuse a finished dataset instead, check :func:`is_complete`
    while holding the lock (as :func:`fedkws.data.pipeline.ensure_dataset` does).

    The default embedded dataset is ``generate(root, **config_params(DEFAULT_GENERATE))``;
    the defaults of ``held_out_speakers`` and ``unknown_words`` here give the
    complete layout (10 % of the speakers per held-out split, every word).

    Parameters
    ----------
    root
        Output folder. It is created if missing; an existing folder must be
        empty or hold an earlier (complete or interrupted) synthetic dataset,
        whose files are replaced.
    num_speakers
        Number of distinct speakers (at least 3).
    utterances_per_word
        Recordings per speaker of each command word (of every word when
        ``unknown_words`` is None).
    seed
        Non-negative seed; the same seed and sizes give byte-identical files.
    words
        Words to record (default: the 35 words of v0.02).
    noise_seconds
        Length of each background-noise file.
    progress
        Show a progress bar.
    held_out_speakers
        Speakers in each of validation and testing; None: ``round(10 %)`` of
        ``num_speakers`` (at least one).
    unknown_words
        How many of the non-command words each speaker records (once each,
        in rotation, see :mod:`fedkws.data.synth.plan`); None: every word,
        ``utterances_per_word`` times (needed for ``protocol=35class``).
    workers
        Processes that render; None: every CPU this process may use. The
        files do not depend on it.

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
    check_plan_arguments(seed, utterances_per_word, words, unknown_words)
    _check_arguments(noise_seconds, workers)
    start_time = time.perf_counter()
    root = Path(root)
    plan = plan_dataset(
        num_speakers, utterances_per_word, seed, words, held_out_speakers, unknown_words
    )
    engine = Espeak.get()
    accents, variants = engine.accents(), engine.variants()
    speakers = [make_speaker(s.speaker_id, seed, accents, variants) for s in plan.speakers]
    if workers is None:
        workers = default_workers()
    if multiprocessing.current_process().daemon:
        workers = 1  # a daemonic process may not start children
    workers = max(1, min(workers, len(plan.speakers)))
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(lock_path(root)):
        return _generate_locked(
            root, engine, plan, speakers, noise_seconds, progress, workers, start_time
        )


def _render(
    root: Path,
    plan: SynthPlan,
    speakers: list[SpeakerProfile],
    noise_seconds: float,
    workers: int,
    progress: bool,
) -> tuple[int, int]:
    """Write every clip and noise file, with a progress bar; the bytes and processes used."""
    from fedkws.progress import progress_bar

    total = len(plan.clips) + len(NOISE_FILES)
    pool = _start_pool(workers)
    try:
        with progress_bar("synthesising speech and noise", total, enabled=progress) as advance:
            total_bytes = _write_all(root, plan, speakers, noise_seconds, pool, advance)
    except BaseException:
        if pool is not None:  # an error or a second Ctrl-C: end the workers where they are
            pool.terminate()
            pool.join()
        raise
    if pool is None:
        return total_bytes, 1
    pool.close()  # every result is in: the workers leave when the queue tells them
    pool.join()
    return total_bytes, workers


def _generate_locked(
    root: Path,
    engine: Espeak,
    plan: SynthPlan,
    speakers: list[SpeakerProfile],
    noise_seconds: float,
    progress: bool,
    workers: int,
    start_time: float,
) -> SynthSummary:
    _claim_root(root)
    clips = plan.clips
    total_bytes, workers = _render(root, plan, speakers, noise_seconds, workers, progress)
    _remove_stale(root, sorted(set(WORDS_V2) | set(plan.words)), set(clips))
    _write_split_lists(root, clips)
    counts = plan.protocol_counts()
    summary = SynthSummary(
        root=str(root),
        seed=plan.seed,
        num_speakers=len(speakers),
        utterances_per_word=plan.utterances_per_word,
        num_words=len(plan.words),
        num_clips=len(clips),
        num_noise_files=len(NOISE_FILES),
        speakers_per_split=plan.speakers_per_split(),
        clips_per_split=plan.clips_per_split(),
        bytes_on_disk=total_bytes,
        unknown_words=plan.unknown_words,
        examples_per_split={split: c["total"] for split, c in counts.items()},
        workers=workers,
    )
    params = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "seed": plan.seed,
        "num_speakers": len(speakers),
        "utterances_per_word": plan.utterances_per_word,
        "words": list(plan.words),
        "noise_seconds": float(noise_seconds),
        "held_out_speakers": plan.held_out_speakers,
        "unknown_words": plan.unknown_words,
        "num_clips": len(clips),
        "speakers_per_split": summary.speakers_per_split,
        "clips_per_split": summary.clips_per_split,
        "examples_12class_per_split": summary.examples_per_split,
        "espeak_ng": engine.version,
        "reproducible": engine.reproducible,
    }
    _finish(root, params, summary, start_time)
    return summary


def main_generate(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m fedkws.data.synth --root DIR ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m fedkws.data.synth",
        description="Generate the synthetic Speech Commands dataset "
        "(defaults: the default embedded dataset, conf/dataset/synthetic.yaml).",
    )
    add_generate_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    summary = generate(args.root, progress=not args.no_progress, **arguments_params(args))
    print(summary.describe())
    return 0


def add_generate_arguments(
    parser: argparse.ArgumentParser, types: Mapping[str, Callable[[str], Any]] | None = None
) -> None:
    """The generator's options: ``python -m fedkws.data.synth`` and ``fedkws generate``.

    ``types``: the argparse ``type`` of an option by its destination (``root``,
    ``speakers``, ...), e.g. ``fedkws generate``'s range checks; default: ``Path``,
    ``int`` or ``float``.
    """
    types = dict(types or {})
    parser.add_argument("--root", type=types.get("root", Path), required=True, help="output folder")
    parser.add_argument("--speakers", type=types.get("speakers", int), default=DEFAULT_SPEAKERS)
    parser.add_argument(
        "--utterances", type=types.get("utterances", int), default=DEFAULT_UTTERANCES
    )
    parser.add_argument("--seed", type=types.get("seed", int), default=DEFAULT_SEED)
    parser.add_argument(
        "--noise-seconds", type=types.get("noise_seconds", float), default=DEFAULT_NOISE_SECONDS
    )
    parser.add_argument(
        "--held-out-speakers",
        type=types.get("held_out_speakers", int),
        default=None,  # None: not given (DEFAULT_HELD_OUT_SPEAKERS; see arguments_params)
        help=f"speakers in each of validation and testing (default "
        f"{DEFAULT_HELD_OUT_SPEAKERS}; 0: 10%% of --speakers)",
    )
    words = parser.add_mutually_exclusive_group()
    words.add_argument(
        "--unknown-words",
        type=types.get("unknown_words", int),
        default=None,  # None, not the default count: argparse then refuses it with --all-words
        help=f"non-command words each speaker records once (default {DEFAULT_UNKNOWN_WORDS}, "
        f"at most {len(OTHER_WORDS_V2)})",
    )
    words.add_argument(
        "--all-words",
        action="store_true",
        help="every speaker says all 35 words --utterances times (for protocol=35class)",
    )
    parser.add_argument(
        "--workers",
        type=types.get("workers", int),
        default=None,
        help="rendering processes (default: every CPU)",
    )


def arguments_params(args: argparse.Namespace) -> dict:
    """Keyword arguments of :func:`generate` from :func:`add_generate_arguments`' options.

    An option not given (None) takes its default; ``--held-out-speakers 0`` is 10 %.
    """
    held_out, unknown = args.held_out_speakers, args.unknown_words
    held_out = DEFAULT_HELD_OUT_SPEAKERS if held_out is None else held_out
    unknown = DEFAULT_UNKNOWN_WORDS if unknown is None else unknown
    return dict(
        num_speakers=args.speakers,
        utterances_per_word=args.utterances,
        seed=args.seed,
        noise_seconds=args.noise_seconds,
        held_out_speakers=held_out or None,
        unknown_words=None if args.all_words else unknown,
        workers=args.workers,
    )


# The ``dataset.generate`` block of conf/dataset/synthetic.yaml.
DEFAULT_GENERATE = {
    "speakers": DEFAULT_SPEAKERS,
    "utterances": DEFAULT_UTTERANCES,
    "seed": DEFAULT_SEED,
    "noise_seconds": DEFAULT_NOISE_SECONDS,
    "held_out_speakers": DEFAULT_HELD_OUT_SPEAKERS,
    "unknown_words": DEFAULT_UNKNOWN_WORDS,
}
