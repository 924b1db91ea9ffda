"""WAV reading that tolerates what real dataset folders contain.

Every clip in fedkws goes through :func:`read_clip`: any bit depth libsndfile
reads (8-bit unsigned, 16/24/32-bit PCM, 32/64-bit float), stereo mixed to
mono, other sample rates resampled, then padded or trimmed to a fixed length.
Problems are not raised one by one: they are counted in an :class:`AudioReport`
and summarised in one line, so a scan of 100k files never dies halfway.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
CLIP_SAMPLES = SAMPLE_RATE  # every example is exactly one second


class AudioReadError(Exception):
    """A file that cannot be used as a clip (corrupt, empty or unreadable)."""


@dataclass
class AudioReport:
    """Counts of what had to be fixed or skipped while reading clips."""

    read: int = 0
    resampled: int = 0
    downmixed: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skipped_files: list[str] = field(default_factory=list)

    def skip(self, path: Path | str, reason: str) -> None:
        """Record a file that could not be used."""
        self.skipped[reason] += 1
        self.skipped_files.append(str(path))

    @property
    def num_skipped(self) -> int:
        """Total number of skipped files."""
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line describing everything that was not a clean read."""
        parts = [f"{self.read} clips read"]
        if self.resampled:
            parts.append(f"{self.resampled} resampled to {SAMPLE_RATE} Hz")
        if self.downmixed:
            parts.append(f"{self.downmixed} mixed down to mono")
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
            example = self.skipped_files[0]
            parts.append(f"{self.num_skipped} skipped ({reasons}; e.g. {example})")
        return "; ".join(parts)


def read_audio(path: Path | str, report: AudioReport | None = None) -> np.ndarray:
    """Read a whole audio file as mono float32 at 16 kHz (any length).

    Raises
    ------
    AudioReadError
        If the file is empty, corrupt or unreadable.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise AudioReadError("empty file")
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except AudioReadError:
        raise
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as err:
        raise AudioReadError(f"unreadable ({err.__class__.__name__})") from err
    if data.shape[0] == 0:
        raise AudioReadError("no samples")
    if data.shape[1] > 1:
        data = data.mean(axis=1, keepdims=True)
        if report is not None:
            report.downmixed += 1
    wave = data[:, 0]
    if rate != SAMPLE_RATE:
        wave = resample(wave, rate, SAMPLE_RATE)
        if report is not None:
            report.resampled += 1
    if not np.all(np.isfinite(wave)):
        raise AudioReadError("non-finite samples")
    return np.ascontiguousarray(wave, dtype=np.float32)


def resample(wave: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling with torchaudio's sinc interpolation."""
    import torch
    import torchaudio.functional as AF

    out = AF.resample(torch.from_numpy(np.ascontiguousarray(wave)), orig_rate, new_rate)
    return out.numpy().astype(np.float32)


def fix_length(wave: np.ndarray, num_samples: int = CLIP_SAMPLES) -> np.ndarray:
    """Zero-pad at the end or trim to exactly ``num_samples``."""
    if wave.shape[0] >= num_samples:
        return wave[:num_samples]
    return np.pad(wave, (0, num_samples - wave.shape[0]))


def read_clip(path: Path | str, report: AudioReport | None = None) -> np.ndarray:
    """Read one clip as exactly one second of mono 16 kHz float32."""
    wave = fix_length(read_audio(path, report))
    if report is not None:
        report.read += 1
    return wave
