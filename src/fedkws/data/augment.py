"""Training-time augmentation on batches of cached waveforms and features.

Waveform augmentations (time shift, speed perturbation, background-noise
mixing) work on the memory-mapped 1 s waveforms, so no WAV file is decoded
again, and each batch's features are computed anew; SpecAugment masks work on
the features. All randomness comes from the ``torch.Generator`` passed in, so a
(seed, round, client) stream reproduces a run exactly. Validation and test data
are never augmented.

``domain="mel"`` applies the time shift and the noise to the cached log-mel
features instead, with no STFT per epoch (``benchmarks/run.py --only pipeline``
measures both). It is an approximation, stated here so a study can say which it used:

- the shift moves whole frames (``hop_ms``; 10 ms by default) rather than
  samples, and the frames it uncovers are silence (zero power), as the samples
  a waveform shift uncovers are;
- the noise is added as mel power, ``log(mel(|X|^2) + g mel(|N|^2))``, which
  leaves out the cross term ``2 Re(X conj(N))`` of ``|X + N|^2`` (zero on
  average over the noise's phase, not per example) and the waveform's clipping
  to [-1, 1]; ``g`` is the volume squared, or the power ratio for a
  signal-to-noise ratio measured on mel power rather than on samples;
- speed perturbation has no mel-domain form here (it is refused), and MFCC
  features cannot take it (their cache holds no mel power).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fedkws.data.audio import SAMPLE_RATE

if TYPE_CHECKING:  # features.py imports torchaudio: not needed to read a config
    from fedkws.data.features import FeatureConfig

AUGMENT_DOMAINS = ("wave", "mel")


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
    domain
        Where the time shift and the noise are applied: ``"wave"`` (the
        waveforms, exact) or ``"mel"`` (the cached log-mel features, see the
        module's notes).
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
    domain: str = "wave"

    @property
    def changes_audio(self) -> bool:
        """Whether a time shift, speed change or noise is switched on."""
        return self.time_shift_ms > 0 or self.noise_prob > 0 or self.speed_prob > 0

    @property
    def needs_waves(self) -> bool:
        """Whether training must start from waveforms rather than cached features."""
        return self.changes_audio and self.domain == "wave"

    @property
    def any(self) -> bool:
        """Whether any augmentation is switched on."""
        return self.changes_audio or self.time_masks > 0 or self.freq_masks > 0


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
    chosen, starts = _noise_picks(batch, prob, noise_bank.numel(), length, gen)
    noise = torch.stack([noise_bank[s : s + length] for s in starts.tolist()])
    if snr_db is None:
        scale = _uniform(batch, *volume, gen).unsqueeze(1)
    else:
        snr = _uniform(batch, *snr_db, gen)
        p_sig = waves.pow(2).mean(1).clamp_min(1e-10)
        p_noise = noise.pow(2).mean(1).clamp_min(1e-10)
        scale = torch.sqrt(p_sig / (p_noise * 10 ** (snr / 10))).unsqueeze(1)
    return (waves + chosen.float().unsqueeze(1) * scale * noise).clamp(-1.0, 1.0)


def _noise_picks(
    batch: int, prob: float, available: int, length: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which examples get noise (bool), and where each one's stretch of the bank starts.

    Drawn in this order for both domains (:func:`mix_noise`, :func:`mix_noise_mel`).
    """
    chosen = torch.rand(batch, generator=gen) < prob
    starts = torch.randint(0, available - length + 1, (batch,), generator=gen)
    return chosen, starts


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


def shift_frames(
    feats: torch.Tensor, max_frames: int, fill: float, gen: torch.Generator
) -> torch.Tensor:
    """Shift each example of ``(batch, 1, bins, frames)`` by whole frames, ``fill`` in the gap.

    The frame counterpart of :func:`time_shift`: a shift ``s`` puts input frame
    ``t - s`` at frame ``t``.
    """
    if max_frames <= 0:
        return feats
    batch, _, bins, frames = feats.shape
    shifts = torch.randint(-max_frames, max_frames + 1, (batch,), generator=gen)
    source = torch.arange(frames).unsqueeze(0) - shifts.unsqueeze(1)  # (batch, frames)
    inside = ((source >= 0) & (source < frames)).view(batch, 1, 1, frames)
    index = source.clamp(0, frames - 1).view(batch, 1, 1, frames).expand(feats.shape)
    shifted = torch.gather(feats, 3, index)
    return torch.where(inside, shifted, torch.tensor(fill, dtype=feats.dtype))


def shift_in_frames(time_shift_ms: float, hop_ms: float) -> int:
    """The largest shift in frames for ``time_shift_ms``: the nearest whole number of hops.

    Halves round up (Python's ``round`` would make 25 ms two hops of 10 ms, 35 ms four).
    """
    return math.floor(time_shift_ms / hop_ms + 0.5)


