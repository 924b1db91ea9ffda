"""``augment.domain=mel``: the shift and the noise applied to cached log-mels.

The oracles are waveform computations through torchaudio's own
``MelSpectrogram``: a clip shifted by whole hops, and a clip's mel power plus a
noise stretch's mel power. They agree with the mel-domain results on the frames
whose analysis window lies inside the clip and away from the cut (the two ends
differ by the reflect padding, as the module's notes say).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torchaudio

from fedkws.data.augment import AugmentConfig, Augmenter, mix_noise_mel, shift_frames
from fedkws.data.features import FeatureConfig

FC = FeatureConfig()
HOP, FRAMES = FC.hop_length, FC.num_frames(16000)
EDGE = 2  # frames within 2 hops of a cut or an end see the padding (window 480 samples)


def _mel_power(waves: torch.Tensor) -> torch.Tensor:
    """``(batch, mels, frames)`` mel power from torchaudio's transform, not fedkws's extractor."""
    transform = torchaudio.transforms.MelSpectrogram(
        sample_rate=FC.sample_rate, n_fft=FC.n_fft, win_length=FC.win_length,
        hop_length=HOP, f_min=FC.f_min, f_max=FC.f_max, n_mels=FC.n_mels,
        norm="slaney", mel_scale="slaney", power=2.0, center=True, pad_mode="reflect",
    )  # fmt: skip
    return transform(waves)


def _log_mel(waves: torch.Tensor) -> torch.Tensor:
    return torch.log(_mel_power(waves) + FC.log_offset).unsqueeze(1)


def _clips(batch: int, seed: int = 0) -> torch.Tensor:
    """Noisy tones of random pitch and loudness, 1 s at 16 kHz."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(16000) / 16000
    pitch = 200 + 2000 * torch.rand(batch, 1, generator=gen)
    loud = 0.05 + 0.3 * torch.rand(batch, 1, generator=gen)
    return loud * torch.sin(2 * math.pi * pitch * t) + 0.01 * torch.randn(
        batch, 16000, generator=gen
    )


def test_a_frame_shift_is_the_waveform_shifted_by_whole_hops():
    # Catches: a shift in the wrong direction, by the wrong number of frames, a gap filled
    # with anything but silence (log of zero power), and frames rolled round from the end.
    waves = _clips(16)
    max_frames = 10
    out = shift_frames(
        _log_mel(waves), max_frames, math.log(FC.log_offset), torch.Generator().manual_seed(3)
    )
    shifts = torch.randint(
        -max_frames, max_frames + 1, (16,), generator=torch.Generator().manual_seed(3)
    )
    assert shifts.abs().max() > 5 and (shifts > 0).any() and (shifts < 0).any()
    for row, shift in enumerate(shifts.tolist()):
        moved = torch.zeros(16000)
        if shift >= 0:
            moved[shift * HOP :] = waves[row, : 16000 - shift * HOP]
        else:
            moved[: shift * HOP] = waves[row, -shift * HOP :]
        expected = _log_mel(moved[None])[0, 0]
        got = out[row, 0]
        lo, hi = (shift, FRAMES - 1) if shift >= 0 else (0, FRAMES - 1 + shift)  # content
        frames = torch.arange(FRAMES)
        content = (frames >= lo + EDGE) & (frames <= hi - EDGE)
        silence = (frames < lo - EDGE) | (frames > hi + EDGE)
        torch.testing.assert_close(got[:, content], expected[:, content], rtol=0, atol=1e-3)
        assert torch.equal(
            got[:, silence], torch.full_like(got[:, silence], math.log(FC.log_offset))
        )
        assert torch.allclose(expected[:, silence], got[:, silence], atol=1e-6)


@pytest.mark.parametrize("snr_db", [None, (5.0, 5.0)])
def test_mel_noise_is_the_clips_mel_power_plus_the_noise_stretchs(snr_db):
    # Catches: noise added to the log-mels instead of to their power, the volume used
    # unsquared, a stretch taken from another place in the bank than its draw, the gain
    # of one example applied to another, and unchosen examples changed.
    waves, bank = (
        _clips(12, seed=1),
        0.2 * torch.randn(5 * 16000, generator=torch.Generator().manual_seed(2)),
    )
    feats = _log_mel(waves)
    noise_power = _mel_power(bank[None])[0]  # (mels, bank frames), frame j centred on j * HOP
    volume = (0.3, 0.3)
    gen = torch.Generator().manual_seed(4)
    out = mix_noise_mel(feats, noise_power, 0.5, volume, snr_db, FC.log_offset, gen)
    # The same draws, in the order the waveform mix_noise makes them.
    gen = torch.Generator().manual_seed(4)
    chosen = torch.rand(12, generator=gen) < 0.5
    starts = torch.randint(0, noise_power.shape[1] - FRAMES + 1, (12,), generator=gen)
    assert 0 < chosen.sum() < 12
    inner = slice(EDGE, FRAMES - EDGE)
    for row in range(12):
        if not chosen[row]:
            assert torch.equal(out[row], feats[row])
            continue
        clean = _mel_power(waves[row : row + 1])[0]
        stretch = bank[starts[row] * HOP : starts[row] * HOP + 16000]
        noise = _mel_power(stretch[None])[0]  # computed from the samples, not the bank's columns
        if snr_db is None:
            gain = volume[0] ** 2
        else:
            gain = clean.mean() / (
                noise_power[:, starts[row] : starts[row] + FRAMES].mean() * 10**0.5
            )
        expected = torch.log(clean + gain * noise + FC.log_offset)
        torch.testing.assert_close(out[row, 0][:, inner], expected[:, inner], rtol=0, atol=1e-3)


