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


def test_time_shift_equals_an_index_computation_for_every_shift():
    # Catches an off-by-one at either edge and shifts of a whole clip or more (silence).
    waves = torch.randn(64, 1000)
    for max_samples in (1, 999, 1000, 3000):
        out = time_shift(waves, max_samples, _gen(5))
        shifts = torch.randint(-max_samples, max_samples + 1, (64,), generator=_gen(5))
        pos = torch.arange(1000)[None] - shifts[:, None]  # output sample t reads t - shift
        inside = (pos >= 0) & (pos < 1000)
        expected = torch.where(inside, waves.gather(1, pos.clamp(0, 999)), 0.0)
        assert torch.equal(out, expected), max_samples


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


def _runs(flags: list[bool]) -> list[int]:
    """Lengths of the runs of True in ``flags``."""
    runs, n = [], 0
    for flag in [*flags, False]:
        if flag:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def _bands_needed(flags: list[bool], max_width: int) -> int:
    """Fewest bands of width <= max_width whose union is exactly the True runs."""
    return sum(-(-run // max_width) for run in _runs(flags))


def test_spec_augment_masks_bands():
    # Catches: swapped time/freq widths or counts, masking the whole input, random
    # zeroed cells, masks along the wrong axis, and values changed outside the masks.
    time_masks, time_width, freq_masks, freq_width = 3, 10, 1, 4
    bins, frames = 40, 101  # distinct, so a transposed mask cannot pass
    feats = 0.5 + torch.rand(64, 1, bins, frames, generator=_gen(11))  # no zeros anywhere
    out = spec_augment(feats, time_masks, time_width, freq_masks, freq_width, _gen())
    assert out.shape == feats.shape
    zero = out[:, 0] == 0
    kept = ~zero
    assert torch.equal(out[:, 0][kept], feats[:, 0][kept])  # unmasked cells untouched
    masked_frames = masked_bins = 0
    for z in zero:
        frame_cut = z.all(0)  # frames zero across every bin
        bin_cut = z.all(1)  # bins zero across every frame
        # The zero pattern is exactly the union of full-height time bands and
        # full-width frequency bands: no stray zero cells.
        assert torch.equal(z, frame_cut.unsqueeze(0) | bin_cut.unsqueeze(1))
        assert _bands_needed(frame_cut.tolist(), time_width) <= time_masks
        assert _bands_needed(bin_cut.tolist(), freq_width) <= freq_masks
        masked_frames += int(frame_cut.sum())
        masked_bins += int(bin_cut.sum())
    # Masks were actually drawn along both axes (widths are uniform in 0..max).
    assert masked_frames > 64 * time_masks and masked_bins > 64 * freq_masks
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
