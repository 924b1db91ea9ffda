"""Decode a dataset once, keep it on disk as memory-mapped arrays.

Layout of one cache entry ``<cache_dir>/<data key>/``::

    waves.npy              (N, 16000) float32, every example as 1 s of audio
    features-<key>.npy     (N, 1, bins, frames) float32, one per feature config
    meta.npz               labels, splits, speakers, paths
    noise.npy              background recordings, concatenated (for augmentation)
    manifest.json          what was built from what; written last

The data key hashes the dataset's file listing (names, sizes, mtimes) and the
protocol parameters, the feature key the feature config, so a changed input
gets a new entry and an unchanged one is reused. Arrays are opened with
``mmap_mode="r"``: every process that opens them shares the operating
system's page cache instead of holding a copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedkws.data.audio import CLIP_SAMPLES, AudioReadError, AudioReport, read_audio, read_clip
from fedkws.data.features import FeatureConfig, FeatureExtractor
from fedkws.data.speech_commands import (
    BACKGROUND_NOISE_DIR,
    SPLITS,
    build_index,
    noise_files,
)
from fedkws.progress import progress_bar

log = logging.getLogger(__name__)

SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
_CACHE_FORMAT = 1


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


def _fingerprint(root: Path) -> str:
    """Hash of every file's relative path, size and mtime under ``root``."""
    digest = hashlib.sha1()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            stat = path.stat()
            rel = path.relative_to(root).as_posix()
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


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _build_waves(config: DataConfig, entry: Path, progress: bool) -> dict:
    root = Path(config.root)
    report = AudioReport()
    noise_names = noise_files(root)
    noise: list[np.ndarray] = []
    kept_noise: list[str] = []
    for name in noise_names:
        try:
            noise.append(read_audio(root / BACKGROUND_NOISE_DIR / name, report))
            kept_noise.append(name)
        except AudioReadError as err:
            report.skip(root / BACKGROUND_NOISE_DIR / name, str(err))
    lengths = {name: len(w) for name, w in zip(kept_noise, noise, strict=True)}
    index = build_index(
        root,
        protocol=config.protocol,
        seed=config.seed,
        silence_percentage=config.silence_percentage,
        unknown_percentage=config.unknown_percentage,
        validation_percentage=config.validation_percentage,
        testing_percentage=config.testing_percentage,
        noise_lengths=lengths,
    )
    noise_by_name = dict(zip(kept_noise, noise, strict=True))
    # Not the name _save_atomic uses: compaction below reads this file while writing that one.
    tmp = entry / "waves.partial.npy"
    waves = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.float32, shape=(len(index.items), CLIP_SAMPLES)
    )
    kept = []
    with progress_bar("decoding audio", total=len(index.items), enabled=progress) as advance:
        for item in index.items:
            if item.silence is not None:
                name, offset, volume = item.silence
                waves[len(kept)] = noise_by_name[name][offset : offset + CLIP_SAMPLES] * volume
                kept.append(item)
            else:
                try:
                    waves[len(kept)] = read_clip(root / item.path, report)
                    kept.append(item)
                except AudioReadError as err:
                    report.skip(item.path, str(err))
            advance(1)
    waves.flush()
    del waves
    if len(kept) < len(index.items):
        # Skipped files leave empty rows at the end: cut them off.
        full = np.load(tmp, mmap_mode="r")
        _save_atomic(entry / "waves.npy", np.asarray(full[: len(kept)]))
        del full
        tmp.unlink()
    else:
        os.replace(tmp, entry / "waves.npy")

    speakers = sorted({it.speaker for it in kept})
    speaker_code = {s: i for i, s in enumerate(speakers)}
    np.savez(
        entry / "meta.npz",
        labels=np.array([it.label for it in kept], dtype=np.int64),
        splits=np.array([SPLIT_CODES[it.split] for it in kept], dtype=np.int64),
        speakers=np.array([speaker_code[it.speaker] for it in kept], dtype=np.int64),
        speaker_names=np.array(speakers),
        paths=np.array([it.path or "" for it in kept]),
        label_names=np.array(index.labels),
    )
    bank = np.concatenate(noise) if noise else np.zeros((0,), np.float32)
    _save_atomic(entry / "noise.npy", bank.astype(np.float32))
    if report.num_skipped or report.resampled or report.downmixed:
        log.warning("%s: %s", root, report.summary())
    else:
        log.info("%s: %s", root, report.summary())
    return {
        "version": index.version,
        "split_source": index.split_source,
        "ignored_words": index.ignored_words,
        "noise_files": kept_noise,
        "audio_report": report.summary(),
        "skipped_files": report.skipped_files,
        "num_examples": len(kept),
    }


def _build_features(entry: Path, features: FeatureConfig, progress: bool) -> Path:
    path = entry / f"features-{features.key()}.npy"
    waves = np.load(entry / "waves.npy", mmap_mode="r")
    extractor = FeatureExtractor(features)
    shape = (len(waves), 1, features.num_bins, features.num_frames(waves.shape[1]))
    tmp = path.with_name(path.name + ".tmp.npy")
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

    @property
    def num_classes(self) -> int:
        """Number of labels of the protocol."""
        return len(self.label_names)

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


def prepare(
    data: DataConfig,
    features: FeatureConfig,
    cache_dir: Path | str,
    progress: bool = True,
) -> CachedDataset:
    """Build (or reuse) the cache entry for ``data`` and ``features`` and open it."""
    entry = Path(cache_dir) / data_key(data)
    entry.mkdir(parents=True, exist_ok=True)
    manifest_path = entry / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
    else:
        start = time.perf_counter()
        manifest = {**asdict(data), "root": str(Path(data.root).resolve())}
        manifest.update(_build_waves(data, entry, progress))
        manifest["waves_seconds"] = round(time.perf_counter() - start, 3)
        manifest["features"] = {}
        manifest_path.write_text(json.dumps(manifest, indent=2))
    fkey = features.key()
    if fkey not in manifest["features"] or not (entry / f"features-{fkey}.npy").is_file():
        start = time.perf_counter()
        _build_features(entry, features, progress)
        manifest["features"][fkey] = {
            **asdict(features),
            "seconds": round(time.perf_counter() - start, 3),
        }
        tmp = manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, manifest_path)
    return open_cache(str(entry), fkey)


@lru_cache(maxsize=4)
def open_cache(entry: str, feature_key: str) -> CachedDataset:
    """Open a built cache entry read-only; cached per process so workers open it once."""
    path = Path(entry)
    manifest = json.loads((path / "manifest.json").read_text())
    meta = np.load(path / "meta.npz")
    return CachedDataset(
        path=path,
        waves=np.load(path / "waves.npy", mmap_mode="r"),
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
