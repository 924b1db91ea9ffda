"""experiments/real_speech_commands.py: sizes and times expected on the real archives."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "real_speech_commands.py"


@pytest.fixture(scope="module")
def estimate():
    spec = importlib.util.spec_from_file_location("real_speech_commands", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sizes_count_the_ten_words_and_add_silence_and_unknown(estimate, tmp_path):
    # Catches: non-command words counted as known, the 10 % extras missing or rounded down.
    lines = [f"yes/{i:08x}_nohash_0.wav" for i in range(95)]
    lines += [f"bed/{i:08x}_nohash_0.wav" for i in range(40)]  # an _unknown_ source only
    listing = tmp_path / "testing_list.txt"
    listing.write_text("\n".join(lines) + "\n")
    sizes = estimate.split_sizes(listing)
    assert sizes["v0.02"] == {"testing": 95 + 10 + 10, "training": 8 * 115}
    assert sizes["v0.01"]["training"] == round(8 * 115 * 64_727 / 105_829)


def test_times_scale_the_measured_jobs_by_training_rows(estimate, tmp_path, capsys):
    for seed, wall in enumerate((3000.0, 5000.0)):
        run = tmp_path / "sweep" / "cell" / f"seed={seed}"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({"summary": {"wall_s": wall}}))
        (run / "data_summary.txt").write_text("  label training\n  total  1000  200  200\n")
    listing = tmp_path / "testing_list.txt"
    listing.write_text("\n".join(f"no/{i:08x}_nohash_0.wav" for i in range(100)) + "\n")
    assert estimate.main([str(tmp_path / "sweep"), "--testing-list", str(listing)]) == 0
    out = capsys.readouterr().out
    # v0.02: 8 x (100 + 20) = 960 training rows, 0.96 x the 1,000 the 8,000 s were measured on;
    # v0.01: 960 x 64,727 / 105,829 = 587 rows
    assert "2 jobs in 0 min (133 min inside the jobs' runs)" in out
    assert "v0.02: x1.0 -> about 2.1 h (64 min a job)" in out
    assert "v0.01: x0.6 -> about 1.3 h (39 min a job)" in out
    assert estimate.main([str(tmp_path / "sweep"), "--testing-list", str(tmp_path / "no")]) == 2
