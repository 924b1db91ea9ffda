"""Log-mel and MFCC features, computed in batches with torchaudio.

The defaults follow the keyword-spotting literature: 40 mel bands, 30 ms
Hann window, 10 ms hop at 16 kHz, which turns a 1 s clip into 40 x 101.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch
import torchaudio.transforms as T
from torch import nn

from fedkws.data.audio import SAMPLE_RATE

FEATURE_KINDS = ("logmel", "mfcc")


@dataclass(frozen=True)
class FeatureConfig:
    """Plain description of a feature extractor; its hash names the cache."""

    kind: str = "logmel"
    n_mels: int = 40
    n_mfcc: int = 40
    win_ms: float = 30.0
    hop_ms: float = 10.0
    n_fft: int = 512
    f_min: float = 20.0
    f_max: float = 7600.0
    log_offset: float = 1e-6
    sample_rate: int = SAMPLE_RATE

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise ValueError(
                f"Unknown feature kind '{self.kind}'. Valid kinds: {', '.join(FEATURE_KINDS)}"
            )
        if self.win_length > self.n_fft:
            raise ValueError(
                f"win_ms={self.win_ms} gives {self.win_length} samples, "
                f"more than n_fft={self.n_fft}"
            )

    @property
    def win_length(self) -> int:
        """Analysis window in samples."""
        return round(self.sample_rate * self.win_ms / 1000)

    @property
    def hop_length(self) -> int:
        """Hop between frames in samples."""
        return round(self.sample_rate * self.hop_ms / 1000)

    @property
    def num_bins(self) -> int:
        """Height of the feature map."""
        return self.n_mels if self.kind == "logmel" else self.n_mfcc

    def num_frames(self, num_samples: int) -> int:
        """Width of the feature map for a clip of ``num_samples`` (centred frames)."""
        return 1 + num_samples // self.hop_length

    def key(self) -> str:
        """Stable short hash of every field: a changed config gets a new cache."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


class FeatureExtractor(nn.Module):
    """Waveforms ``(batch, samples)`` to features ``(batch, 1, bins, frames)``."""

    def __init__(self, config: FeatureConfig) -> None:
        super().__init__()
        self.config = config
        mel_kwargs = dict(
            n_fft=config.n_fft,
            win_length=config.win_length,
            hop_length=config.hop_length,
            f_min=config.f_min,
            f_max=config.f_max,
            n_mels=config.n_mels,
            window_fn=torch.hann_window,
            power=2.0,
            center=True,
            pad_mode="reflect",
            norm="slaney",
            mel_scale="slaney",
        )
        self.mel = T.MelSpectrogram(sample_rate=config.sample_rate, **mel_kwargs)
        if config.kind == "mfcc":
            self.dct = T.MFCC(
                sample_rate=config.sample_rate,
                n_mfcc=config.n_mfcc,
                log_mels=True,
                melkwargs=mel_kwargs,
            ).dct_mat
        else:
            self.dct = None

    @torch.no_grad()
    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        """Compute features; the extractor has no trainable state."""
        log_mel = torch.log(self.mel(waves) + self.config.log_offset)
        if self.dct is not None:
            # (batch, mels, frames) -> (batch, mfcc, frames)
            log_mel = torch.matmul(log_mel.transpose(-1, -2), self.dct).transpose(-1, -2)
        return log_mel.unsqueeze(1)
