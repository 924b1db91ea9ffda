"""The data layer over its life: concurrent first use, damaged caches, odd roots, errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from commands import run_command
from fedkws.data import synth
from fedkws.data.cache import DataConfig, open_cache, prepare
from fedkws.data.download import INCOMPLETE_NAME, DownloadError
from fedkws.data.errors import DataError
from fedkws.data.features import FeatureConfig
from fedkws.data.pipeline import ensure_dataset, load_dataset
from fedkws.data.speech_commands import BACKGROUND_NOISE_DIR, build_index

# Small enough to generate in about a second, big enough for 12class: one
# speaker in each held-out split, so every split has every word.
SMALL_GENERATE = {"speakers": 3, "utterances": 1, "seed": 0, "noise_seconds": 2}

_WORKER = r"""
import hashlib, json, logging, sys, time
from pathlib import Path

import numpy as np

from fedkws.data.pipeline import load_dataset

dataset, cache_dir, ready, go = json.loads(sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="LOG %(name)s: %(message)s")
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.005)
data = load_dataset(dataset, {}, cache_dir, progress=False)


def digest(array):
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


print(json.dumps({
    "entry": str(data.path),
    "waves": digest(data.waves),
    "features": digest(data.features),
    "labels": digest(data.labels),
    "splits": digest(data.splits),
    "paths": data.paths.tolist(),
}))
"""


def _race(tmp_path: Path, dataset: dict, cache_dir: Path, workers: int = 2) -> list[dict]:
    """Start ``workers`` processes that call ``load_dataset`` at the same moment."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    go = tmp_path / "go"
    procs = []
    for i in range(workers):
        ready = tmp_path / f"ready{i}"
        args = json.dumps([dataset, str(cache_dir), str(ready), str(go)])
        procs.append(
            (
                ready,
                subprocess.Popen(
                    [sys.executable, str(script), args],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
        )
    deadline = time.monotonic() + 120
    while not all(ready.exists() for ready, _ in procs):
        assert time.monotonic() < deadline, "workers did not start"
        assert all(p.poll() is None for _, p in procs), [p.communicate() for _, p in procs]
        time.sleep(0.01)
    go.touch()
    results = []
    for _, proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append({**json.loads(out.strip().splitlines()[-1]), "log": err})
    return results


def test_concurrent_first_use_generates_and_builds_once(tmp_path):
    data_dir = tmp_path / "data"
    root = data_dir / "synthetic"
    dataset = {"root": str(root), "protocol": "12class", "generate": SMALL_GENERATE}
    first, second = _race(tmp_path, dataset, data_dir / "cache")

    logs = first["log"] + second["log"]
    # One process did the work, the other waited for it and reused the result.
    assert logs.count("generating the synthetic dataset") == 1, logs
    assert logs.count("building cache entry") == 1, logs
    assert logs.count("computing features") == 1, logs
    for key in ("entry", "waves", "features", "labels", "splits", "paths"):
        assert first[key] == second[key], key
    assert len(first["paths"]) > 0
    # No temporary file or second entry is left behind.
    assert [p.name for p in (data_dir / "cache").iterdir() if not p.name.endswith(".lock")] == [
        Path(first["entry"]).name
    ]
    leftovers = [p for p in data_dir.rglob("*") if ".tmp" in p.name or "partial" in p.name]
    assert leftovers == []


# ---------------------------------------------------------------------------
# Damaged cache entries are detected and rebuilt, never used
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small") / "synthetic"
    synth.generate(
        root,
        num_speakers=SMALL_GENERATE["speakers"],
        utterances_per_word=SMALL_GENERATE["utterances"],
        seed=SMALL_GENERATE["seed"],
        noise_seconds=SMALL_GENERATE["noise_seconds"],
        progress=False,
    )
    return root


_ARRAYS = ("waves", "features", "noise", "labels", "splits", "speakers", "paths")


def _prepare(root: Path, cache: Path):
    return prepare(DataConfig(root=str(root)), FeatureConfig(), cache, progress=False)


def _truncate_waves(entry: Path) -> None:
    # Nothing of this process may touch the old mapping once the file is shorter.
    open_cache.cache_clear()
    path = entry / "waves.npy"
    os.truncate(path, path.stat().st_size - 4096)


def _alter_features(entry: Path) -> None:
    # Same size, other bytes: only the checksum can tell. The entry stays open
    # in this process on purpose: prepare must not hand back that stale view.
    (path,) = entry.glob("features-*.npy")
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        handle.write(np.full(64, 7.0, np.float32).tobytes())


def _remove_meta(entry: Path) -> None:
    (entry / "meta.npz").unlink()


def _garbage_manifest(entry: Path) -> None:
    (entry / "manifest.json").write_text('{"features": {"x": ')


def _foreign_manifest(entry: Path) -> None:
    (entry / "manifest.json").write_text("[1, 2, 3]")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_truncate_waves, "waves.npy: "),
        (_alter_features, "content differs"),
        (_remove_meta, "meta.npz: No such file"),
        (_garbage_manifest, "manifest.json unreadable"),
        (_foreign_manifest, "not a manifest"),
    ],
)
def test_damaged_cache_is_rebuilt(small_root, tmp_path, caplog, damage, reason):
    cache = tmp_path / "cache"
    first = _prepare(small_root, cache)
    reference = {name: np.array(getattr(first, name)) for name in _ARRAYS}
    entry = first.path
    del first
    damage(entry)

    with caplog.at_level(logging.INFO, logger="fedkws.data.cache"):
        again = _prepare(small_root, cache)
    assert "damaged" in caplog.text and reason in caplog.text, caplog.text
    assert again.path == entry
    for name, expected in reference.items():
        np.testing.assert_array_equal(np.asarray(getattr(again, name)), expected, err_msg=name)

    # The rebuilt entry passes the check: a third call rebuilds nothing.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fedkws.data.cache"):
        _prepare(small_root, cache)
    assert "building" not in caplog.text and "computing" not in caplog.text
    assert "damaged" not in caplog.text