def test_the_augmenter_shifts_then_adds_noise_and_refuses_what_has_no_mel_form():
    # Catches: domain=mel leaving out the shift or the noise, a shift counted in samples
    # or milliseconds instead of frames, and speed perturbation or MFCCs accepted where
    # nothing would apply them.
    bank = 0.2 * torch.randn(3 * 16000, generator=torch.Generator().manual_seed(5))
    config = AugmentConfig(
        time_shift_ms=100.0, noise_prob=1.0, noise_volume=(0.5, 0.5), domain="mel"
    )
    assert not config.needs_waves and config.any
    feats = _log_mel(_clips(8, seed=6))
    augmenter = Augmenter(config, bank, FC)
    out = augmenter.features(feats, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    shifted = shift_frames(feats, 10, math.log(FC.log_offset), gen)  # 100 ms = 10 hops
    assert not torch.equal(shifted, feats)
    noise_power = _mel_power(bank[None])[0]
    expected = mix_noise_mel(shifted, noise_power, 1.0, (0.5, 0.5), None, FC.log_offset, gen)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="speed"):
        Augmenter(AugmentConfig(speed_prob=0.5, domain="mel"), bank, FC)
    with pytest.raises(ValueError, match="log-mel"):
        Augmenter(config, bank, FeatureConfig(kind="mfcc"))


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["augment=default", "augment.domain=mel"], None),
        (["augment=specaugment", "augment.domain=mel", "features=mfcc"], None),  # masks only
        (["augment=default", "augment.domain=mel", "features=mfcc"], "augment.domain='mel'"),
        (["augment=full", "augment.domain=mel"], "augment.speed_prob=0.5"),
        (["augment.domain=spectrum"], "augment.domain='spectrum': must be one of wave, mel"),
        # 4 ms rounds to no frame at all: the shift would silently not happen.
        (["augment=shift", "augment.time_shift_ms=4", "augment.domain=mel"], "at least half a hop"),
    ],
)
def test_the_config_says_which_domains_apply(overrides, problem, tmp_path):
    # Catches: a mel-domain run with MFCCs or speed perturbation accepted, where the shift,
    # noise or speed change would silently not happen; masks-only runs refused for nothing.
    from fedkws.errors import ConfigError
    from fedkws.spec import from_config
    from helpers import compose_cfg

    if problem is None:
        assert from_config(compose_cfg(overrides, tmp_path)).augment.domain == "mel"
        return
    with pytest.raises(ConfigError, match=re.escape(problem)):
        from_config(compose_cfg(overrides, tmp_path))


def test_a_dataset_without_noise_gets_none_in_either_domain():
    # Catches: a mel-domain run failing on a dataset whose noise bank is empty or shorter
    # than an STFT frame (the waveform domain adds no noise then, and draws nothing).
    feats = _log_mel(_clips(4, seed=7))
    for samples in (0, 100, 15999):
        config = AugmentConfig(noise_prob=1.0, noise_volume=(0.5, 0.5), domain="mel")
        gen = torch.Generator().manual_seed(0)
        out = Augmenter(config, torch.zeros(samples), FC).features(feats, gen)
        assert torch.equal(out, feats), samples
        assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())


def test_a_run_saved_before_the_option_resumes_in_the_waveform_domain():
    # Catches: every checkpoint written before augment.domain existed refused on resume,
    # and a real change of domain let through.
    from fedkws.recipes.common import _differences, _with_implied_keys

    old = {"augment": {"time_shift_ms": 100.0}, "seed": 0}
    for domain, expected in (("wave", []), ("mel", ["augment.domain"])):
        new = {"augment": {"time_shift_ms": 100.0, "domain": domain}, "seed": 0}
        assert _differences(_with_implied_keys(old, new), new) == expected
