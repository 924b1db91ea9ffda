"""Feature extraction, the memory-mapped cache, and the mini-batch loader."""

from __future__ import annotations

import json
from pathlib import Path

import librosa
import numpy as np
import pytest
import torch

from fedkws.data import audio
from fedkws.data.augment import AugmentConfig, Augmenter
from fedkws.data.cache import DataConfig, open_cache, prepare
from fedkws.data.features import FeatureConfig, FeatureExtractor
from fedkws.data.loader import iterate_batches


def test_default_features_are_40_by_101():
    cfg = FeatureConfig()
    assert (cfg.win_length, cfg.hop_length) == (480, 160)
    out = FeatureExtractor(cfg)(torch.zeros(3, audio.CLIP_SAMPLES))
    assert out.shape == (3, 1, 40, 101)
    mfcc = FeatureExtractor(FeatureConfig(kind="mfcc", n_mfcc=13))(torch.zeros(2, 16000))
    assert mfcc.shape == (2, 1, 13, 101)


def test_logmel_matches_librosa():
    rng = np.random.default_rng(0)
    t = np.arange(audio.CLIP_SAMPLES) / audio.SAMPLE_RATE
    wave = (0.3 * np.sin(2 * np.pi * 700 * t) + 0.05 * rng.standard_normal(t.size)).astype(
        np.float32
    )
    cfg = FeatureConfig()
    ours = FeatureExtractor(cfg)(torch.from_numpy(wave)[None])[0, 0].numpy()
    ref = librosa.feature.melspectrogram(
        y=wave, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
        win_length=cfg.win_length, window="hann", center=True, pad_mode="reflect",
        power=2.0, n_mels=cfg.n_mels, fmin=cfg.f_min, fmax=cfg.f_max, htk=False, norm="slaney",
    )  # fmt: skip
    ref = np.log(ref + cfg.log_offset)
    assert ours.shape == ref.shape
    # Where there is energy the two agree to a small fraction of a log unit.
    assert np.abs(ours - ref).max() < 1e-2


@pytest.mark.parametrize("kind", ["logmel", "mfcc"])
def test_features_equal_torchaudios_transforms(kind):
    # An independent computation: torchaudio's own MelSpectrogram / MFCC modules.
    import torchaudio.transforms as T

    cfg = FeatureConfig(kind=kind)
    waves = 0.1 * torch.randn(4, audio.CLIP_SAMPLES, generator=torch.Generator().manual_seed(0))
    mel_kwargs = dict(
        n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length, f_min=cfg.f_min,
        f_max=cfg.f_max, n_mels=cfg.n_mels, window_fn=torch.hann_window, power=2.0,
        center=True, pad_mode="reflect", norm="slaney", mel_scale="slaney",
    )  # fmt: skip
    log_mel = torch.log(T.MelSpectrogram(cfg.sample_rate, **mel_kwargs)(waves) + cfg.log_offset)
    if kind == "mfcc":
        dct = T.MFCC(cfg.sample_rate, cfg.n_mfcc, log_mels=True, melkwargs=mel_kwargs).dct_mat
        log_mel = torch.matmul(log_mel.transpose(-1, -2), dct).transpose(-1, -2)
    ours = FeatureExtractor(cfg)(waves)[:, 0]
    assert torch.equal(ours, log_mel)  # bitwise: cached features of older runs stay valid


def test_feature_key_changes_with_any_field():
    base = FeatureConfig()
    assert base.key() == FeatureConfig().key()
    assert base.key() != FeatureConfig(n_mels=64).key()
    assert base.key() != FeatureConfig(kind="mfcc").key()
    with pytest.raises(ValueError, match="logmel, mfcc"):
        FeatureConfig(kind="spectrogram")


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"f_min": 8000.0, "f_max": 7600.0}, "f_min < f_max"),
     ({"f_max": 9000.0}, "f_max <= 8000 Hz"),
     ({"kind": "mfcc", "n_mfcc": 41}, "n_mfcc=41 is more than n_mels=40")],
)  # fmt: skip
def test_impossible_filterbanks_are_refused(fields, message):
    # torchaudio's functional filterbank and DCT would build all-zero filters silently.
    with pytest.raises(ValueError, match=message):
        FeatureConfig(**fields)