# ---------------------------------------------------------------------------
# A real dataset extracted by hand, and entries that cannot be read
# ---------------------------------------------------------------------------


def _copy_dataset(src: Path, dst: Path, lists: bool = True) -> Path:
    """A few folders of ``src`` in Speech Commands layout (no fedkws marker)."""
    for word in ("yes", "no", "bed", BACKGROUND_NOISE_DIR):
        shutil.copytree(src / word, dst / word)
    if lists:
        for name in ("validation_list.txt", "testing_list.txt"):
            shutil.copy(src / name, dst / name)
    return dst


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/speech_commands_v0.02.tar.gz"


def test_extracted_dataset_is_used_without_download(small_root, tmp_path, caplog):
    root = _copy_dataset(small_root, tmp_path / "speech_commands_v0.02")
    # Any download attempt would fail: nothing listens on this port.
    download = {"version": "v0.02", "url": _closed_port_url(), "sha256": "a" * 64}
    with caplog.at_level(logging.INFO, logger="fedkws.data.pipeline"):
        assert ensure_dataset(root, download=download, progress=False) == root
    assert "using it as it is" in caplog.text
    dataset = {"root": str(root), "protocol": "12class", "download": download}
    data = load_dataset(dataset, {}, tmp_path / "cache", progress=False)
    assert {"yes", "no"} <= set(data.label_names[i] for i in np.unique(data.labels))

    # Without word folders, or with the mark of an interrupted install, it downloads.
    for leftover in (tmp_path / "empty", tmp_path / "interrupted"):
        leftover.mkdir()
    shutil.copytree(root / "yes", tmp_path / "interrupted" / "yes")
    (tmp_path / "interrupted" / INCOMPLETE_NAME).touch()
    for leftover in (tmp_path / "empty", tmp_path / "interrupted"):
        with pytest.raises(DownloadError, match="could not connect"):
            ensure_dataset(leftover, download=download, progress=False)


