"""Feature-shift clients (partition.channels): each client hears its own recording channel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedkws.data.cache import open_cache
from fedkws.data.channel import apply_channel, assignment
from fedkws.data.features import FeatureConfig, FeatureExtractor
from fedkws.run import run
from helpers import SMALL_FEDERATION

BASE = [*SMALL_FEDERATION, "federation.backend=inprocess", "train.rounds=1",
        "train.local_epochs=1", "bn=local", "partition.num_clients=3"]  # fmt: skip


def _logmel_mean(waves: np.ndarray) -> np.ndarray:
    feats = FeatureExtractor(FeatureConfig())(torch.from_numpy(waves)).numpy()
    return feats.mean(axis=(0, 1, 3))  # per mel band


def test_channels_shift_the_spectrum_more_than_the_clips_differ():
    # Two halves of the same clips through one channel vs through two channels.
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    clips = np.stack([0.2 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(16000)
                      for f in rng.uniform(100, 3000, 40)]).astype(np.float32)  # fmt: skip
    a, b = clips[:20], clips[20:]
    same = np.abs(
        _logmel_mean(apply_channel(a, 0, range(20)))
        - _logmel_mean(apply_channel(b, 0, range(20, 40)))
    )
    shifted = np.abs(
        _logmel_mean(apply_channel(a, 0, range(20))) - _logmel_mean(apply_channel(a, 1, range(20)))
    )
    assert shifted.mean() > 3 * same.mean()
    # Deterministic: the same clips, channel and seed give the same recording.
    assert np.array_equal(apply_channel(a, 3, range(20)), apply_channel(a, 3, range(20)))


def test_assignment_follows_clients_then_speakers():
    speakers = np.array(["s1", "s1", "s2", "s2", "s3", "s3", "s4"])
    held = [np.array([0, 1]), np.array([2]), np.array([3])]
    got = assignment(7, speakers, held, channels=2)
    assert list(got[[0, 1]]) == [0, 0] and got[2] == 1 and got[3] == 0  # client k: k mod 2
    assert got[4] == got[5]  # rows no client holds: one channel per speaker
    assert set(got) <= {0, 1}


def test_a_shifted_run_trains_each_client_on_its_channel(make_cfg, tmp_path):
    cfg = make_cfg([*BASE, "partition.channels=3"])
    result = run(cfg, tmp_path / "run")
    assert result.summary["complete"]
    with np.load(tmp_path / "run" / "clients.npz") as npz:
        rows = {int(k.split("_")[1]): npz[k] for k in npz.files if k.startswith("train_")}
    from fedkws.recipes.common import load_data
    from fedkws.spec import from_config

    spec = from_config(cfg)
    plain = load_data(spec)
    variants = sorted(p.name for p in plain.path.glob("features-*@*.npy"))
    assert len(variants) == 1, variants
    shifted = open_cache(str(plain.path), variants[0][len("features-") : -len(".npy")])
    extractor = FeatureExtractor(spec.features)
    for pid, client_rows in rows.items():
        row = int(client_rows[0])
        # Independently: the stored clip through client pid's channel, then the features.
        want = apply_channel(np.asarray(plain.waves[row : row + 1]), pid, [row])
        assert np.allclose(shifted.waves[row], want[0], atol=1e-6)
        feats = extractor(torch.from_numpy(want)).numpy()[0]
        assert np.allclose(shifted.features[row], feats, atol=1e-4)
        assert not np.allclose(shifted.features[row], plain.features[row], atol=0.1)


def test_negative_channels_is_a_config_error(make_cfg):
    from fedkws.errors import ConfigError
    from fedkws.spec import from_config

    with pytest.raises(ConfigError, match="partition.channels"):
        from_config(make_cfg([*BASE, "partition.channels=-1"]))


def test_a_damaged_variant_is_built_again_not_used(make_cfg, caplog):
    # Catches: a variant's files taken as they are (only their existence was checked): zeroed
    # features trained every client at chance, exit 0; a truncated file was a traceback.
    from fedkws.data.channel import build_variant
    from fedkws.recipes.common import load_data
    from fedkws.spec import from_config

    spec = from_config(make_cfg([]))
    data = load_data(spec)
    channels = np.arange(len(data.labels)) % 5 // 2  # this test's own variant (its own files)
    fkey = build_variant(data.path, spec.features, channels, lambda n: None)
    feats = data.path / f"features-{fkey}.npy"
    waves = next(data.path.glob(f"waves@{fkey.split('@')[1]}.npy"))
    built = {p: p.read_bytes() for p in (feats, waves)}
    damages = [
        (feats, lambda p: p.write_bytes(p.read_bytes()[:200] + bytes(p.stat().st_size - 200))),
        (waves, lambda p: p.write_bytes(p.read_bytes()[:1000])),
        (feats.with_suffix(".json"), lambda p: p.unlink()),  # no record: not trusted
    ]
    for path, damage in damages:
        damage(path)
        caplog.clear()
        assert build_variant(data.path, spec.features, channels, lambda n: None) == fkey
        assert {p: p.read_bytes() for p in built} == built, path.name
        if path.suffix == ".npy":
            assert "is damaged" in caplog.text and path.name in caplog.text
