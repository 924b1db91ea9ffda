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


def test_a_preset_is_timed_from_its_jobs_in_a_larger_sweep(estimate, tmp_path, capsys):
    # Catches: jobs outside the preset counted, or the gaps between jobs left out.
    import os

    sweep = tmp_path / "sweep"
    jobs = {("group", "iid"): 100.0, ("group", "speaker"): 200.0, ("layer", "iid"): 400.0,
            ("group", "dirichlet"): 300.0}  # fmt: skip
    for i, ((arm, partition), wall) in enumerate(jobs.items()):
        run = sweep / f"arm={arm},partition={partition}" / "seed=0"
        (run / ".hydra").mkdir(parents=True)
        # the last job is another preset's, with arm and partition of this one
        experiment = "augment_ablation" if partition == "dirichlet" else "bn_study"
        (run / ".hydra" / "overrides.yaml").write_text(
            f"- experiment={experiment}\n- arm={arm}\n- partition={partition}\n- seed=0\n"
        )
        (run / "results.json").write_text(json.dumps({"summary": {"wall_s": wall}}))
        (run / "data_summary.txt").write_text("  total  1000  200  200\n")
        os.utime(run / ".hydra", (i * 1000.0, i * 1000.0))  # starts at 0, 1000, 2000 s
        os.utime(run / "results.json", (i * 1000.0 + 800, i * 1000.0 + 800))
    listing = tmp_path / "testing_list.txt"
    listing.write_text("\n".join(f"no/{i:08x}_nohash_0.wav" for i in range(100)) + "\n")
    preset = estimate.preset_sweep("literature")
    assert preset["arm"] >= {"group", "batch_full"} and "layer" not in preset["arm"]
    assert preset["partition"] == {"iid", "dirichlet", "channels"}
    # Elapsed 3,800 s for 1,000 s of runs: (3800 - 1000) / 4 = 700 s of gap a job. Of the
    # literature preset's jobs the sweep has group/iid only: 100 s + 700 s.
    assert estimate.sweep_times(sweep, preset) == (1, 100.0, 1000, 800.0)
    given = [str(sweep), "--testing-list", str(listing)]
    assert estimate.main(["--preset", "literature", *given]) == 0
    assert "1 jobs in 13 min (2 min inside the jobs' runs)" in capsys.readouterr().out
    assert estimate.main(["--preset", "nosuch", *given]) == 2
    assert capsys.readouterr().err.startswith("error: --preset nosuch:")
    assert estimate.main(["--preset", "seed_repro", *given]) == 2  # a single run: no sweep
    assert "sweeps nothing" in capsys.readouterr().err


def test_a_missing_or_empty_sweep_folder_is_one_error_line(estimate, tmp_path, capsys):
    # Catches: exit 1 after the table for a mistyped folder, instead of one line and exit 2.
    listing = tmp_path / "testing_list.txt"
    listing.write_text("no/00000000_nohash_0.wav\n")
    code = estimate.main([str(tmp_path / "nope"), "--testing-list", str(listing)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.strip() == f"error: {tmp_path / 'nope'}: no such folder"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stop:
        estimate.main([str(tmp_path / "empty"), "--testing-list", str(listing)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("error: no finished run")