def test_dangling_symlinks_are_skipped_and_counted(small_root, tmp_path):
    root = _copy_dataset(small_root, tmp_path / "links")
    (root / "yes" / "dead0000_nohash_0.wav").symlink_to(tmp_path / "gone.wav")
    (root / BACKGROUND_NOISE_DIR / "gone_noise.wav").symlink_to(tmp_path / "gone_noise.wav")
    (root / "notes.txt").symlink_to(tmp_path / "gone.txt")

    index = build_index(root, "12class")  # reads noise lengths itself
    assert "yes/dead0000_nohash_0.wav" in {it.path for it in index.items}
    data = prepare(DataConfig(root=str(root)), FeatureConfig(), tmp_path / "cache", False)
    skipped = sorted(Path(p).name for p in data.manifest["skipped_files"])
    assert skipped == ["dead0000_nohash_0.wav", "gone_noise.wav"]
    assert "2 skipped" in data.manifest["audio_report"]
    assert "yes/dead0000_nohash_0.wav" not in set(data.paths.tolist())
    assert data.manifest["noise_files"] == sorted(synth.NOISE_FILES)

    # Repairing the link changes the data key: the next prepare builds a new entry.
    (root / "yes" / "dead0000_nohash_0.wav").unlink()
    shutil.copy(next((root / "yes").glob("*.wav")), root / "yes" / "dead0000_nohash_0.wav")
    repaired = prepare(DataConfig(root=str(root)), FeatureConfig(), tmp_path / "cache", False)
    assert repaired.path != data.path
    assert "yes/dead0000_nohash_0.wav" in set(repaired.paths.tolist())


# ---------------------------------------------------------------------------
# User errors: one line naming the key or path, the value and what is allowed
# ---------------------------------------------------------------------------


def _one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_file_where_a_dataset_folder_is_expected(tmp_path):
    file = tmp_path / "speech_commands"
    file.write_text("not a folder")
    for call in (
        lambda: ensure_dataset(file, generate=SMALL_GENERATE, progress=False),
        lambda: ensure_dataset(file, download={"version": "v0.02"}, progress=False),
        lambda: ensure_dataset(file),
        lambda: build_index(file),
    ):
        with pytest.raises(DataError) as info:
            call()
        assert _one_line(info) == (
            f"dataset.root='{file}': {file} is a file, not a folder; set dataset.root to a folder"
        )
    with pytest.raises(DataError) as info:
        ensure_dataset(file / "inner", generate=SMALL_GENERATE, progress=False)
    message = _one_line(info)
    assert message.startswith(f"dataset.root='{file / 'inner'}': {file} is a file, not a folder")
    assert file.read_text() == "not a folder"
    gone = tmp_path / "gone"
    gone.symlink_to(tmp_path / "moved")  # catches: a dangling link called "not a folder"
    with pytest.raises(DataError) as info:
        ensure_dataset(gone, generate=SMALL_GENERATE, progress=False)
    assert f"{gone} is a link to {tmp_path / 'moved'}, which does not exist" in _one_line(info)


def test_cache_folder_that_cannot_be_written(small_root, tmp_path):
    file = tmp_path / "cache"
    file.write_text("x")
    config = DataConfig(root=str(small_root))
    with pytest.raises(DataError) as info:
        prepare(config, FeatureConfig(), file, progress=False)
    assert _one_line(info).startswith(f"cache_dir='{file}': {file} is a file, not a folder")
    with pytest.raises(DataError) as info:
        prepare(config, FeatureConfig(), file / "sub", progress=False)
    assert f"'{file / 'sub'}': {file} is a file, not a folder" in _one_line(info)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_cache_folder(small_root, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o500)
    try:
        with pytest.raises(DataError) as info:
            prepare(DataConfig(root=str(small_root)), FeatureConfig(), cache, progress=False)
    finally:
        cache.chmod(0o700)
    message = _one_line(info)
    assert f"cache_dir='{cache}' is not a writable folder" in message
    assert "Permission denied" in message


