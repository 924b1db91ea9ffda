"""Google Speech Commands (v0.01 / v0.02) as distributed on disk.

Layout: ``<root>/<word>/<8-hex speaker>_nohash_<n>.wav``, background noise in
``<root>/_background_noise_/``, official split lists ``validation_list.txt``
and ``testing_list.txt``. The same code reads the embedded synthetic dataset,
which is written in exactly this layout.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from fedkws.data.audio import CLIP_SAMPLES
from fedkws.data.errors import DataError, DatasetNotFoundError, check_folder

log = logging.getLogger(__name__)

# The 30 words of v0.01; v0.02 adds five more.
WORDS_V1 = (
    "bed", "bird", "cat", "dog", "down", "eight", "five", "four", "go", "happy",
    "house", "left", "marvin", "nine", "no", "off", "on", "one", "right", "seven",
    "sheila", "six", "stop", "three", "tree", "two", "up", "wow", "yes", "zero",
)  # fmt: skip
WORDS_V2 = tuple(sorted(WORDS_V1 + ("backward", "follow", "forward", "learn", "visual")))

# The 12-class protocol of TensorFlow's speech_commands/train.py.
SILENCE_LABEL = "_silence_"
UNKNOWN_LABEL = "_unknown_"
BACKGROUND_NOISE_DIR = "_background_noise_"
TEN_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
LABELS_12 = (SILENCE_LABEL, UNKNOWN_LABEL) + TEN_WORDS
OTHER_WORDS_V2 = tuple(w for w in WORDS_V2 if w not in TEN_WORDS)  # the 12-class "unknown" words

# 2**27 - 1: the largest number of files per class the split rule supports.
_MAX_NUM_WAVS_PER_CLASS = 2**27 - 1
_SPEAKER_RE = re.compile(r"^([0-9a-fA-F]+)_nohash_(\d+)\.wav$")


def which_set(
    filename: str, validation_percentage: float = 10.0, testing_percentage: float = 10.0
) -> str:
    """Assign a file to ``training``, ``validation`` or ``testing`` by speaker hash.

    The exact rule of TensorFlow's ``speech_commands/input_data.py``: the part
    of the base name before ``_nohash_`` (the speaker) is hashed with SHA-1, so
    every recording of a speaker lands in the same split, and adding files
    never moves existing ones.

    Parameters
    ----------
    filename
        A path or file name such as ``yes/0a7c2a8d_nohash_0.wav``.
    validation_percentage, testing_percentage
        Sizes of the two held-out splits, in percent.
    """
    base_name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    hash_name = re.sub(r"_nohash_.*$", "", base_name)
    hash_name_hashed = hashlib.sha1(hash_name.encode("utf-8")).hexdigest()
    percentage_hash = (int(hash_name_hashed, 16) % (_MAX_NUM_WAVS_PER_CLASS + 1)) * (
        100.0 / _MAX_NUM_WAVS_PER_CLASS
    )
    if percentage_hash < validation_percentage:
        return "validation"
    if percentage_hash < (testing_percentage + validation_percentage):
        return "testing"
    return "training"


def speaker_of(filename: str) -> str:
    """Speaker id of a Speech Commands file name (the part before ``_nohash_``)."""
    base_name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    match = _SPEAKER_RE.match(base_name)
    if match:
        return match.group(1).lower()
    return re.sub(r"_nohash_.*$", "", base_name.rsplit(".", 1)[0])


# ---------------------------------------------------------------------------
# Index: which clip goes to which split under which label
# ---------------------------------------------------------------------------

PROTOCOLS = ("12class", "35class")
SPLITS = ("training", "validation", "testing")


@dataclass(frozen=True)
class Item:
    """One example of the index.

    ``path`` is relative to the dataset root; silence examples have no file and
    instead a slice ``(noise_file, offset, volume)`` of a background recording.
    """

    path: str | None
    label: int
    speaker: str
    split: str
    silence: tuple[str, int, float] | None = None


@dataclass
class DatasetIndex:
    """Every example of one protocol, before any audio is read."""

    root: Path
    version: str
    protocol: str
    labels: tuple[str, ...]
    items: list[Item]
    split_source: str  # "official lists" or "hash rule"
    ignored_words: dict[str, int] = field(default_factory=dict)
    # Per background file, the [start, end) samples each split draws silence
    # from (:func:`silence_ranges`); empty under 35class.
    noise_ranges: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)

    def counts(self) -> dict[str, Counter]:
        """Label histogram per split."""
        out = {s: Counter() for s in SPLITS}
        for item in self.items:
            out[item.split][self.labels[item.label]] += 1
        return out


def _missing_root_message(root: Path) -> str:
    return (
        f"Speech Commands dataset not found at '{root}'. Create the embedded synthetic one with "
        f"`fedkws generate --root {root}` or download the real one with "
        f"`fedkws download --root {root} --version v0.02`."
    )


def _wav_files(folder: Path) -> list[str]:
    """Sorted ``folder/file.wav`` names; a folder that cannot be listed counts as empty."""
    try:
        names = [f.name for f in folder.iterdir() if f.suffix.lower() == ".wav"]
    except OSError as err:
        log.warning("skipping %s: cannot list it (%s)", folder, err.strerror or err)
        return []
    return sorted(f"{folder.name}/{name}" for name in names)


def _word_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if not p.name.startswith((".", "_")) and p.is_dir())


def scan_words(root: Path) -> dict[str, list[str]]:
    """Map each word folder of ``root`` to its sorted ``word/file.wav`` paths.

    Entries that cannot be used (a dangling symlink, a folder that cannot be
    listed) are listed or skipped here and counted when the audio is read.
    """
    root = check_folder(root, "dataset.root")
    if not root.is_dir():
        raise DatasetNotFoundError(_missing_root_message(root))
    try:
        folders = _word_folders(root)
    except OSError as err:
        raise DataError(
            f"dataset.root='{root}' cannot be listed ({err.strerror or err}); "
            "it must be a readable folder"
        ) from None
    words: dict[str, list[str]] = {}
    for sub in folders:
        files = _wav_files(sub)
        if files:
            words[sub.name] = files
    if not words:
        raise DatasetNotFoundError(
            f"'{root}' holds no word folders with .wav files. " + _missing_root_message(root)
        )
    return words


def has_word_folders(root: Path | str) -> bool:
    """Whether ``root`` holds at least one word folder with a ``.wav`` file in it."""
    root = Path(root)
    try:
        return any(_wav_files(sub) for sub in _word_folders(root))
    except OSError:
        return False


def detect_version(words: Iterable[str]) -> str:
    """``v0.02`` if any of the five words added in v0.02 is present, else ``v0.01``."""
    return "v0.02" if set(words) & (set(WORDS_V2) - set(WORDS_V1)) else "v0.01"


def _read_list(path: Path) -> set[str] | None:
    if not path.is_file():
        return None
    return {
        line.strip().replace("\\", "/") for line in path.read_text().splitlines() if line.strip()
    }


def noise_files(root: Path) -> list[str]:
    """Sorted names of the background-noise recordings (may be empty)."""
    folder = Path(root) / BACKGROUND_NOISE_DIR
    if not folder.is_dir():
        return []
    return [rel.split("/", 1)[1] for rel in _wav_files(folder)]


def _noise_lengths(root: Path, names: list[str]) -> dict[str, int]:
    """Frames of each readable background recording (unreadable ones are left out)."""
    lengths = {}
    for name in names:
        try:
            lengths[name] = sf.info(str(root / BACKGROUND_NOISE_DIR / name)).frames
        except (sf.LibsndfileError, RuntimeError, OSError) as err:
            log.warning("skipping background recording %s: %s", name, err)
    return lengths


def check_protocol(protocol: str) -> None:
    """Raise :class:`DataError` unless ``protocol`` is one of :data:`PROTOCOLS`."""
    if protocol not in PROTOCOLS:
        raise DataError(
            f"dataset.protocol='{protocol}' is not a protocol; allowed: {', '.join(PROTOCOLS)}"
        )


def _no_silence_message(root: Path, noises: list[str], silence_percentage: float) -> str:
    folder = root / BACKGROUND_NOISE_DIR
    if not folder.is_dir():
        state = "does not exist"
    elif not noises:
        state = "holds no .wav file"
    else:
        shown = ", ".join(noises[:3]) + (", ..." if len(noises) > 3 else "")
        state = f"holds no readable recording of at least 1 s (found {shown})"
    return (
        f"dataset.protocol='12class' draws its _silence_ examples "
        f"(dataset.silence_percentage={silence_percentage:g}) from background recordings, "
        f"but '{folder}' {state}; put .wav recordings of at least 1 s there "
        "or set dataset.silence_percentage=0"
    )


def check_splits(
    items: Iterable[Item],
    root: Path,
    split_source: str,
    validation_percentage: float,
    testing_percentage: float,
    skipped: int = 0,
) -> None:
    """Raise :class:`DataError` if a split has no example read from a file.

    An empty validation or testing split would otherwise surface much later
    as an accuracy of 0.000 (or NaN) at the end of training.
    """
    counts = Counter(item.split for item in items if item.path is not None)
    empty = [split for split in SPLITS if counts[split] == 0]
    if not empty:
        return
    if split_source == "official lists":
        how = (
            f"split by the official lists in '{root}' (validation_list.txt, testing_list.txt): "
            "they must name word files present in dataset.root"
        )
    else:
        how = (
            f"split by the speaker-hash rule with dataset.validation_percentage="
            f"{validation_percentage:g} and dataset.testing_percentage={testing_percentage:g}: "
            "with few speakers a split can get none; add speakers, raise the percentage "
            "(0 < value, validation + testing < 100) or write the two split lists"
        )
    read = f" after {skipped} unreadable files were skipped" if skipped else ""
    raise DataError(
        f"the {' and '.join(empty)} split of dataset.root='{root}' has no example{read}; {how}"
    )


def _splitter(
    root: Path, validation_percentage: float, testing_percentage: float
) -> tuple[Callable[[str], str], str]:
    """The split of each file (by the official lists, else by the hash rule) and its source."""
    val_list = _read_list(root / "validation_list.txt")
    test_list = _read_list(root / "testing_list.txt")
    if val_list is None or test_list is None:
        log.info(
            "%s: no validation_list.txt/testing_list.txt, splitting by the hash rule "
            "(%.0f%% validation, %.0f%% testing)",
            root,
            validation_percentage,
            testing_percentage,
        )

        def by_hash(rel: str) -> str:
            return which_set(rel, validation_percentage, testing_percentage)

        return by_hash, "hash rule"

    def by_list(rel: str) -> str:
        if rel in val_list:
            return "validation"
        return "testing" if rel in test_list else "training"

    return by_list, "official lists"


def _index_35class(
    root: Path, words: dict[str, list[str]], version: str, split_of: Callable[[str], str]
) -> tuple[list[Item], dict[str, int]]:
    if version != "v0.02":
        raise DataError(
            f"dataset.protocol='35class' needs Speech Commands v0.02, but "
            f"dataset.root='{root}' holds v0.01 (none of "
            f"{', '.join(sorted(set(WORDS_V2) - set(WORDS_V1)))} found); "
            "allowed for this dataset: protocol=12class"
        )
    items: list[Item] = []
    ignored: dict[str, int] = {}
    for word, files in words.items():
        if word not in WORDS_V2:
            ignored[word] = len(files)
            continue
        for rel in files:
            items.append(Item(rel, WORDS_V2.index(word), speaker_of(rel), split_of(rel)))
    if ignored:
        log.warning("35class: ignoring word folders outside the protocol: %s", ignored)
    return items, ignored


def silence_ranges(
    noise_lengths: dict[str, int], weights: dict[str, float]
) -> dict[str, dict[str, tuple[int, int]]]:
    """The time range of each background file that each split draws silence from.

    Each file is cut into consecutive ranges, training first, then validation,
    then testing, in proportion to ``weights`` (the number of silence examples
    each split draws); a split that draws any gets at least one clip's length
    (1 s). A split's silence slices lie wholly inside its range, so held-out
    silence never shares a sample with training silence. A file too short for
    three such ranges (under about 3 s) is shared by every split, as in
    TensorFlow's ``train.py``. Pure function of its arguments.

    Returns
    -------
    dict
        ``{file: {split: (start, end)}}`` in samples, for every file of at
        least one clip's length.
    """
    total = sum(weights.get(s, 0.0) for s in SPLITS)
    ranges: dict[str, dict[str, tuple[int, int]]] = {}
    for name, length in sorted(noise_lengths.items()):
        if length < CLIP_SAMPLES:
            continue
        sizes = {}
        for split in SPLITS[1:]:
            share = weights.get(split, 0.0) / total if total > 0 else 0.0
            sizes[split] = max(CLIP_SAMPLES, round(length * share)) if share > 0 else 0
        sizes["training"] = length - sizes["validation"] - sizes["testing"]
        if weights.get("training", 0.0) > 0 and sizes["training"] < CLIP_SAMPLES:
            ranges[name] = {s: (0, length) for s in SPLITS}
            continue
        start, ranges[name] = 0, {}
        for split in SPLITS:
            ranges[name][split] = (start, start + sizes[split])
            start += sizes[split]
    return ranges


def _index_12class(
    root: Path,
    words: dict[str, list[str]],
    split_of: Callable[[str], str],
    seed: int,
    silence_percentage: float,
    unknown_percentage: float,
    noise_lengths: dict[str, int] | None,
) -> tuple[list[Item], dict[str, dict[str, tuple[int, int]]]]:
    labels = LABELS_12
    known: dict[str, list[Item]] = {s: [] for s in SPLITS}
    unknown: dict[str, list[Item]] = {s: [] for s in SPLITS}
    unknown_label = labels.index(UNKNOWN_LABEL)
    for word, files in words.items():
        for rel in files:
            split = split_of(rel)
            if word in TEN_WORDS:
                known[split].append(Item(rel, labels.index(word), speaker_of(rel), split))
            else:
                unknown[split].append(Item(rel, unknown_label, speaker_of(rel), split))

    noises = noise_files(root)
    if noise_lengths is None:
        noise_lengths = _noise_lengths(root, noises)
    usable = [n for n in noises if noise_lengths.get(n, 0) >= CLIP_SAMPLES]
    silence_label = labels.index(SILENCE_LABEL)
    n_silences = {s: math.ceil(len(known[s]) * silence_percentage / 100) for s in SPLITS}
    ranges = silence_ranges({n: noise_lengths[n] for n in usable}, n_silences)
    rng = np.random.default_rng(seed)
    items: list[Item] = []
    for split in SPLITS:
        n_known = len(known[split])
        items.extend(known[split])
        n_silence = n_silences[split]
        if n_silence and not usable:
            raise DataError(_no_silence_message(root, noises, silence_percentage))
        for _ in range(n_silence):
            name = usable[int(rng.integers(len(usable)))]
            start, end = ranges[name][split]
            offset = int(rng.integers(start, end - CLIP_SAMPLES + 1))
            volume = float(rng.uniform(0.0, 1.0))
            items.append(Item(None, silence_label, "_silence_", split, (name, offset, volume)))
        pool = unknown[split]
        order = rng.permutation(len(pool))
        n_unknown = min(len(pool), math.ceil(n_known * unknown_percentage / 100))
        items.extend(pool[i] for i in sorted(order[:n_unknown]))
    return items, ranges


def build_index(
    root: Path | str,
    protocol: str = "12class",
    seed: int = 0,
    silence_percentage: float = 10.0,
    unknown_percentage: float = 10.0,
    validation_percentage: float = 10.0,
    testing_percentage: float = 10.0,
    noise_lengths: dict[str, int] | None = None,
) -> DatasetIndex:
    """List the examples of a protocol, split by the official lists or the hash rule.

    Under ``12class`` (TensorFlow ``train.py``): the ten command words keep their
    label, every other word folder becomes ``_unknown_`` and, in each split, a
    seeded random subset of them of size ``ceil(known * unknown_percentage / 100)``
    is kept; ``ceil(known * silence_percentage / 100)`` silence examples are added,
    each a random 1 s slice of a background recording at a random volume in
    [0, 1], taken from that split's own time range of the recording
    (:func:`silence_ranges`), so held-out silence never overlaps training
    silence. Under ``35class`` every v0.02 word is its own class.

    Parameters
    ----------
    noise_lengths
        Length in samples of each background file, needed to draw silence
        slices. Read from disk when not given.

    Raises
    ------
    DatasetNotFoundError
        If ``root`` is missing or holds no word folder with ``.wav`` files.
    DataError
        For a protocol the dataset cannot serve (unknown name, 35class on
        v0.01, 12class silence without background recordings) or a split
        without examples.
    """
    check_protocol(protocol)
    root = Path(root)
    words = scan_words(root)
    version = detect_version(words)
    split_of, split_source = _splitter(root, validation_percentage, testing_percentage)
    if protocol == "35class":
        labels = WORDS_V2
        items, ignored = _index_35class(root, words, version, split_of)
    else:
        labels, ignored = LABELS_12, {}
        items, ranges = _index_12class(
            root, words, split_of, seed, silence_percentage, unknown_percentage, noise_lengths
        )
    check_splits(items, root, split_source, validation_percentage, testing_percentage)
    index = DatasetIndex(root, version, protocol, labels, items, split_source, ignored)
    if protocol == "12class":
        index.noise_ranges = ranges
    return index
