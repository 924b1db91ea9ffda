"""Training-time augmentation on batches of cached waveforms and features.

Waveform augmentations (time shift, speed perturbation, background-noise
mixing) work on the memory-mapped 1 s waveforms, so no WAV file is decoded
again; SpecAugment masks work on the features. All randomness comes from the
``torch.Generator`` passed in, so a (seed, round, client) stream reproduces a
run exactly. Validation and test data are never augmented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedkws.data.audio import SAMPLE_RATE


@dataclass(frozen=True)
class AugmentConfig:
    """Every augmentation, each switchable on its own.

    Attributes
    ----------
    time_shift_ms
        Maximum shift of the clip in either direction; 0 disables it.
    noise_prob
        Probability that an example gets background noise mixed in.
    noise_volume
        ``(low, high)`` range of the noise volume, as in TensorFlow's
        ``background_volume`` (used when ``noise_snr_db`` is None).
    noise_snr_db
        ``(low, high)`` signal-to-noise range in dB; overrides ``noise_volume``.
    speed_prob, speed_range
        Probability and ``(low, high)`` factor of speed perturbation
        (resampling, which changes tempo and pitch together).
    time_masks, time_mask_frames, freq_masks, freq_mask_bins
        SpecAugment: number of masks and their maximum width.
    """

    time_shift_ms: float = 0.0
    noise_prob: float = 0.0
    noise_volume: tuple[float, float] = (0.0, 0.1)
    noise_snr_db: tuple[float, float] | None = None
    speed_prob: float = 0.0
    speed_range: tuple[float, float] = (0.9, 1.1)
    time_masks: int = 0
    time_mask_frames: int = 10
    freq_masks: int = 0
    freq_mask_bins: int = 5

    @property
    def needs_waves(self) -> bool:
        """Whether training must start from waveforms rather than cached features."""
        return self.time_shift_ms > 0 or self.noise_prob > 0 or self.speed_prob > 0

    @property
    def any(self) -> bool:
        """Whether any augmentation is switched on."""
        return self.needs_waves or self.time_masks > 0 or self.freq_masks > 0


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def time_shift(waves: torch.Tensor, max_samples: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each clip by a random number of samples, zero-filling the gap."""
    if max_samples <= 0:
        return waves
    batch, length = waves.shape
    shifts = torch.randint(-max_samples, max_samples + 1, (batch,), generator=gen)
    out = torch.zeros_like(waves)
    for row, shift in enumerate(shifts.tolist()):  # one slice copy per clip (5x a gather)
        if abs(shift) >= length:
            continue  # shifted out entirely: silence
        if shift >= 0:
            out[row, shift:] = waves[row, : length - shift]
        else:
            out[row, :shift] = waves[row, -shift:]
    return out


def speed_perturb(
    waves: torch.Tensor, prob: float, low: float, high: float, gen: torch.Generator
) -> torch.Tensor:
    """Resample chosen clips by a random factor, then pad or trim to the length."""
    if prob <= 0:
        return waves
    batch, length = waves.shape
    chosen = torch.rand(batch, generator=gen) < prob
    factors = _uniform(batch, low, high, gen)
    out = waves.clone()
    for i in torch.nonzero(chosen).flatten().tolist():
        new_len = max(1, round(length / float(factors[i])))
        stretched = F.interpolate(
            waves[i].view(1, 1, -1), size=new_len, mode="linear", align_corners=False
        ).view(-1)
        out[i] = F.pad(stretched, (0, max(0, length - new_len)))[:length]
    return out


def mix_noise(
    waves: torch.Tensor,
    noise_bank: torch.Tensor,
    prob: float,
    volume: tuple[float, float],
    snr_db: tuple[float, float] | None,
    gen: torch.Generator,
) -> torch.Tensor:
    """Add a random slice of the concatenated background recordings to chosen clips."""
    batch, length = waves.shape
    if prob <= 0 or noise_bank.numel() < length:
        return waves
    chosen = (torch.rand(batch, generator=gen) < prob).float().unsqueeze(1)
    starts = torch.randint(0, noise_bank.numel() - length + 1, (batch,), generator=gen)
    noise = torch.stack([noise_bank[s : s + length] for s in starts.tolist()])
    if snr_db is None:
        scale = _uniform(batch, *volume, gen).unsqueeze(1)
    else:
        snr = _uniform(batch, *snr_db, gen)
        p_sig = waves.pow(2).mean(1).clamp_min(1e-10)
        p_noise = noise.pow(2).mean(1).clamp_min(1e-10)
        scale = torch.sqrt(p_sig / (p_noise * 10 ** (snr / 10))).unsqueeze(1)
    return (waves + chosen * scale * noise).clamp(-1.0, 1.0)


def spec_augment(
    feats: torch.Tensor,
    time_masks: int,
    time_width: int,
    freq_masks: int,
    freq_width: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """Zero random time and frequency bands of ``(batch, 1, bins, frames)`` features."""
    if time_masks <= 0 and freq_masks <= 0:
        return feats
    batch, _, bins, frames = feats.shape
    keep_time = _mask_bands(batch, frames, time_masks, time_width, gen)
    keep_freq = _mask_bands(batch, bins, freq_masks, freq_width, gen)
    return feats * keep_freq.view(batch, 1, bins, 1) * keep_time.view(batch, 1, 1, frames)


def _mask_bands(
    batch: int, size: int, count: int, max_width: int, gen: torch.Generator
) -> torch.Tensor:
    """``(batch, size)`` of ones with ``count`` random bands of zeros per row."""
    keep = torch.ones(batch, size)
    pos = torch.arange(size).unsqueeze(0)
    for _ in range(count):
        width = torch.randint(0, max_width + 1, (batch,), generator=gen)
        start = (torch.rand(batch, generator=gen) * (size - width + 1).float()).long()
        band = (pos >= start.unsqueeze(1)) & (pos < (start + width).unsqueeze(1))
        keep = keep * (~band).float()
    return keep


class Augmenter:
    """Apply an :class:`AugmentConfig` to a training batch."""

    def __init__(self, config: AugmentConfig, noise_bank: torch.Tensor) -> None:
        self.config = config
        self.noise_bank = noise_bank

    def waves(self, waves: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Waveform-domain augmentations, in the order shift, speed, noise."""
        c = self.config
        waves = time_shift(waves, round(SAMPLE_RATE * c.time_shift_ms / 1000), gen)
        waves = speed_perturb(waves, c.speed_prob, *c.speed_range, gen)
        return mix_noise(waves, self.noise_bank, c.noise_prob, c.noise_volume, c.noise_snr_db, gen)

    def features(self, feats: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """SpecAugment masks."""
        c = self.config
        return spec_augment(
            feats, c.time_masks, c.time_mask_frames, c.freq_masks, c.freq_mask_bins, gen
        )