def test_silence_needs_background_noise(small_root, tmp_path):
    root = _copy_dataset(small_root, tmp_path / "sc")
    noise = root / BACKGROUND_NOISE_DIR
    for name in synth.NOISE_FILES:
        (noise / name).unlink()
    expected = (
        "dataset.protocol='12class' draws its _silence_ examples (dataset.silence_percentage=10)"
        f" from background recordings, but '{noise}' STATE; put .wav recordings of at least 1 s"
        " there or set dataset.silence_percentage=0"
    )
    with pytest.raises(DataError) as info:
        build_index(root, "12class")
    assert _one_line(info) == expected.replace("STATE", "holds no .wav file")

    noise.rmdir()
    with pytest.raises(DataError) as info:
        prepare(DataConfig(root=str(root)), FeatureConfig(), tmp_path / "cache", False)
    assert _one_line(info) == expected.replace("STATE", "does not exist")

    noise.mkdir()
    sf.write(noise / "short.wav", np.zeros(8000, np.float32), 16000)
    with pytest.raises(DataError) as info:
        build_index(root, "12class")
    assert "holds no readable recording of at least 1 s (found short.wav)" in _one_line(info)

    # Without silence examples, no background noise is needed.
    index = build_index(root, "12class", silence_percentage=0)
    assert not any(item.silence for item in index.items)


def test_protocols_the_dataset_cannot_serve(small_root, tmp_path):
    with pytest.raises(DataError) as info:
        build_index(small_root, "10class")
    assert (
        _one_line(info) == "dataset.protocol='10class' is not a protocol; allowed: 12class, 35class"
    )
    with pytest.raises(DataError, match="dataset.protocol='twelve'"):
        DataConfig(root=str(small_root), protocol="twelve")
    with pytest.raises(DataError, match=r"dataset.testing_percentage=120 is out of range"):
        DataConfig(root=str(small_root), testing_percentage=120)

    v1 = _copy_dataset(small_root, tmp_path / "v1")  # yes, no, bed: v0.01 words only
    with pytest.raises(DataError) as info:
        build_index(v1, "35class")
    message = _one_line(info)
    assert message.startswith(
        f"dataset.protocol='35class' needs Speech Commands v0.02, but dataset.root='{v1}' "
        "holds v0.01 (none of backward, follow, forward, learn, visual found)"
    )
    assert message.endswith("allowed for this dataset: protocol=12class")


def test_empty_held_out_split_is_an_error(small_root, tmp_path):
    root = _copy_dataset(small_root, tmp_path / "sc")
    (root / "validation_list.txt").write_text("")
    with pytest.raises(DataError) as info:
        build_index(root, "12class")
    message = _one_line(info)
    assert message.startswith(f"the validation split of dataset.root='{root}' has no example;")
    assert "official lists" in message

    (root / "validation_list.txt").unlink()
    (root / "testing_list.txt").unlink()
    config = DataConfig(root=str(root), validation_percentage=0.0)
    with pytest.raises(DataError) as info:
        prepare(config, FeatureConfig(), tmp_path / "cache", progress=False)
    message = _one_line(info)
    assert "the validation split" in message
    assert "dataset.validation_percentage=0 and dataset.testing_percentage=10" in message


def test_split_emptied_by_unreadable_files_is_an_error(small_root, tmp_path):
    root = _copy_dataset(small_root, tmp_path / "sc")
    testing = (root / "testing_list.txt").read_text().split()
    for rel in testing:
        if (root / rel).exists():
            (root / rel).write_bytes(b"RIFF garbage")
    with pytest.raises(DataError) as info:
        prepare(DataConfig(root=str(root)), FeatureConfig(), tmp_path / "cache", False)
    message = _one_line(info)
    assert message.startswith(f"the testing split of dataset.root='{root}' has no example after")
    assert "unreadable files were skipped" in message


