"""Tests of the synthetic Speech Commands generator (tiny sizes, a few seconds each)."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fedkws.data import synth
from fedkws.data.audio import CLIP_SAMPLES, SAMPLE_RATE
from fedkws.data.speech_commands import BACKGROUND_NOISE_DIR, WORDS_V2, speaker_of, which_set

NAME_RE = re.compile(r"^[0-9a-f]{8}_nohash_\d+\.wav$")
SPEAKERS = 6
UTTERANCES = 1
NOISE_SECONDS = 1.5


def _generate(root: Path, seed: int = 0, **kwargs) -> synth.SynthSummary:
    params = dict(
        num_speakers=SPEAKERS,
        utterances_per_word=UTTERANCES,
        seed=seed,
        noise_seconds=NOISE_SECONDS,
        progress=False,
    )
    params.update(kwargs)
    return synth.generate(root, **params)


def _all_files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def _clips(root: Path) -> list[Path]:
    return sorted(p for w in WORDS_V2 for p in (root / w).glob("*.wav"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, synth.SynthSummary]:
    root = tmp_path_factory.mktemp("synth") / "speech_commands"
    summary = _generate(root)
    return root, summary


def test_layout_and_names(dataset):
    root, summary = dataset
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(
        (*WORDS_V2, BACKGROUND_NOISE_DIR)
    )
    for word in WORDS_V2:
        names = sorted(p.name for p in (root / word).iterdir())
        assert len(names) == SPEAKERS * UTTERANCES, word
        assert all(NAME_RE.match(n) for n in names), names
    assert summary.num_clips == len(WORDS_V2) * SPEAKERS * UTTERANCES == len(_clips(root))
    assert summary.num_speakers == SPEAKERS
    assert summary.bytes_on_disk > summary.num_clips * 2 * CLIP_SAMPLES
    assert "clips" in str(summary)
    # nothing half-written is left behind, and the completion marker is there
    assert not list(root.rglob("*.tmp"))
    assert not (root / ".fedkws_synth_in_progress").exists()
    assert (root / "README.txt").is_file()
    marker = synth.read_marker(root)
    assert marker is not None and marker["num_clips"] == summary.num_clips
    assert synth.is_complete(
        root,
        num_speakers=SPEAKERS,
        utterances_per_word=UTTERANCES,
        seed=0,
        words=WORDS_V2,
        noise_seconds=NOISE_SECONDS,
    )
    assert not synth.is_complete(root, seed=1)


def test_every_speaker_says_every_word(dataset):
    root, _ = dataset
    speakers_by_word = {w: {speaker_of(p.name) for p in (root / w).glob("*.wav")} for w in WORDS_V2}
    first = speakers_by_word[WORDS_V2[0]]
    assert len(first) == SPEAKERS
    assert all(s == first for s in speakers_by_word.values())


def test_clip_format(dataset):
    root, _ = dataset
    for path in _clips(root):
        info = sf.info(str(path))
        assert info.format == "WAV"
        assert info.subtype == "PCM_16"
        assert info.samplerate == SAMPLE_RATE
        assert info.channels == 1
        assert info.frames == CLIP_SAMPLES


def test_background_noise(dataset):
    root, _ = dataset
    noise_dir = root / BACKGROUND_NOISE_DIR
    assert sorted(p.name for p in noise_dir.iterdir()) == sorted(synth.NOISE_FILES)
    waves = {}
    for name in synth.NOISE_FILES:
        info = sf.info(str(noise_dir / name))
        assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
        assert info.frames == round(NOISE_SECONDS * SAMPLE_RATE)
        wave, _ = sf.read(str(noise_dir / name))
        rms = np.sqrt(np.mean(wave**2))
        assert 0.005 < rms < 0.5, name
        waves[name] = wave
    # six different textures, not six copies
    spectra = {
        n: np.log(np.abs(np.fft.rfft(w))[1:].reshape(50, -1).mean(1)) for n, w in waves.items()
    }
    names = list(spectra)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.allclose(spectra[a], spectra[b], atol=0.5), (a, b)


def test_split_lists_match_which_set(dataset):
    root, summary = dataset
    rels = [f"{p.parent.name}/{p.name}" for p in _clips(root)]
    for split in ("validation", "testing"):
        lines = (root / f"{split}_list.txt").read_text().splitlines()
        assert lines == sorted(lines)
        assert lines == sorted(r for r in rels if which_set(r) == split)
        assert all((root / line).is_file() for line in lines)
        assert lines, f"{split} split is empty"
    assert summary.speakers_per_split["validation"] >= 1
    assert summary.speakers_per_split["testing"] >= 1
    assert sum(summary.speakers_per_split.values()) == SPEAKERS


@pytest.mark.parametrize("n", [3, 6, 20, 57, 200])
def test_speaker_ids_split_proportions(n):
    ids = synth.choose_speaker_ids(seed=3, num_speakers=n)
    assert ids == synth.choose_speaker_ids(seed=3, num_speakers=n)
    assert len(set(ids)) == n
    assert all(re.fullmatch(r"[0-9a-f]{8}", s) for s in ids)
    counts = collections.Counter(which_set(f"{s}_nohash_0.wav") for s in ids)
    held_out = max(1, round(n / 10))
    assert counts["validation"] == counts["testing"] == held_out
    assert counts["training"] == n - 2 * held_out


def test_too_few_speakers_rejected(tmp_path):
    with pytest.raises(ValueError):
        synth.choose_speaker_ids(0, 2)
    with pytest.raises(ValueError):
        _generate(tmp_path / "x", seed=-1)


def test_same_seed_is_byte_identical_other_seed_differs(dataset, tmp_path):
    root, _ = dataset
    reference = _all_files(root)
    again = tmp_path / "again"
    _generate(again, seed=0)
    assert _all_files(again) == reference

    other = tmp_path / "other"
    _generate(other, seed=1)
    other_files = _all_files(other)
    clips_ref = {k: v for k, v in reference.items() if k.endswith(".wav") and "/" in k}
    clips_other = {k: v for k, v in other_files.items() if k.endswith(".wav") and "/" in k}
    assert set(clips_ref) != set(clips_other)  # other speaker ids
    noise = f"{BACKGROUND_NOISE_DIR}/pink_noise.wav"
    assert reference[noise] != other_files[noise]


def test_clip_does_not_depend_on_what_was_synthesised_before():
    engine = synth.Espeak.get()
    assert engine.reproducible
    speaker = synth.make_speaker("0a1b2c3d", seed=5)
    other = synth.make_speaker("ffeeddcc", seed=5)
    with engine.lock:
        engine.reset()
        first = synth.render_utterance(engine, speaker, "seven", 0, seed=5)
        synth.render_utterance(engine, other, "marvin", 3, seed=5)
        engine.reset()
        second = synth.render_utterance(engine, speaker, "seven", 0, seed=5)
        repeat = synth.render_utterance(engine, speaker, "seven", 1, seed=5)
    assert first.dtype == np.int16 and first.shape == (CLIP_SAMPLES,)
    np.testing.assert_array_equal(first, second)
    # a second utterance of the same word by the same speaker is a new take
    assert not np.array_equal(first, repeat)


def _active_frames(wave: np.ndarray, frame: int = 320) -> np.ndarray:
    energy = (wave[: len(wave) // frame * frame].reshape(-1, frame) ** 2).mean(1)
    return energy > energy.max() * 0.1


def test_audio_is_not_silent_and_onset_varies(dataset):
    root, _ = dataset
    onsets = []
    for path in _clips(root):
        wave, _ = sf.read(str(path))
        assert np.sqrt(np.mean(wave**2)) > 1e-3, path
        assert np.abs(wave).max() > 0.01, path
        assert np.abs(wave).max() < 1.0, path  # no clipping
        onsets.append(np.argmax(_active_frames(wave)) * 320 / SAMPLE_RATE)
    onsets = np.array(onsets)
    assert onsets.std() > 0.08
    assert onsets.max() - onsets.min() > 0.4


def _long_term_spectrum(wave: np.ndarray) -> np.ndarray:
    frames = np.lib.stride_tricks.sliding_window_view(wave, 512)[::256]
    energy = (frames**2).mean(1)
    active = frames[energy > energy.max() * 0.1]
    power = (np.abs(np.fft.rfft(active * np.hanning(512), axis=1)) ** 2).mean(0)
    edges = np.unique(np.geomspace(2, 256, 25).astype(int))
    return np.log(
        np.array([power[a:b].mean() for a, b in zip(edges[:-1], edges[1:], strict=True)]) + 1e-12
    )


def test_speakers_differ_more_than_utterances(dataset):
    """Leave-one-out nearest-centroid speaker identification on long-term spectra.

    If speakers were not distinct voices and channels, this would be near
    chance (1/6); real speakers are identifiable from such features.
    """
    root, _ = dataset
    by_speaker = collections.defaultdict(list)
    for path in _clips(root):
        wave, _ = sf.read(str(path))
        by_speaker[speaker_of(path.name)].append(_long_term_spectrum(wave))
    feats = {s: np.array(v) for s, v in by_speaker.items()}
    correct = total = 0
    for s, rows in feats.items():
        for i, row in enumerate(rows):
            centroids = {
                t: (np.delete(x, i, axis=0) if t == s else x).mean(0) for t, x in feats.items()
            }
            guess = min(centroids, key=lambda t: np.sum((row - centroids[t]) ** 2))
            correct += guess == s
            total += 1
    assert correct / total > 0.6

    profiles = [synth.make_speaker(s, 0) for s in feats]
    assert len({p.voice for p in profiles}) >= 4
    assert np.ptp([p.pitch for p in profiles]) > 5
    assert np.ptp([p.rate for p in profiles]) > 10


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError):
        _generate(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "not a dataset"


def test_interrupted_run_is_incomplete_and_rerun_finishes(tmp_path, monkeypatch):
    root = tmp_path / "sc"
    words = ("yes", "no")
    calls = 0
    real_render = synth.render_utterance

    def failing_render(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls > 3:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    # generate() calls the renderer through the module that writes the dataset
    monkeypatch.setattr(synth.dataset, "render_utterance", failing_render)
    with pytest.raises(KeyboardInterrupt):
        _generate(root, num_speakers=3, words=words)
    assert synth.read_marker(root) is None
    assert not synth.is_complete(root)
    assert not list(root.rglob("*.tmp"))

    monkeypatch.setattr(synth.dataset, "render_utterance", real_render)
    _generate(root, num_speakers=3, words=words)
    assert synth.is_complete(root, num_speakers=3, words=words)
    assert len(list((root / "yes").glob("*.wav"))) == 3

    # regenerating with fewer utterances removes the clips that no longer belong
    _generate(root, num_speakers=3, utterances_per_word=2, words=words)
    assert len(list((root / "yes").glob("*.wav"))) == 6
    _generate(root, num_speakers=3, words=words)
    assert len(list((root / "yes").glob("*.wav"))) == 3
    marker = json.loads((root / synth.MARKER_FILE).read_text())
    assert marker["utterances_per_word"] == 1


def test_cli(tmp_path, capsys):
    root = tmp_path / "cli"
    code = synth.main_generate(
        ["--root", str(root), "--speakers", "3", "--utterances", "1", "--noise-seconds", "0.5"]
    )
    assert code == 0
    assert "105 clips" in capsys.readouterr().out
    assert synth.is_complete(root, num_speakers=3, utterances_per_word=1, seed=0)
