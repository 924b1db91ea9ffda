"""The real-dataset loader: split rule, protocols, bad input."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fedkws.data.audio import CLIP_SAMPLES, SAMPLE_RATE, AudioReport, read_clip
from fedkws.data.cache import DataConfig, prepare
from fedkws.data.features import FeatureConfig
from fedkws.data.speech_commands import (
    LABELS_12,
    WORDS_V2,
    DatasetNotFoundError,
    build_index,
    speaker_of,
    which_set,
)


def test_which_set_puts_every_official_test_file_in_testing(reference):
    names = (reference / "testing_list.txt").read_text().split()
    assert len(names) == 11_005
    assigned = {which_set(name) for name in names}
    assert assigned == {"testing"}


def test_which_set_spreads_speakers_roughly_80_10_10():
    speakers = [f"{i:08x}_nohash_0.wav" for i in range(4000)]
    counts = {s: 0 for s in ("training", "validation", "testing")}
    for name in speakers:
        counts[which_set(name)] += 1
    assert 0.07 < counts["validation"] / 4000 < 0.13
    assert 0.07 < counts["testing"] / 4000 < 0.13
    # Same speaker, other utterance: same split.
    assert which_set("yes/0a7c2a8d_nohash_0.wav") == which_set("no/0a7c2a8d_nohash_3.wav")


def test_real_float_recording_loads_as_one_second_16k_mono(reference):
    path = reference / "bed" / "00176480_nohash_0.wav"
    assert sf.info(str(path)).subtype == "FLOAT"
    report = AudioReport()
    wave = read_clip(path, report)
    assert wave.shape == (CLIP_SAMPLES,) and wave.dtype == np.float32
    assert 0.001 < float(np.abs(wave).max()) <= 1.0
    assert report.read == 1 and report.resampled == 0 and report.downmixed == 0
    assert speaker_of(path.name) == "00176480"


def test_synthetic_dataset_12class_balance(tiny_root):
    index = build_index(tiny_root, "12class", seed=0)
    assert index.labels == LABELS_12
    assert index.split_source == "official lists"
    for split, counts in index.counts().items():
        known = sum(counts[w] for w in LABELS_12[2:])
        if known == 0:
            continue
        assert counts["_silence_"] == math.ceil(known * 0.10), split
        # 25 non-command words per speaker: always enough to fill the 10 % quota.
        assert counts["_unknown_"] == math.ceil(known * 0.10), split
        # Every one of the ten words has the same count (each speaker says each word).
        assert len({counts[w] for w in LABELS_12[2:]}) == 1


def test_synthetic_dataset_35class(tiny_root):
    index = build_index(tiny_root, "35class")
    assert index.labels == WORDS_V2
    per_label = np.bincount([it.label for it in index.items], minlength=35)
    assert (per_label == per_label[0]).all() and per_label[0] > 0


def test_index_is_deterministic_given_seed(tiny_root):
    a = build_index(tiny_root, "12class", seed=3).items
    b = build_index(tiny_root, "12class", seed=3).items
    c = build_index(tiny_root, "12class", seed=4).items
    assert a == b
    assert a != c  # silence slices / unknown subset depend on the seed


def test_missing_root_names_path_and_commands(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as err:
        build_index(missing)
    message = str(err.value)
    assert str(missing) in message
    assert "fedkws generate" in message and "fedkws download" in message
    assert "\n" not in message


def test_unknown_protocol_lists_valid_ones(tiny_root):
    with pytest.raises(ValueError, match="12class, 35class"):
        build_index(tiny_root, "10class")


@pytest.fixture
def messy_root(tiny_root, tmp_path) -> Path:
    """A copy of a few real-layout folders plus every kind of bad or odd file."""
    root = tmp_path / "messy"
    for word in ("yes", "no", "bed", "_background_noise_"):
        shutil.copytree(tiny_root / word, root / word)
    for name in ("validation_list.txt", "testing_list.txt"):
        shutil.copy(tiny_root / name, root / name)
    rng = np.random.default_rng(0)
    tone = (0.3 * np.sin(np.arange(SAMPLE_RATE) * 2 * np.pi * 440 / SAMPLE_RATE)).astype(np.float32)
    (root / "yes" / "deadbeef_nohash_0.wav").write_bytes(b"RIFF\x00\x00garbage" + rng.bytes(200))
    (root / "yes" / "deadbeef_nohash_1.wav").write_bytes(b"")
    sf.write(root / "no" / "cafe0001_nohash_0.wav", tone[::2], 8000, subtype="PCM_16")
    sf.write(root / "no" / "cafe0002_nohash_0.wav", np.stack([tone, -tone * 0.5], 1), SAMPLE_RATE)
    sf.write(root / "no" / "cafe0003_nohash_0.wav", tone, SAMPLE_RATE, subtype="PCM_U8")
    sf.write(root / "no" / "cafe0004_nohash_0.wav", tone, SAMPLE_RATE, subtype="FLOAT")
    (root / "foo").mkdir()
    sf.write(root / "foo" / "cafe0005_nohash_0.wav", tone, SAMPLE_RATE)
    return root


def test_odd_formats_are_read_correctly(messy_root):
    report = AudioReport()
    no = messy_root / "no"
    down = read_clip(no / "cafe0001_nohash_0.wav", report)
    stereo = read_clip(no / "cafe0002_nohash_0.wav", report)
    u8 = read_clip(no / "cafe0003_nohash_0.wav", report)
    f32 = read_clip(no / "cafe0004_nohash_0.wav", report)
    assert report.resampled == 1 and report.downmixed == 1
    for wave in (down, stereo, u8, f32):
        assert wave.shape == (CLIP_SAMPLES,)
    # 8 kHz input, half the samples: resampled to a full second of 16 kHz audio.
    assert np.abs(down[: SAMPLE_RATE - 200]).max() > 0.2
    # Stereo (x, -x/2) mixes down to x/4.
    assert np.allclose(stereo, f32 * 0.25, atol=1e-4)
    # 8-bit unsigned PCM comes back centred and scaled like the float original.
    assert np.abs(u8 - f32).max() < 0.02


def test_bad_files_are_skipped_counted_and_reported(messy_root, tmp_path, caplog):
    config = DataConfig(root=str(messy_root), protocol="12class", unknown_percentage=100.0)
    with caplog.at_level(logging.WARNING):
        data = prepare(config, FeatureConfig(), tmp_path / "cache", progress=False)
    skipped = data.manifest["skipped_files"]
    assert sorted(Path(p).name for p in skipped) == [
        "deadbeef_nohash_0.wav",
        "deadbeef_nohash_1.wav",
    ]
    summary_lines = [r.message for r in caplog.records if "skipped" in r.message]
    assert len(summary_lines) == 1
    assert "2 skipped" in summary_lines[0] and "1 resampled" in summary_lines[0]
    # Everything else made it in: the odd-format files and the foreign word folder.
    paths = set(data.paths.tolist())
    for name in ("no/cafe0001_nohash_0.wav", "no/cafe0002_nohash_0.wav",
                 "no/cafe0003_nohash_0.wav", "no/cafe0004_nohash_0.wav"):  # fmt: skip
        assert name in paths, name
    foo = [i for i, p in enumerate(data.paths) if p.startswith("foo/")]
    assert foo and all(data.label_names[data.labels[i]] == "_unknown_" for i in foo)
    assert np.isfinite(np.asarray(data.waves)).all()


def test_missing_split_lists_fall_back_to_hash_rule(messy_root, caplog):
    (messy_root / "validation_list.txt").unlink()
    (messy_root / "testing_list.txt").unlink()
    with caplog.at_level(logging.INFO):
        index = build_index(messy_root, "12class")
    assert index.split_source == "hash rule"
    assert sum("hash rule" in r.message for r in caplog.records) == 1
    for item in index.items:
        if item.path is not None:
            assert item.split == which_set(item.path)


def _wav_data_chunk(path: Path) -> tuple[int, bytes]:
    """Bits per sample and raw sample bytes of a PCM WAV, parsed without soundfile."""
    blob = path.read_bytes()
    assert blob[:4] == b"RIFF" and blob[8:12] == b"WAVE"
    pos, bits, data = 12, None, None
    while pos + 8 <= len(blob):
        tag, size = blob[pos : pos + 4], int.from_bytes(blob[pos + 4 : pos + 8], "little")
        body = blob[pos + 8 : pos + 8 + size]
        if tag == b"fmt ":
            bits = int.from_bytes(body[14:16], "little")
        elif tag == b"data":
            data = body
        pos += 8 + size + (size & 1)
    return bits, data


def test_24_bit_pcm_is_read_exactly(tmp_path):
    rng = np.random.default_rng(0)
    ints = rng.integers(-(2**23), 2**23, size=SAMPLE_RATE, dtype=np.int64)
    ints[:4] = [-(2**23), 2**23 - 1, 0, -1]  # the extremes and the smallest steps
    path = tmp_path / "cafe0024_nohash_0.wav"
    # soundfile writes int32 to PCM_24 by keeping the top 24 bits.
    sf.write(path, (ints << 8).astype(np.int32), SAMPLE_RATE, subtype="PCM_24")
    assert sf.info(str(path)).subtype == "PCM_24"

    bits, raw = _wav_data_chunk(path)
    assert bits == 24
    triples = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int64)
    stored = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
    stored = np.where(stored >= 2**23, stored - 2**24, stored)
    np.testing.assert_array_equal(stored, ints)  # the file holds exactly these samples

    report = AudioReport()
    wave = read_clip(path, report)
    assert wave.dtype == np.float32 and report.read == 1 and report.resampled == 0
    # 24-bit integers divided by 2**23 are exact in float32 (24-bit mantissa).
    np.testing.assert_array_equal(wave, (ints / 2**23).astype(np.float32))
    assert wave[0] == -1.0 and wave[1] == np.float32((2**23 - 1) / 2**23)