def test_cache_built_once_reused_and_invalidated(tiny_root, tmp_path, monkeypatch):
    import shutil

    # A copy of its own: the test touches a file, and tiny_root is shared by the xdist workers.
    tiny_root = Path(shutil.copytree(tiny_root, tmp_path / "tiny"))
    tmp_path = tmp_path / "cache"
    calls = {"clips": 0}
    real = audio.read_clip

    def counting(*args, **kwargs):
        calls["clips"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr("fedkws.data.cache.read_clip", counting)
    config = DataConfig(root=str(tiny_root))
    first = prepare(config, FeatureConfig(), tmp_path, progress=False)
    decoded = calls["clips"]
    assert decoded > 0
    feats_path = first.path / f"features-{FeatureConfig().key()}.npy"
    mtime = feats_path.stat().st_mtime_ns

    open_cache.cache_clear()
    again = prepare(config, FeatureConfig(), tmp_path, progress=False)
    assert calls["clips"] == decoded  # nothing decoded again
    assert feats_path.stat().st_mtime_ns == mtime  # nothing recomputed
    assert again.path == first.path
    assert isinstance(again.features, np.memmap) and isinstance(again.waves, np.memmap)

    mfcc = prepare(config, FeatureConfig(kind="mfcc"), tmp_path, progress=False)
    assert calls["clips"] == decoded  # new features from the cached waveforms
    assert mfcc.path == first.path and mfcc.feature_key != first.feature_key
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert len(manifest["features"]) == 2

    other = prepare(DataConfig(root=str(tiny_root), seed=1), FeatureConfig(), tmp_path, False)
    assert other.path != first.path  # other protocol draw -> new entry

    # Touching the dataset (a changed file) invalidates the waveform cache too.
    wav = next((tiny_root / "yes").glob("*.wav"))
    stat = wav.stat()
    import os

    os.utime(wav, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = prepare(config, FeatureConfig(), tmp_path, progress=False)
    assert changed.path != first.path


def test_cached_features_equal_fresh_computation(tiny_root, tmp_path):
    data = prepare(DataConfig(root=str(tiny_root)), FeatureConfig(), tmp_path, progress=False)
    rows = np.arange(5)
    fresh = FeatureExtractor(FeatureConfig())(torch.from_numpy(np.asarray(data.waves[rows])))
    assert torch.allclose(fresh, torch.from_numpy(np.asarray(data.features[rows])), atol=1e-5)


def test_loader_shuffles_deterministically_and_augments_training_only(tiny_root, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    data = prepare(DataConfig(root=str(tiny_root)), FeatureConfig(), tmp_path, progress=False)
    rows = data.split_indices("training")[:64]

    def batches(seed, **kw):
        gen = torch.Generator().manual_seed(seed)
        return list(iterate_batches(data, rows, 16, gen, shuffle=True, **kw))

    a, b, c = batches(1), batches(1), batches(2)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b, strict=False))
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, c, strict=False))
    # Un-augmented batches are exactly the cached features.
    plain = list(iterate_batches(data, rows, 16))
    assert torch.equal(plain[0][0], torch.from_numpy(np.asarray(data.features[rows[:16]])))

    # Waveform augmentation works from the memory map: decoding a WAV would fail here.
    monkeypatch.setattr("fedkws.data.audio.read_clip", lambda *a, **k: 1 / 0)
    monkeypatch.setattr("fedkws.data.cache.read_clip", lambda *a, **k: 1 / 0)
    aug = Augmenter(AugmentConfig(time_shift_ms=100, noise_prob=1.0),
                    data.noise_bank())  # fmt: skip
    extractor = FeatureExtractor(FeatureConfig())
    augmented = batches(1, augmenter=aug, extractor=extractor)
    assert augmented[0][0].shape == a[0][0].shape
    assert not torch.allclose(augmented[0][0], a[0][0])
    assert torch.equal(augmented[0][1], a[0][1])  # labels untouched


def test_an_entry_built_again_in_place_is_opened_again(make_cfg, tmp_path):
    # Catches: a process that serves many runs (a sweep's process; Ray actors handed on
    # from one job to the next) reading the memory maps of files a later run replaced
    # (a damaged entry or feature-shift variant built again), through open_cache's cache;
    # and one that opens an entry another process is still building.
    import os
    import shutil

    from fedkws.data.cache import open_current
    from fedkws.recipes.common import load_data
    from fedkws.spec import from_config

    data = load_data(from_config(make_cfg([])))
    entry = tmp_path / "entry"
    shutil.copytree(data.path, entry)
    first = open_current(str(entry), data.feature_key)
    assert open_current(str(entry), data.feature_key) is first  # unchanged: not opened again
    features = entry / f"features-{data.feature_key}.npy"
    rebuilt = np.asarray(first.features) + 1.0
    np.save(tmp_path / "new.npy", rebuilt)
    manifest = (entry / "manifest.json").read_bytes()
    (entry / "manifest.json").unlink()  # a build in progress (it writes the manifest last) ...
    os.replace(tmp_path / "new.npy", features)  # ... replaces its files whole
    assert open_current(str(entry), data.feature_key) is first  # meanwhile: the files before
    (entry / "manifest.json").write_bytes(manifest)  # the build is done
    assert np.array_equal(open_cache(str(entry), data.feature_key).features, first.features)
    assert np.array_equal(open_current(str(entry), data.feature_key).features, rebuilt)