def mix_noise_mel(
    feats: torch.Tensor,
    noise_power: torch.Tensor,
    prob: float,
    volume: tuple[float, float],
    snr_db: tuple[float, float] | None,
    log_offset: float,
    gen: torch.Generator,
) -> torch.Tensor:
    """Add a random stretch of the noise's mel power to chosen log-mel examples.

    ``feats`` are ``log(mel + log_offset)`` of shape ``(batch, 1, bins, frames)``;
    ``noise_power`` is the mel power ``(bins, noise frames)`` of the concatenated
    background recordings. The mel-domain counterpart of :func:`mix_noise`, with
    its draws in the same order.
    """
    batch, _, bins, frames = feats.shape
    if prob <= 0 or noise_power.shape[1] < frames:
        return feats
    chosen, starts = _noise_picks(batch, prob, noise_power.shape[1], frames, gen)
    columns = starts.unsqueeze(1) + torch.arange(frames).unsqueeze(0)  # (batch, frames)
    noise = noise_power[:, columns].permute(1, 0, 2)  # (batch, bins, frames)
    power = feats.squeeze(1).exp()  # mel + log_offset
    if snr_db is None:
        gain = _uniform(batch, *volume, gen).square()
    else:
        snr = _uniform(batch, *snr_db, gen)
        p_sig = (power - log_offset).mean((1, 2)).clamp_min(1e-10)
        p_noise = noise.mean((1, 2)).clamp_min(1e-10)
        gain = p_sig / (p_noise * 10 ** (snr / 10))
    mixed = torch.log(power + gain.view(batch, 1, 1) * noise).unsqueeze(1)
    return torch.where(chosen.view(batch, 1, 1, 1), mixed, feats)


class Augmenter:
    """Apply an :class:`AugmentConfig` to a training batch.

    ``features`` (the run's feature config) is needed for ``domain="mel"``: it
    sets the frame length, and turns the noise bank into mel power unless
    ``noise_power`` (:func:`noise_mel_power` of the bank) is given; a client
    builds an augmenter every round, so its process keeps that once
    (:func:`fedkws.core.loops.training_augmentation`).
    """

    def __init__(
        self,
        config: AugmentConfig,
        noise_bank: torch.Tensor,
        features: FeatureConfig | None = None,
        noise_power: torch.Tensor | None = None,
    ) -> None:
        self.config = config
        self.noise_bank = noise_bank
        self.feature_config = features
        self.noise_power: torch.Tensor | None = None
        if config.domain not in AUGMENT_DOMAINS:  # else its shift and noise would not happen
            raise ValueError(
                f"unknown augmentation domain {config.domain!r}; valid: "
                f"{', '.join(AUGMENT_DOMAINS)}"
            )
        if config.domain == "mel" and config.changes_audio:
            if features is None or features.kind != "logmel":
                raise ValueError("augment.domain=mel needs log-mel features (features=logmel)")
            if config.speed_prob > 0:
                raise ValueError("augment.domain=mel has no speed perturbation (speed_prob > 0)")
            if config.noise_prob > 0:
                self.noise_power = (
                    noise_power
                    if noise_power is not None
                    else noise_mel_power(noise_bank, features)
                )

    def waves(self, waves: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Waveform-domain augmentations, in the order shift, speed, noise."""
        c = self.config
        waves = time_shift(waves, round(SAMPLE_RATE * c.time_shift_ms / 1000), gen)
        waves = speed_perturb(waves, c.speed_prob, *c.speed_range, gen)
        return mix_noise(waves, self.noise_bank, c.noise_prob, c.noise_volume, c.noise_snr_db, gen)

    def features(self, feats: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """SpecAugment masks, after the shift and noise of ``domain="mel"``."""
        c = self.config
        if c.domain == "mel" and c.changes_audio:
            fc = self.feature_config
            fill = math.log(fc.log_offset)  # log-mel of silence: zero power
            feats = shift_frames(feats, shift_in_frames(c.time_shift_ms, fc.hop_ms), fill, gen)
            if self.noise_power is not None:
                feats = mix_noise_mel(
                    feats, self.noise_power, c.noise_prob, c.noise_volume, c.noise_snr_db,
                    fc.log_offset, gen,
                )  # fmt: skip
        return spec_augment(
            feats, c.time_masks, c.time_mask_frames, c.freq_masks, c.freq_mask_bins, gen
        )


def noise_mel_power(noise_bank: torch.Tensor, features: FeatureConfig) -> torch.Tensor:
    """Mel power ``(n_mels, frames)`` of the concatenated background recordings.

    Frame ``j`` is centred on sample ``j * hop``, as frame ``i`` of a clip cut at
    sample ``k * hop`` is centred on sample ``(k + i) * hop``: away from the
    clip's two ends, the frames of a clip cut from the bank are these columns.
    A bank too short for one frame (none, as a dataset may have) has no columns:
    no clip gets noise, as :func:`mix_noise` adds none from a bank shorter than a clip.
    """
    from fedkws.data.features import FeatureExtractor

    if noise_bank.numel() <= features.n_fft // 2:  # reflect padding needs more samples
        return torch.zeros(features.n_mels, 0)
    extractor = FeatureExtractor(features)
    with torch.no_grad():
        power = extractor.power(extractor.stft(noise_bank.view(1, -1)))
        return extractor.mel(power)[0].T.contiguous()
