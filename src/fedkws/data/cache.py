"""Decode a dataset once, keep it on disk as memory-mapped arrays.

Layout of one cache entry ``<cache_dir>/<data key>/``::

    waves.npy              (N, 16000) float32, every example as 1 s of audio
    features-<key>.npy     (N, 1, bins, frames) float32, one per feature config
    meta.npz               labels, splits, speakers, paths
    noise.npy              background recordings, concatenated (for augmentation;
                           under 12class only each file's training time range)
    manifest.json          what was built from what, with every file's size and
                           SHA-1; written last

The data key hashes the dataset's file listing (names, sizes, mtimes) and the
protocol parameters, the feature key the feature config, so a changed input
gets a new entry and an unchanged one is reused. Arrays are opened with
``mmap_mode="r"``: every process that opens them shares the operating
system's page cache instead of holding a copy.

Building is serialised by a lock file ``<cache_dir>/.<data key>.lock``, so
processes that share a cache folder build each entry once. Before an entry
is used, :func:`prepare` checks every file against the size and SHA-1 the
manifest recorded: a truncated, altered or missing file, or a manifest that
does not parse, makes it rebuild that part instead of using it. Hashing reads
the whole file, so a process hashes each file once and checks only its size
and time stamps on later uses (the jobs of a multirun share one process).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import secrets
import tempfile
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedkws.data.audio import CLIP_SAMPLES, AudioReadError, AudioReport, read_audio, read_clip
from fedkws.data.errors import DataError, check_folder
from fedkws.data.features import FeatureConfig, FeatureExtractor
from fedkws.data.speech_commands import (
    BACKGROUND_NOISE_DIR,
    SPLITS,
    DatasetIndex,
    Item,
    build_index,
    check_protocol,
    check_splits,
    noise_files,
)
from fedkws.fileio import file_lock, save_npy, write_json, write_with
from fedkws.progress import progress_bar

log = logging.getLogger(__name__)

SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
# 2: silence and the augmentation noise bank come from per-split time ranges.
_CACHE_FORMAT = 2
# Manifests without this version carry no checksums: their entry is rebuilt.
_MANIFEST_VERSION = 2
_BASE_FILES = ("waves.npy", "meta.npz", "noise.npy")


@dataclass(frozen=True)
class DataConfig:
    """Which examples make up the dataset (everything but the features)."""

    root: str
    protocol: str = "12class"
    seed: int = 0
    silence_percentage: float = 10.0
    unknown_percentage: float = 10.0
    validation_percentage: float = 10.0
    testing_percentage: float = 10.0

    def __post_init__(self) -> None:
        check_protocol(self.protocol)
        for name in (
            "silence_percentage",
            "unknown_percentage",
            "validation_percentage",
            "testing_percentage",
        ):
            value = getattr(self, name)
            if not 0 <= value <= 100:
                raise DataError(f"dataset.{name}={value} is out of range; allowed: 0 to 100")
        if self.validation_percentage + self.testing_percentage >= 100:
            raise DataError(
                f"dataset.validation_percentage={self.validation_percentage:g} plus "
                f"dataset.testing_percentage={self.testing_percentage:g} leaves no training "
                "data; allowed: a sum below 100"
            )


def _fingerprint(root: Path) -> str:
    """Hash of every file's relative path, size and mtime under ``root``.

    Symlinked folders are followed (the loader reads them too), each real
    folder once. A file that cannot be stat'ed (a dangling symlink, no
    permission) is hashed by name only: the loader will skip and count it.
    """
    digest = hashlib.sha1()
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            try:
                stat = path.stat()
            except OSError as err:
                digest.update(f"{rel}\0unreadable {err.errno}\n".encode())
                continue
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def data_key(config: DataConfig) -> str:
    """Key of the waveform cache entry for ``config`` and the files on disk now."""
    root = Path(config.root).resolve()
    blob = json.dumps(
        {"format": _CACHE_FORMAT, "files": _fingerprint(root), **asdict(config), "root": str(root)},
        sort_keys=True,
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


@contextmanager
def _scratch(folder: Path, name: str) -> Iterator[Path]:
    """A uniquely named scratch ``.npy`` file in ``folder``, deleted on exit unless moved."""
    # Not mkstemp: its files are private (0600); this one gets the usual
    # permissions (0666 less the umask), like the file it becomes.
    tmp = folder / f".{name}.{secrets.token_hex(8)}.tmp.npy"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _read_noise(root: Path, report: AudioReport) -> dict[str, np.ndarray]:
    """The readable background recordings of ``root``, by file name."""
    noise: dict[str, np.ndarray] = {}
    for name in noise_files(root):
        try:
            noise[name] = read_audio(root / BACKGROUND_NOISE_DIR / name, report)
        except AudioReadError as err:
            report.skip(root / BACKGROUND_NOISE_DIR / name, str(err))
    return noise


def _index(config: DataConfig, noise: dict[str, np.ndarray]) -> DatasetIndex:
    return build_index(
        config.root,
        protocol=config.protocol,
        seed=config.seed,
        silence_percentage=config.silence_percentage,
        unknown_percentage=config.unknown_percentage,
        validation_percentage=config.validation_percentage,
        testing_percentage=config.testing_percentage,
        noise_lengths={name: len(wave) for name, wave in noise.items()},
    )


def _decode(
    root: Path,
    items: list[Item],
    noise: dict[str, np.ndarray],
    out: np.ndarray,
    report: AudioReport,
    progress: bool,
) -> list[Item]:
    """Fill the first rows of ``out`` with the readable examples; return those."""
    kept: list[Item] = []
    with progress_bar("decoding audio", total=len(items), enabled=progress) as advance:
        for item in items:
            if item.silence is not None:
                name, offset, volume = item.silence
                out[len(kept)] = noise[name][offset : offset + CLIP_SAMPLES] * volume
                kept.append(item)
            else:
                try:
                    out[len(kept)] = read_clip(root / item.path, report)
                    kept.append(item)
                except AudioReadError as err:
                    report.skip(item.path, str(err))
            advance(1)
    return kept


def _write_waves(
    root: Path,
    entry: Path,
    index: DatasetIndex,
    noise: dict[str, np.ndarray],
    report: AudioReport,
    progress: bool,
) -> list[Item]:
    """Decode every example into ``waves.npy``; return the examples kept."""
    with _scratch(entry, "waves.npy") as partial:
        shape = (len(index.items), CLIP_SAMPLES)
        waves = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
        kept = _decode(root, index.items, noise, waves, report, progress)
        waves.flush()
        del waves
        if len(kept) < len(index.items):
            # Skipped files leave empty rows at the end: cut them off.
            full = np.load(partial, mmap_mode="r")
            save_npy(entry / "waves.npy", np.asarray(full[: len(kept)]))
            del full
        else:
            os.replace(partial, entry / "waves.npy")
    return kept


def _write_meta(entry: Path, kept: list[Item], labels: tuple[str, ...]) -> None:
    speakers = sorted({it.speaker for it in kept})
    speaker_code = {s: i for i, s in enumerate(speakers)}
    arrays = dict(
        labels=np.array([it.label for it in kept], dtype=np.int64),
        splits=np.array([SPLIT_CODES[it.split] for it in kept], dtype=np.int64),
        speakers=np.array([speaker_code[it.speaker] for it in kept], dtype=np.int64),
        speaker_names=np.array(speakers),
        paths=np.array([it.path or "" for it in kept]),
        label_names=np.array(labels),
    )
    write_with(entry / "meta.npz", lambda tmp: np.savez(tmp, **arrays), suffix=".npz")


def _build_waves(config: DataConfig, entry: Path, progress: bool) -> dict:
    """Write ``waves.npy``, ``meta.npz`` and ``noise.npy``; return their manifest fields."""
    root = Path(config.root)
    report = AudioReport()
    noise = _read_noise(root, report)
    index = _index(config, noise)
    kept = _write_waves(root, entry, index, noise, report, progress)
    check_splits(
        kept,
        root,
        index.split_source,
        config.validation_percentage,
        config.testing_percentage,
        skipped=report.num_skipped,
    )
    _write_meta(entry, kept, index.labels)
    # Augmentation mixes noise into training examples only: keep it to the
    # training time range of each file, away from the held-out silence.
    parts = [
        wave[slice(*index.noise_ranges[name]["training"])] if name in index.noise_ranges else wave
        for name, wave in noise.items()
    ]
    bank = np.concatenate(parts) if parts else np.zeros((0,), np.float32)
    save_npy(entry / "noise.npy", bank.astype(np.float32))
    if report.num_skipped or report.resampled or report.downmixed:
        log.warning("%s: %s", root, report.summary())
    else:
        log.info("%s: %s", root, report.summary())
    return {
        "version": index.version,
        "split_source": index.split_source,
        "ignored_words": index.ignored_words,
        "noise_files": list(noise),
        "audio_report": report.summary(),
        "skipped_files": report.skipped_files,
        "num_examples": len(kept),
    }


def _build_features(entry: Path, features: FeatureConfig, progress: bool) -> Path:
    path = entry / f"features-{features.key()}.npy"
    waves = np.load(entry / "waves.npy", mmap_mode="r")
    extractor = FeatureExtractor(features)
    shape = (len(waves), 1, features.num_bins, features.num_frames(waves.shape[1]))
    with _scratch(entry, path.name) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        batch = 256
        with progress_bar("computing features", total=len(waves), enabled=progress) as advance:
            for start in range(0, len(waves), batch):
                chunk = torch.from_numpy(np.array(waves[start : start + batch]))
                out[start : start + len(chunk)] = extractor(chunk).numpy()
                advance(len(chunk))
        out.flush()
        del out
        os.replace(tmp, path)
    return path


@dataclass
class CachedDataset:
    """Memory-mapped view of one cache entry and one feature config."""

    path: Path
    waves: np.ndarray
    features: np.ndarray
    noise: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    speakers: np.ndarray
    speaker_names: np.ndarray
    paths: np.ndarray
    label_names: tuple[str, ...]
    manifest: dict
    feature_key: str

    def release_pages(self) -> None:
        """Unmap the pages of the cache files this process has read; they stay in the page cache.

        Reading a row maps its pages into the process, and they count in its resident
        set until the mapping ends, which for an open cache is never. A long-lived
        process that reads many clients' rows in turn (a Ray actor answering the
        recalibration queries of thousands of clients) would end up holding the
        whole file. After this call the next read maps the pages again from the
        page cache, without reading the disk.
        """
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for array in (self.waves, self.features, self.noise):
            mapping = getattr(array, "_mmap", None)  # numpy.memmap's mapping of the file
            if isinstance(mapping, mmap.mmap):
                mapping.madvise(mmap.MADV_DONTNEED)

    @property
    def num_classes(self) -> int:
        """Number of labels of the protocol."""
        return len(self.label_names)

    def identity(self) -> str:
        """A fingerprint of the data itself: audio, noise, labels, splits and speakers.

        The same for the same files wherever they lie and whenever the cache entry
        was built (the checksums of the raw arrays, not of file dates or paths);
        another for a dataset with a clip added, removed, relabelled or changed.
        """
        digest = hashlib.sha1()
        for name in ("waves.npy", "noise.npy"):
            digest.update(str(self.manifest["files"][name]["sha1"]).encode())
        for array in (self.labels, self.splits, self.speakers):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]

    def noise_bank(self) -> torch.Tensor:
        """The background recordings as one writable tensor (for noise augmentation)."""
        return torch.from_numpy(np.array(self.noise, dtype=np.float32))

    def split_indices(self, split: str) -> np.ndarray:
        """Indices of the examples of ``training``, ``validation`` or ``testing``."""
        return np.flatnonzero(self.splits == SPLIT_CODES[split])

    def summary(self) -> str:
        """Multi-line description: per-split label histogram and sizes."""
        lines = [
            f"dataset {self.manifest['root']} ({self.manifest['version']}, "
            f"{self.manifest['protocol']}, split by {self.manifest['split_source']})",
            f"  {len(self.labels)} examples, {len(self.speaker_names)} speakers, "
            f"features {tuple(self.features.shape[1:])}, cache {self.path}",
            f"  audio: {self.manifest['audio_report']}",
        ]
        header = "  " + f"{'label':<12}" + "".join(f"{s:>12}" for s in SPLITS)
        lines.append(header)
        for code, name in enumerate(self.label_names):
            counts = [int(np.sum((self.labels == code) & (self.splits == i))) for i in range(3)]
            lines.append("  " + f"{name:<12}" + "".join(f"{c:>12}" for c in counts))
        totals = [int(np.sum(self.splits == i)) for i in range(3)]
        lines.append("  " + f"{'total':<12}" + "".join(f"{c:>12}" for c in totals))
        return "\n".join(lines)


def _file_record(path: Path) -> dict:
    """Size and SHA-1 of a file, as the manifest keeps them."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha1": digest.hexdigest()}


