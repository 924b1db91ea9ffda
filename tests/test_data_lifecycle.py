"""The data layer over its life: concurrent first use, damaged caches, odd roots, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

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