def test_a_generated_dataset_opens_without_the_generators_imports(tiny_root):
    # Catches scipy.signal (a second of every run's start-up) imported at module level
    # by the synthesiser again: ensure_dataset on a finished dataset only checks it.
    code = (
        "import sys; from fedkws.data.pipeline import ensure_dataset; "
        f"from helpers import TINY; ensure_dataset({str(tiny_root)!r}, generate=dict(TINY)); "
        "print(sorted(m for m in sys.modules if m.startswith('scipy')))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    out = run_command([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_process_hashes_each_cache_file_once_until_it_changes(small_root, tmp_path, monkeypatch):
    from fedkws.data import cache as cache_module

    first = _prepare(small_root, tmp_path / "cache")
    entry = first.path
    del first
    files = sorted(p.name for p in entry.iterdir() if p.name != "manifest.json")
    hashed: list[str] = []
    real = cache_module._file_record
    monkeypatch.setattr(cache_module, "_file_record", lambda p: hashed.append(p.name) or real(p))

    # A file written just now may change again within its time stamp's resolution:
    # it is hashed on every use.
    for name in files:
        os.utime(entry / name)
    _prepare(small_root, tmp_path / "cache")
    _prepare(small_root, tmp_path / "cache")
    assert sorted(hashed) == sorted(files * 2)

    monkeypatch.setattr(cache_module, "_SETTLED_NS", 0)  # every file counts as settled
    hashed.clear()
    _prepare(small_root, tmp_path / "cache")
    assert sorted(hashed) == files  # the first use in this process hashes every file
    hashed.clear()
    _prepare(small_root, tmp_path / "cache")
    assert hashed == []  # a job after it in the same process: sizes and time stamps only

    # Catches a remembered hash trusted after the file changed (same size, same mtime).
    (features,) = entry.glob("features-*.npy")
    reference = np.array(np.load(features))
    mtime = features.stat().st_mtime_ns
    _alter_features(entry)
    os.utime(features, ns=(mtime, mtime))
    again = _prepare(small_root, tmp_path / "cache")
    assert features.name in hashed  # hashed again, found altered and rebuilt
    np.testing.assert_array_equal(np.asarray(again.features), reference)


def test_a_finished_dataset_of_other_settings_is_kept_not_generated_over(small_root, tmp_path):
    # Catches: training with one generate value changed (a typo, a second study on the same
    # dataset.root) silently deleting and regenerating someone's finished dataset.
    root = tmp_path / "copy"
    shutil.copytree(small_root, root)
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    other = {**SMALL_GENERATE, "speakers": 4, "seed": 1}
    with pytest.raises(DataError) as refused:
        ensure_dataset(root, generate=other, progress=False)
    message = str(refused.value)
    assert f"dataset.root={root} holds a synthetic dataset generated with other settings" in message
    assert "dataset.generate.speakers=3 there, 4 asked" in message
    assert "dataset.generate.seed=0 there, 1 asked" in message
    assert "utterances" not in message  # only what differs
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before
    # The same settings use it as it is; an interrupted generation is fedkws's to finish.
    assert ensure_dataset(root, generate=SMALL_GENERATE, progress=False) == root
    # ... nor by `fedkws generate` (which regenerated it with the new settings, exit 0).
    out = run_command(
        [sys.executable, "-m", "fedkws.cli", "generate", "--root", str(root), "--speakers", "4",
         "--utterances", "1", "--noise-seconds", "2", "--held-out-speakers", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(
        f"error: --root {root} holds a synthetic dataset generated with other settings "
        "(--speakers=3 there, 4 asked; --all-words there, 3 asked): "
    ), lines
    assert {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    (root / synth.dataset._IN_PROGRESS_FILE).touch()  # as a generation that was stopped
    assert ensure_dataset(root, generate=other, progress=False) == root
    assert synth.read_marker(root)["num_speakers"] == 4