# SHA-1s this process has already computed, by (path, size, mtime, ctime, inode): the jobs
# of a multirun share a process and the same cache entry, and hashing it reads every byte
# (seconds for the real dataset). Any write gives the file a new ctime, so it is hashed again.
_CHECKED: dict[tuple[str, int, int, int, int], str] = {}
# File times are coarse: a file written within this many ns of its check may change again
# without a new time stamp, so its hash is not remembered.
_SETTLED_NS = 2_000_000_000


def _sha1(path: Path) -> str:
    """The file's SHA-1, computed once per process while the file stays unchanged."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _CHECKED:
        digest = _file_record(path)["sha1"]
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < _SETTLED_NS:
            return digest
        _CHECKED[key] = digest
    return _CHECKED[key]


def _file_problem(path: Path, record: object) -> str | None:
    """Why ``path`` does not match its manifest record, or None if it does."""
    if not isinstance(record, dict) or not {"size", "sha1"} <= record.keys():
        return f"{path.name}: no size/checksum in the manifest"
    try:
        size = path.stat().st_size
        if size != record["size"]:
            return f"{path.name}: {size} bytes, the manifest says {record['size']}"
        if _sha1(path) != record["sha1"]:
            return f"{path.name}: content differs from its recorded SHA-1"
    except OSError as err:
        return f"{path.name}: {err.strerror or err}"
    return None


def _read_manifest(entry: Path) -> tuple[dict | None, str | None]:
    """The manifest of ``entry`` and, if it is unusable, why."""
    path = entry / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as err:
        return None, f"manifest.json unreadable ({err.__class__.__name__})"
    if (
        not isinstance(manifest, dict)
        or manifest.get("manifest_version") != _MANIFEST_VERSION
        or not isinstance(manifest.get("files"), dict)
        or not isinstance(manifest.get("features"), dict)
    ):
        return None, "manifest.json is not a manifest of this cache format"
    return manifest, None


def _entry_problem(entry: Path, manifest: dict) -> str | None:
    """The first base file (waves, meta, noise) that does not match the manifest."""
    for name in _BASE_FILES:
        problem = _file_problem(entry / name, manifest["files"].get(name))
        if problem:
            return problem
    return None


def _features_problem(entry: Path, manifest: dict, fkey: str) -> str | None:
    """Why the features ``fkey`` cannot be used as they are (None: they can)."""
    if fkey not in manifest["features"]:
        return "not built yet"
    record = manifest["features"][fkey]
    return _file_problem(entry / f"features-{fkey}.npy", record.get("file"))


def _build_entry(data: DataConfig, entry: Path, progress: bool) -> dict:
    """Decode the dataset into ``entry``; the manifest is written last."""
    log.info("building cache entry %s from %s", entry, data.root)
    (entry / "manifest.json").unlink(missing_ok=True)
    entry.mkdir(parents=True, exist_ok=True)
    for stale in entry.glob("features-*.npy"):
        stale.unlink()
    start = time.perf_counter()
    manifest = {**asdict(data), "root": str(Path(data.root).resolve())}
    manifest.update(_build_waves(data, entry, progress))
    manifest["waves_seconds"] = round(time.perf_counter() - start, 3)
    manifest["manifest_version"] = _MANIFEST_VERSION
    manifest["build_id"] = uuid.uuid4().hex
    manifest["files"] = {name: _file_record(entry / name) for name in _BASE_FILES}
    manifest["features"] = {}
    write_json(entry / "manifest.json", manifest)
    return manifest


def _add_features(entry: Path, manifest: dict, features: FeatureConfig, progress: bool) -> dict:
    """Compute one feature config from the cached waveforms and record it in the manifest."""
    log.info("computing features %s in %s", features.key(), entry)
    start = time.perf_counter()
    path = _build_features(entry, features, progress)
    manifest["features"][features.key()] = {
        **asdict(features),
        "seconds": round(time.perf_counter() - start, 3),
        "file": _file_record(path),
        "build_id": uuid.uuid4().hex,
    }
    write_json(entry / "manifest.json", manifest)
    return manifest


def _problems(entry: Path, fkey: str) -> tuple[dict | None, str | None, str | None]:
    """The manifest, what is wrong with the entry, what is wrong with its features."""
    manifest, problem = _read_manifest(entry)
    if manifest is None:
        return None, problem or "not built yet", None
    problem = _entry_problem(entry, manifest)
    if problem:
        return manifest, problem, None
    return manifest, None, _features_problem(entry, manifest, fkey)


def _build_what_is_missing(
    data: DataConfig, features: FeatureConfig, entry: Path, progress: bool
) -> dict:
    """With the entry's lock held: check it again, rebuild whatever is missing or damaged."""
    fkey = features.key()
    manifest, entry_problem, features_problem = _problems(entry, fkey)
    if entry_problem is not None:
        if entry_problem != "not built yet":
            log.warning("cache entry %s is damaged (%s); rebuilding it", entry, entry_problem)
        manifest = _build_entry(data, entry, progress)
        features_problem = "not built yet"
    if features_problem is not None:
        if features_problem != "not built yet":
            log.warning("features %s in %s are damaged (%s); rebuilding them", fkey, entry,
                        features_problem)  # fmt: skip
        manifest = _add_features(entry, manifest, features, progress)
    return manifest


