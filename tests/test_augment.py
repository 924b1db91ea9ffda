"""Each augmentation does what its name says, reproducibly."""

from __future__ import annotations

import torch

from fedkws.data.augment import (
    AugmentConfig,
    Augmenter,
    mix_noise,
    spec_augment,
    speed_perturb,
    time_shift,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_time_shift_moves_content_and_zero_fills():
    waves = torch.zeros(8, 1000)
    waves[:, 500] = 1.0
    out = time_shift(waves, 100, _gen())
    peaks = out.argmax(1)
    assert (out.sum(1) == 1).all()  # the impulse is moved, not lost
    assert ((peaks - 500).abs() <= 100).all() and (peaks != 500).any()
    assert torch.equal(time_shift(waves, 0, _gen()), waves)


def test_speed_perturbation_changes_length_of_content():
    waves = torch.zeros(4, 16000)
    waves[:, :8000] = 1.0
    out = speed_perturb(waves, 1.0, 0.8, 0.8, _gen())
    # Slower (factor 0.8): the 8000-sample block stretches to 10000 samples.
    assert abs(int((out[0] > 0.5).sum()) - 10000) <= 2
    assert torch.equal(speed_perturb(waves, 0.0, 0.8, 0.8, _gen()), waves)


def test_noise_mixing_respects_probability_and_snr():
    waves = 0.1 * torch.randn(200, 4000, generator=_gen(1))
    bank = torch.randn(50000, generator=_gen(2))
    assert torch.equal(mix_noise(waves, bank, 0.0, (0, 0.1), None, _gen()), waves)
    out = mix_noise(waves, bank, 0.5, (0.0, 0.1), None, _gen())
    changed = (out != waves).any(1).float().mean()
    assert 0.35 < changed < 0.65
    snr = mix_noise(waves, bank, 1.0, (0.0, 0.1), (10.0, 10.0), _gen())
    noise = snr - waves
    measured = 10 * torch.log10(waves.pow(2).mean(1) / noise.pow(2).mean(1))
    assert torch.allclose(measured, torch.full_like(measured, 10.0), atol=0.2)


def test_spec_augment_masks_bands():
    feats = torch.ones(16, 1, 40, 101)
    out = spec_augment(feats, 2, 10, 2, 5, _gen())
    zeros = (out == 0).float()
    assert zeros.sum() > 0
    # Masked frames are zero across all bins, masked bins across all frames.
    frame_zero = zeros.mean(2).squeeze(1)  # (batch, frames)
    assert ((frame_zero == 0) | (frame_zero == 1) | (zeros.mean(3).squeeze(1).max() == 1)).all()
    assert torch.equal(spec_augment(feats, 0, 10, 0, 5, _gen()), feats)


def test_augmenter_is_deterministic_given_generator():
    cfg = AugmentConfig(time_shift_ms=50, noise_prob=0.8, speed_prob=0.5, time_masks=1)
    aug = Augmenter(cfg, torch.randn(40000, generator=_gen(3)))
    waves = torch.randn(6, 16000, generator=_gen(4))
    assert torch.equal(aug.waves(waves, _gen(7)), aug.waves(waves, _gen(7)))
    assert not torch.equal(aug.waves(waves, _gen(7)), aug.waves(waves, _gen(8)))
    assert cfg.needs_waves and cfg.any
    assert not AugmentConfig(time_masks=2).needs_waves and AugmentConfig(time_masks=2).any
    assert not AugmentConfig().any