def _writable_folder(cache_dir: Path | str) -> Path:
    """``cache_dir``, created if needed; :class:`DataError` if it cannot be written."""
    cache_dir = check_folder(cache_dir, "cache_dir")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_dir):
            pass
    except OSError as err:
        raise DataError(
            f"cache_dir='{cache_dir}' is not a writable folder ({err.strerror or err}); "
            "set cache_dir to a folder this user can write"
        ) from None
    return cache_dir


def prepare(
    data: DataConfig,
    features: FeatureConfig,
    cache_dir: Path | str,
    progress: bool = True,
) -> CachedDataset:
    """Build (or reuse) the cache entry for ``data`` and ``features`` and open it.

    Every file of the entry is checked against the size and SHA-1 recorded
    when it was built; whatever is missing or damaged is rebuilt, never used.
    Safe when several processes prepare the same entry at once: building is
    serialised by a lock file in ``cache_dir``; whoever comes second waits and
    then reuses what the first built.
    """
    cache_dir = _writable_folder(cache_dir)
    key = data_key(data)
    entry = cache_dir / key
    fkey = features.key()
    _, entry_problem, features_problem = _problems(entry, fkey)
    if entry_problem is not None or features_problem is not None:
        with file_lock(cache_dir / f".{key}.lock"):
            _build_what_is_missing(data, features, entry, progress)
    # Files this process opened before they were rebuilt are opened again.
    return open_current(str(entry), fkey)


def _waves_file(feature_key: str) -> str:
    _, sep, variant = feature_key.partition("@")
    return f"waves@{variant}.npy" if sep else "waves.npy"


# What open_cache returned and someone still holds (the lru cache or a caller), by entry.
_OPENED: weakref.WeakValueDictionary[tuple[str, str], CachedDataset] = weakref.WeakValueDictionary()


def release_mapped_pages() -> None:
    """:meth:`CachedDataset.release_pages` of every cache entry this process has open."""
    for data in list(_OPENED.values()):
        data.release_pages()


def _stamps(entry: str, feature_key: str) -> tuple:
    """Identity and size of the files of ``feature_key``: a file replaced has new ones.

    Not the manifest, which adding another feature config rewrites.
    """
    names = ("meta.npz", _waves_file(feature_key), f"features-{feature_key}.npy")
    stats = [os.stat(os.path.join(entry, name)) for name in names]
    return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in stats)


# The files each open entry was read from, as _stamps saw them when it was opened.
_OPENED_FROM: dict[tuple[str, str], tuple] = {}


def open_current(entry: str, feature_key: str) -> CachedDataset:
    """:func:`open_cache`, opened again if its files have been replaced since (rebuilt).

    A process that serves many runs (a sweep's process, Ray actors handed from one
    job to the next) may have opened an entry, or a feature-shift variant, that a
    later run found damaged and built again in place. While another process is
    building it (its manifest is written last, every file is replaced whole), the
    files opened before are used, as they were before the build began.
    """
    opened = open_cache(entry, feature_key)
    try:
        stamps = _stamps(entry, feature_key)
        built = os.path.exists(os.path.join(entry, "manifest.json"))
    except OSError:  # a file being built again right now
        return opened
    if built and _OPENED_FROM.get((entry, feature_key)) != stamps:
        open_cache.cache_clear()
        opened = open_cache(entry, feature_key)
    return opened


@lru_cache(maxsize=4)
def open_cache(entry: str, feature_key: str) -> CachedDataset:
    """Open a built cache entry read-only; cached per process so workers open it once."""
    path = Path(entry)
    stamps = _stamps(entry, feature_key)  # before reading: a file replaced meanwhile is seen
    manifest = json.loads((path / "manifest.json").read_text())
    meta = np.load(path / "meta.npz")
    data = CachedDataset(
        path=path,
        # A feature-shift variant (fedkws.data.channel) has its own waveforms.
        waves=np.load(path / _waves_file(feature_key), mmap_mode="r"),
        features=np.load(path / f"features-{feature_key}.npy", mmap_mode="r"),
        noise=np.load(path / "noise.npy", mmap_mode="r"),
        labels=meta["labels"],
        splits=meta["splits"],
        speakers=meta["speakers"],
        speaker_names=meta["speaker_names"],
        paths=meta["paths"],
        label_names=tuple(str(x) for x in meta["label_names"]),
        manifest=manifest,
        feature_key=feature_key,
    )
    _OPENED[entry, feature_key] = data
    _OPENED_FROM[entry, feature_key] = stamps
    return data
