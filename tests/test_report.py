"""The sweep report: a real (tiny, centralised) multirun read back by ``fedkws report``.

The later tests build sweeps from fedkws's own ``Recorder`` with numbers chosen
so that every value (means, t intervals, paired differences, rounds to 90 %)
is computed here independently.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from commands import run_command
from fedkws import CONF_DIR
from helpers import (
    cli_env,
    error_lines,
    markdown_table,
    spy_on_figures,
    tiny_dataset_overrides,
    train_command,
)

# summary key of each column the report must show (independent of report.py)
COLUMNS = {
    "val/eval/acc": "final/val/eval/acc",
    "val/train/acc": "final/val/train/acc",
    "test/eval/acc": "test/eval/acc",
    "test/train/acc": "test/train/acc",
}


def _comparison(text: str) -> dict[str, dict[str, str]]:
    """Rows of the second table (cells against the centralised reference), keyed by ``run``."""
    block = text.split("against the centralised reference:\n\n", 1)[1].split("\n\n", 1)[0]
    lines = block.splitlines()
    header = [c.strip() for c in lines[0].split("|")]
    rows = [dict(zip(header, (c.strip() for c in ln.split("|")), strict=True))
            for ln in lines[2:]]  # fmt: skip
    return {row["run"]: row for row in rows}


def _report(*args: Path) -> subprocess.CompletedProcess:
    return run_command(
        [sys.executable, "-m", "fedkws.cli", "report", *map(str, args)],
        capture_output=True, text=True, timeout=120, env=cli_env(),
    )  # fmt: skip


T975_DF1 = 12.706204736174707  # Student t_{0.975} with 1 degree of freedom (printed tables)


def _mean_sd(values: list[float]) -> str:
    """Two seeds: mean ± sd [t interval of the mean, clipped to [0, 1]]."""
    assert len(values) == 2
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = T975_DF1 * sd / 2**0.5
    return f"{mean:.3f} ± {sd:.3f} [{max(mean - half, 0):.3f}, {min(mean + half, 1):.3f}]"


def _single(summary: dict, key: str) -> str:
    """One seed: the value, with the run's own bootstrap interval when it recorded one."""
    ci = summary.get(f"{key}_ci95")
    return f"{summary[key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


@pytest.fixture(scope="module")
def sweep(data_dir, tiny_root, tmp_path_factory) -> Path:
    """Two cells (learning rates) x two seeds of a 1-round centralised run."""
    work = tmp_path_factory.mktemp("sweep")
    sweep_dir = work / "multirun"
    # The data's paths are left out of the job folder names by the default config.
    cmd = train_command(
        # GroupNorm: no exact-statistics pass in the final evaluation, which BatchNorm runs add.
        "-m", "strategy=central", "model=cnn", "norm=group", "train.rounds=1",
        "seed=0,1", "optimizer.lr=0.001,0.003", *tiny_dataset_overrides(data_dir, tiny_root),
        "logger=disabled", "progress=false", f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    env = cli_env()
    result = run_command(cmd, capture_output=True, text=True, timeout=300, cwd=work, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


def _summaries(sweep_dir: Path) -> dict[str, list[dict]]:
    """Each cell folder's runs' summaries, read straight from results.json."""
    cells: dict[str, list[dict]] = {}
    for path in sorted(sweep_dir.glob("*/seed=*/results.json")):
        cells.setdefault(path.parent.parent.name, []).append(
            json.loads(path.read_text())["summary"]
        )
    return cells


def test_report_values_equal_the_runs_results(sweep):
    cells = _summaries(sweep)
    assert len(cells) == 2 and all(len(runs) == 2 for runs in cells.values())
    # Catches: the data's paths in the job folder names (their / nested the folders).
    assert all("/" not in name and "data_dir" not in name for name in cells), sorted(cells)
    assert len(list(sweep.glob("*/seed=*/results.json"))) == 4
    out = _report(sweep)
    assert out.returncode == 0, out.stderr
    rows = markdown_table(out.stdout)
    assert set(rows) == set(cells)  # one row per cell, seeds merged
    for name, runs in cells.items():
        row = rows[name]
        assert row["seeds"] == "2" and row["missing"] == "-"
        assert row["strategy"] == "central" and row["rounds"] == "1"
        for column, key in COLUMNS.items():
            assert row[column] == _mean_sd([run[key] for run in runs]), (name, column)
    # The Hydra callback wrote the same table into the sweep folder at the end.
    assert markdown_table((sweep / "report.md").read_text()) == rows
    assert (sweep / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert (sweep / "report_bars.png").read_bytes()[:4] == b"\x89PNG"
    csv_rows = _csv_rows(sweep / "report.csv")  # and the CSV beside it, unrounded
    assert set(csv_rows) == set(cells)
    for name, runs in cells.items():
        for column, key in COLUMNS.items():
            _check_csv_stat(csv_rows[name], column, [run[key] for run in runs], 0.0)


def test_report_marks_missing_runs(sweep, tmp_path):
    # Catches: a run without results.json silently dropped from its row or the table.
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    partial, full = sorted(_summaries(copy))
    lost = copy / partial / "seed=1" / "results.json"
    kept = json.loads((copy / partial / "seed=0" / "results.json").read_text())["summary"]
    lost.unlink()  # e.g. a job killed before its first round
    crashed = copy / "optimizer.lr=0.1" / "seed=0"  # Hydra made the folder, the job died
    shutil.copytree(copy / full / "seed=0" / ".hydra", crashed / ".hydra")
    # Catches: one damaged results.json failing the whole report (exit 2, no table).
    (copy / full / "seed=1" / "results.json").write_text('{"rounds": [')
    failed = copy / "optimizer.lr=0.2" / "seed=0"  # a job that failed and said why
    shutil.copytree(copy / full / "seed=0" / ".hydra", failed / ".hydra")
    (failed / "failed.txt").write_text("no Ray instance answers at 127.0.0.1:9\n\nmore\n")
    out = _report(copy)
    assert out.returncode == 0, out.stderr
    rows = markdown_table(out.stdout)
    assert set(rows) == {partial, full, "optimizer.lr=0.1", "optimizer.lr=0.2"}
    assert (rows[partial]["seeds"], rows[partial]["missing"]) == ("1", "seed=1")
    for column, key in COLUMNS.items():
        assert rows[partial][column] == _single(kept, key)
    assert (rows[full]["seeds"], rows[full]["missing"]) == ("1", "seed=1")
    crashed_row = rows["optimizer.lr=0.1"]
    assert (crashed_row["seeds"], crashed_row["missing"]) == ("0", "seed=0")
    assert all(crashed_row[column] == "missing" for column in COLUMNS)
    listed = out.stdout.split("missing (", 1)[1]
    assert f"{partial}/seed=1 (no results.json)" in listed
    assert "optimizer.lr=0.1/seed=0 (no results.json)" in listed
    assert f"{full}/seed=1 (unreadable results.json: " in listed
    assert "optimizer.lr=0.2/seed=0 (failed: no Ray instance answers at 127.0.0.1:9)" in listed


def _jobs_by_swept_values(sweep_dir: Path, keys: tuple[str, ...]) -> dict[tuple, Path]:
    """Each job folder of a sweep, by its ``key=value`` overrides of ``keys``, in that order."""
    jobs = {}
    for job in sweep_dir.glob("job*"):
        given = {o.split("=", 1)[0]: o for o in OmegaConf.load(job / ".hydra" / "overrides.yaml")}
        jobs[tuple(given[k] for k in keys)] = job
    return jobs


def test_a_failed_job_leaves_the_other_jobs_and_the_report(data_dir, tiny_root, tmp_path):
    # Catches: a job's error ending the sweep (the next jobs never ran, no report), a failed
    # job missing from the report or without its reason, exit status 0 after a failure, and
    # a finished run's folder written to when the sweep runs again into its folder.
    not_a_folder = tmp_path / "a_file"
    not_a_folder.write_text("")
    sweep_dir = tmp_path / "multirun"
    swept = [f"cache_dir={not_a_folder},{data_dir / 'cache'}", "strategy=fedavg,central"]
    cmd = train_command(
        "-m", "model=cnn", "norm=group", "train.rounds=1",
        *tiny_dataset_overrides(data_dir, tiny_root), *swept,
        # Nothing answers there: the federated job with a good cache_dir fails in its run.
        "federation.ray_address=127.0.0.1:9", "federation.sweep_ray=false",
        "logger=disabled", "progress=false", f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweep.subdir=job${hydra.job.num}",
    )  # fmt: skip
    out = run_command(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=cli_env())  # fmt: skip
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    jobs = _jobs_by_swept_values(sweep_dir, ("cache_dir", "strategy"))
    bad_cache = f"cache_dir={not_a_folder}"
    good_cache = f"cache_dir={data_dir / 'cache'}"
    starting = f"cache_dir='{not_a_folder}': {not_a_folder} is a file, not a folder"
    running = "no Ray instance answers at 127.0.0.1:9"
    failed = {jobs[c, s].name: why for c, s, why in [
        (bad_cache, "strategy=fedavg", starting), (bad_cache, "strategy=central", starting),
        (good_cache, "strategy=fedavg", running)]}  # fmt: skip
    done = jobs[good_cache, "strategy=central"]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 4, lines  # one per failed job as it fails, then the summary
    for name, why in failed.items():
        assert (
            sum(
                line.startswith(f"error: {why}")
                and line.endswith(f"(the sweep's job {name} failed; the others go on)")
                for line in lines
            )
            == 1
        )
        assert (sweep_dir / name / "failed.txt").read_text().startswith(why)
        assert (sweep_dir / name / ".hydra" / "config.yaml").is_file()
    assert lines[-1].startswith(f"error: 3 job(s) of the sweep failed: {', '.join(sorted(failed))}")
    assert json.loads((done / "results.json").read_text())["summary"]["complete"]
    report_md = (sweep_dir / "report.md").read_text()
    rows = markdown_table(report_md)
    assert rows[done.name]["seeds"] == "1"
    for name, why in failed.items():
        assert rows[name]["seeds"] == "0" and f"- {name} (failed: {why}" in report_md
    # Again into its own folder, without resume=true: the finished run is refused and left
    # as it was, and that ends the sweep (its other finished jobs would be refused too).
    before = (done / "results.json").read_bytes()
    multirun = sweep_dir / "multirun.yaml"
    multirun.write_bytes(multirun.read_bytes() + b"# the first sweep's\n")  # Hydra rewrites it
    multirun_before = multirun.read_bytes()
    again = run_command(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                           env=cli_env())  # fmt: skip
    assert again.returncode == 2, again.stderr[-3000:]
    refusal = [line for line in again.stderr.splitlines() if line.startswith("error:")][-1]
    assert str(done) in refusal and "resume=true" in refusal, refusal
    assert (done / "results.json").read_bytes() == before and not (done / "failed.txt").exists()
    assert multirun.read_bytes() == multirun_before  # catches: the refused sweep's own config
    # With resume=true: the finished job is skipped, the others are tried again.
    resumed = run_command([*cmd, "resume=true"], capture_output=True, text=True,
                             timeout=300, cwd=tmp_path, env=cli_env())  # fmt: skip
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    assert f"resume: {done} is already complete" in resumed.stdout
    assert resumed.stderr.count("the others go on") == 3
    assert (done / "results.json").read_bytes() == before


# --------------------------------------------------------------------------- a sweep of
# fedkws's own results.json files (Recorder), numbers chosen so each can be checked by hand

CENTRAL_VAL = {0: 0.80, 1: 0.90, 2: 0.70}  # final/val/eval/acc of the centralised seeds
FED_CURVES = {  # val/<mode>/acc per round of the federated cell, per seed
    0: {
        "eval": [0.30, 0.60, 0.72, 0.80],
        "train": [0.75, 0.8, 0.8, 0.8],
        "recalibrated": [0.1] * 4,
    },
    1: {
        "eval": [0.50, 0.82, 0.85, 0.86],
        "train": [0.85, 0.9, 0.9, 0.9],
        "recalibrated": [0.2] * 4,
    },
    2: {
        "eval": [0.10, 0.20, 0.30, 0.40],
        "train": [0.65, 0.7, 0.7, 0.7],
        "recalibrated": [0.3] * 4,
    },
}
# first round with val/<mode>/acc >= 0.9 x the same seed's centralised val/eval accuracy
# (0.72, 0.81, 0.63): eval 3 (0.72 exactly), 2, never; train 1, 1, 1; recalibrated never
ROUNDS_TO_90 = {"eval": "2.5 (2/3 seeds)", "train": "1.0", "recalibrated": "never"}
CENTRAL, FED, LOCAL = "strategy=central", "bn=full,strategy=fedavg", "bn=local,strategy=fedavg"


def _write_run(folder: Path, seed: int, strategy: str, curves: dict, test: dict) -> None:
    from fedkws.tracking import Recorder, Result, RoundRecord, WandbLogger

    folder.mkdir(parents=True)
    config = {"seed": seed, "partition": {"scheme": "dirichlet", "alpha": 0.1}}
    recorder = Recorder(folder, Result(config=config), WandbLogger("disabled", "x", {}, folder))
    rounds = len(next(iter(curves.values())))
    for r in range(rounds):
        metrics = {f"val/{mode}/acc": ys[r] for mode, ys in curves.items()}
        recorder.log_round(RoundRecord(r + 1, metrics, 1.0))
    summary = {"strategy": strategy, "bn_sync": "full", "norm": "batch", "wall_s": 10.0 + seed,
               "rounds_completed": rounds, "complete": True}  # fmt: skip
    summary |= {f"final/val/{mode}/acc": ys[-1] for mode, ys in curves.items()}
    summary |= {f"test/{mode}/acc": acc for mode, acc in test.items()}
    recorder.finish(summary)


@pytest.fixture(scope="module")
def _fake_sweep_once(tmp_path_factory) -> Path:
    """Central x 3 seeds, FedAvg x 3 seeds (3 modes), FedBN-like x 2 seeds + one lost run."""
    sweep = tmp_path_factory.mktemp("fake") / "sweep"
    for seed, acc in CENTRAL_VAL.items():
        curves = {"eval": [acc - 0.2, acc], "train": [acc - 0.1, acc]}
        _write_run(sweep / CENTRAL / f"seed={seed}", seed, "central", curves,
                   {"eval": acc - 0.05, "train": acc - 0.04})  # fmt: skip
    for seed, curves in FED_CURVES.items():
        test = {
            "eval": 0.5 + 0.1 * seed,
            "train": 0.6 + 0.05 * seed,
            "recalibrated": 0.2 + seed / 10,
        }
        _write_run(sweep / FED / f"seed={seed}", seed, "fedavg", curves, test)
    for seed in (0, 1):
        curves = {"eval": [0.4, 0.5 + seed / 10], "train": [0.5, 0.6]}
        _write_run(sweep / LOCAL / f"seed={seed}", seed, "fedavg", curves,
                   {"eval": 0.55 + seed / 20, "train": 0.5})  # fmt: skip
    hydra = sweep / LOCAL / "seed=2" / ".hydra"  # Hydra made the folder, the job died
    hydra.mkdir(parents=True)
    (hydra / "config.yaml").write_text("seed: 2\n")
    return sweep


@pytest.fixture
def fake_sweep(_fake_sweep_once, tmp_path) -> Path:
    """A copy of the fake sweep of this test's own (a report writes into the sweep's folder)."""
    return Path(shutil.copytree(_fake_sweep_once, tmp_path / "sweep", symlinks=True))


def _seed_summaries(sweep: Path, cell: str) -> dict[int, dict]:
    out = {}
    for path in sorted((sweep / cell).glob("seed=*/results.json")):
        out[int(path.parent.name.removeprefix("seed="))] = json.loads(path.read_text())["summary"]
    return out


def _t_stats(xs: list[float], lo_clip: float) -> tuple[float, float, float, float]:
    """mean, sd and the 95 % t interval of the mean (clipped to [lo_clip, 1])."""
    scipy_stats = pytest.importorskip("scipy.stats")
    x = np.asarray(xs, dtype=np.float64)
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.975, len(x) - 1)) * sd / np.sqrt(len(x))
    return mean, sd, max(mean - half, lo_clip), min(mean + half, 1.0)


def _csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {row["cell"]: row for row in csv.DictReader(f)}


def _check_csv_stat(row: dict[str, str], column: str, xs: list[float], lo_clip: float) -> None:
    mean, sd, lo, hi = _t_stats(xs, lo_clip)
    got = [float(row[f"{column}_{p}"]) for p in ("mean", "sd", "ci_lo", "ci_hi")]
    assert got == pytest.approx([mean, sd, lo, hi], abs=1e-9), column
    assert int(row[f"{column}_n"]) == len(xs)


def test_csv_holds_the_means_and_intervals_over_seeds(fake_sweep):
    # Catches: CSV values that differ from the seeds' numbers (wrong sd, z for t, no clipping).
    from fedkws.report import report

    report([fake_sweep], markdown=fake_sweep / "report.md")
    rows = _csv_rows(fake_sweep / "report.csv")
    assert list(rows) == [CENTRAL, FED, LOCAL]  # the centralised reference first
    for cell, modes in ((CENTRAL, ("eval", "train")), (FED, ("eval", "train", "recalibrated"))):
        runs = _seed_summaries(fake_sweep, cell)
        assert rows[cell]["seeds"] == "3" and rows[cell]["missing"] == ""
        for mode in modes:
            for column, key in ((f"val/{mode}/acc", f"final/val/{mode}/acc"),
                                (f"test/{mode}/acc", f"test/{mode}/acc")):  # fmt: skip
                _check_csv_stat(rows[cell], column, [r[key] for r in runs.values()], 0.0)
        walls = [r["wall_s"] for r in runs.values()]
        assert float(rows[cell]["wall_s"]) == pytest.approx(np.mean(walls))
    fed = rows[FED]
    assert (fed["strategy"], fed["bn_sync"], fed["norm"]) == ("fedavg", "full", "batch")
    assert fed["partition"] == "dirichlet alpha=0.1" and fed["reference"] == CENTRAL


def test_paired_difference_to_the_centralised_run_of_each_seed(fake_sweep):
    # Catches: differences of means instead of per-seed pairs, seeds paired wrongly, a
    # z interval, the reference row compared with itself.
    from fedkws.report import report

    text = report([fake_sweep], markdown=fake_sweep / "report.md")
    rows, md = _csv_rows(fake_sweep / "report.csv"), _comparison(text)
    assert CENTRAL not in md  # the reference is not compared with itself
    central, fed = _seed_summaries(fake_sweep, CENTRAL), _seed_summaries(fake_sweep, FED)
    for split, key in (("val", "final/val/{}/acc"), ("test", "test/{}/acc")):
        for mode in ("eval", "train"):
            k = key.format(mode)
            diffs = [fed[s][k] - central[s][k] for s in sorted(fed)]
            column = f"{split}/{mode}/acc_vs_central"
            _check_csv_stat(rows[FED], column, diffs, -1.0)
            mean, sd, lo, hi = _t_stats(diffs, -1.0)
            expected = f"{mean:+.3f} ± {sd:.3f} [{lo:+.3f}, {hi:+.3f}]"
            assert md[FED][f"{split}/{mode}/acc vs central"] == expected
        # the centralised run has no recalibrated mode: nothing to pair
        assert md[FED][f"{split}/recalibrated/acc vs central"] == "-"
        assert rows[FED][f"{split}/recalibrated/acc_vs_central_mean"] == ""
        assert rows[CENTRAL][f"{split}/eval/acc_vs_central_mean"] == ""
    # two seeds of the FedBN-like cell pair with central seeds 0 and 1
    local = _seed_summaries(fake_sweep, LOCAL)
    diffs = [local[s]["test/eval/acc"] - central[s]["test/eval/acc"] for s in (0, 1)]
    _check_csv_stat(rows[LOCAL], "test/eval/acc_vs_central", diffs, -1.0)


def test_rounds_to_ninety_percent_of_central(fake_sweep):
    from fedkws.report import report

    md = _comparison(report([fake_sweep], markdown=fake_sweep / "report.md"))
    rows = _csv_rows(fake_sweep / "report.csv")
    for mode, expected in ROUNDS_TO_90.items():
        assert md[FED][f"rounds to 90% ({mode})"] == expected, mode
        assert rows[CENTRAL][f"rounds_to_90/{mode}"] == ""
    assert (rows[FED]["rounds_to_90/eval"], rows[FED]["rounds_to_90/eval_reached"],
            rows[FED]["rounds_to_90/eval_n"]) == ("2.5", "2", "3")  # fmt: skip
    assert rows[FED]["rounds_to_90/recalibrated"] == ""  # never
    assert rows[FED]["rounds_to_90/recalibrated_reached"] == "0"
    # FedBN-like: seed 0 reaches 0.72 never (0.5), seed 1 reaches 0.81 never (0.6)
    assert md[LOCAL]["rounds to 90% (eval)"] == "never"


def test_without_a_centralised_run_there_is_no_comparison_table(fake_sweep):
    from fedkws.report import report

    shutil.rmtree(fake_sweep / CENTRAL)
    text = report([fake_sweep], markdown=fake_sweep / "report.md")
    # No table of dashes: one line says there is nothing to compare with.
    assert "against the centralised reference" not in text
    assert "no centralised cell in this sweep" in text
    assert _csv_rows(fake_sweep / "report.csv")[FED]["test/eval/acc_vs_central_mean"] == ""


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ('{"summary": [1]}', "its summary is a JSON array, not an object"),
        ('{"config": null}', "its config is a JSON null, not an object"),
        ('{"rounds": [{"round": 1, "metrics": "x", "seconds": 1}]}', "a round that is not"),
        ("null", "a JSON null"),
    ],
)
def test_a_results_json_of_another_shape_is_listed_not_a_crash(tmp_path, body, why):
    # Catches: an AttributeError traceback (a summary that is a list, a null config) from
    # fedkws report, where a damaged run belongs in the list of missing runs.
    from fedkws.report import report

    sweep = tmp_path / "sweep"
    _write_run(sweep / "a" / "seed=0", 0, "central", {"eval": [0.5]}, {"eval": 0.5})
    (sweep / "b" / "seed=0").mkdir(parents=True)
    (sweep / "b" / "seed=0" / "results.json").write_text(body)
    text = report([sweep], markdown=sweep / "report.md")
    assert f"- b/seed=0 (unreadable results.json: not a fedkws results.json ({why}" in text


def test_linked_runs_and_runs_with_only_a_failure_or_checkpoint_are_reported(tmp_path):
    # Catches: a run folder that is a link to a folder silently left out (a sweep of links
    # only: "no run folder"), and a folder with nothing but failed.txt or checkpoint.pt
    # (a run that failed or was killed before its results.json) missing from the list.
    from fedkws.report import report

    store, sweep = tmp_path / "store", tmp_path / "sweep"
    _write_run(store / "run", 0, "central", {"eval": [0.5]}, {"eval": 0.5})
    (sweep / "linked").mkdir(parents=True)
    (sweep / "linked" / "seed=0").symlink_to(store / "run", target_is_directory=True)
    (sweep / "loop").symlink_to(sweep, target_is_directory=True)  # read once, not forever
    (sweep / "failed" / "seed=0").mkdir(parents=True)
    (sweep / "failed" / "seed=0" / "failed.txt").write_text("no Ray instance answers\n")
    (sweep / "killed" / "seed=0").mkdir(parents=True)
    (sweep / "killed" / "seed=0" / "checkpoint.pt").write_bytes(b"")
    text = report([sweep], markdown=tmp_path / "report.md")
    rows = markdown_table(text)
    assert set(rows) == {"linked", "failed", "killed"}, text
    assert rows["linked"]["seeds"] == "1" and rows["linked"]["test/eval/acc"] == "0.500"
    assert "- failed/seed=0 (failed: no Ray instance answers)" in text
    assert "- killed/seed=0 (no results.json)" in text


def test_one_run_named_several_ways_is_one_run(tmp_path, monkeypatch):
    # Catches: `fedkws report runs/r1 /abs/runs/r1 ./runs/../runs/r1` counting one run
    # three times (a mean and an interval over copies of itself).
    from fedkws.report import find_runs

    _write_run(tmp_path / "runs" / "r1", 0, "central", {"eval": [0.5]}, {"eval": 0.5})
    (tmp_path / "alias").symlink_to(tmp_path / "runs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    names = [Path("runs/r1"), tmp_path / "runs" / "r1", Path("./runs/../runs/r1"),
             Path("alias/r1"), Path("runs")]  # fmt: skip
    assert [run.folder for run in find_runs(names)] == [Path("runs/r1")]


def test_a_sweep_of_seeds_only_is_one_cell(tmp_path):
    # Catches: seed folders straight under the sweep (its override dirname empty) each
    # taken for a cell of its own, so no mean or interval over the seeds.
    from fedkws.report import report

    sweep = tmp_path / "seeds"
    for seed, acc in CENTRAL_VAL.items():
        _write_run(sweep / f"seed={seed}", seed, "central", {"eval": [acc]}, {"eval": acc})
    rows = markdown_table(report([sweep], markdown=sweep / "report.md"))
    assert list(rows) == ["seeds"] and rows["seeds"]["seeds"] == str(len(CENTRAL_VAL))
    mean = sum(CENTRAL_VAL.values()) / len(CENTRAL_VAL)
    assert rows["seeds"]["test/eval/acc"].startswith(f"{mean:.3f} ± ")


def test_a_sweep_of_centralised_runs_only_has_no_comparison(fake_sweep):
    # Catches: "no centralised cell" said of a sweep that is nothing but centralised cells.
    from fedkws.errors import ConfigError, write_failure
    from fedkws.report import report

    shutil.rmtree(fake_sweep / FED)
    shutil.rmtree(fake_sweep / LOCAL)
    # ... nor a comparison table of all-"missing" rows for a centralised cell whose every
    # job failed (it has no results.json to say it is centralised; its kept config does).
    failed = fake_sweep / "optimizer.lr=9,strategy=central" / "seed=0"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "config.yaml").write_text("seed: 0\nstrategy:\n  name: central\n")
    write_failure(failed, ConfigError("optimizer.lr=9: too large"))
    text = report([fake_sweep], markdown=fake_sweep / "report.md")
    assert "no centralised cell" not in text and "against the centralised" not in text
    assert "optimizer.lr=9,strategy=central/seed=0 (failed: optimizer.lr=9: too large)" in text


def test_missing_run_is_marked_in_markdown_and_csv(fake_sweep):
    from fedkws.report import report

    # a fourth cell whose only run stopped early (results.json, not complete)
    _write_run(fake_sweep / "bn=silo,strategy=fedavg" / "seed=0", 0, "fedavg",
               {"eval": [0.3]}, {"eval": 0.3})  # fmt: skip
    path = fake_sweep / "bn=silo,strategy=fedavg" / "seed=0" / "results.json"
    raw = json.loads(path.read_text())
    raw["summary"]["complete"] = False
    path.write_text(json.dumps(raw))
    text = report([fake_sweep], markdown=fake_sweep / "report.md")
    md, rows = markdown_table(text), _csv_rows(fake_sweep / "report.csv")
    assert (md[LOCAL]["seeds"], md[LOCAL]["missing"]) == ("2", "seed=2")
    assert (rows[LOCAL]["seeds"], rows[LOCAL]["missing"]) == ("2", "seed=2")
    silo = "bn=silo,strategy=fedavg"
    marked = (md[silo]["seeds"], md[silo]["missing"], md[silo]["test/eval/acc"])
    assert marked == ("0", "seed=0", "missing")
    assert _comparison(text)[silo]["test/eval/acc vs central"] == "missing"
    marked = (rows[silo]["seeds"], rows[silo]["missing"], rows[silo]["test/eval/acc_mean"])
    assert marked == ("0", "seed=0", "")
    listed = text.split("missing (", 1)[1]
    assert f"{LOCAL}/seed=2 (no results.json)" in listed
    assert f"{silo}/seed=0 (unfinished results.json)" in listed
    assert (fake_sweep / "report.md").read_text() == text + "\n"


def test_plots_are_written_and_the_bar_chart_has_a_group_per_cell(fake_sweep):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.container import BarContainer

    from fedkws.report import SweepTable, draw_bars, draw_cell_curves, report

    report([fake_sweep], plot=fake_sweep / "report.png")
    for name in ("report.png", "report_bars.png"):
        data = (fake_sweep / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
    table = SweepTable.build([fake_sweep])
    fig, ax = plt.subplots()
    try:
        draw_bars(ax, table)
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        modes = ["eval", "train", "recalibrated"]  # test/<mode>/acc of the sweep
        assert len(bars) == len(modes)  # one bar per mode in each group ...
        assert all(len(b) == len(table.cells) for b in bars)  # ... one group per cell
        assert sum(len(b) for b in bars) == len(table.cells) * len(modes)
        assert [t.get_text() for t in ax.get_legend().get_texts()] == modes
        assert [t.get_text() for t in ax.get_xticklabels()] == [CENTRAL, FED, LOCAL]
        heights = [b.get_height() for b in bars[0]]  # eval: the mean over seeds
        fed = _seed_summaries(fake_sweep, FED)
        assert heights[1] == pytest.approx(np.mean([r["test/eval/acc"] for r in fed.values()]))
        ax.clear()
        draw_cell_curves(ax, table.cells[1])  # FedAvg: mean line, min-max band per mode
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["val/eval/acc", "val/train/acc", "val/recalibrated/acc"]
        assert len(ax.collections) == 3
        assert list(ax.get_lines()[0].get_ydata()) == pytest.approx(
            np.mean([FED_CURVES[s]["eval"] for s in FED_CURVES], axis=0)
        )
    finally:
        plt.close(fig)


def test_legends_show_labels_starting_with_an_underscore(tmp_path, monkeypatch):
    # Catches: matplotlib dropping `_silence_`/`_unknown_` from a legend it collects itself.
    import fedkws.plots as plots
    from fedkws.data import partition

    with plots.figure(tmp_path / "a.png") as (_fig, ax):
        ax.plot([0, 1], [0, 1], label="_silence_")
        ax.bar([0, 1], [1, 2], label="_unknown_")
        ax.plot([0, 1], [1, 0])  # unlabelled: stays out
        ax.fill_between([0, 1], [0, 0], [1, 1])
        assert [t.get_text() for t in ax.legend().get_texts()] == ["_silence_", "_unknown_"]
    drawn = spy_on_figures(monkeypatch)
    names = ("_silence_", "_unknown_", "yes", "no")
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    partition.plot([np.arange(4), np.arange(4, 8)], labels, names, tmp_path / "partition.png")
    assert [t.get_text() for t in drawn[0].get_legend().get_texts()] == list(names)


def _sweep_config(sweep: Path, mode: str):
    return OmegaConf.create({
        "name": "bn_study", "hydra": {"sweep": {"dir": str(sweep)}},
        "logger": {"mode": mode, "project": "fedkws-test", "entity": None, "tags": [],
                   "init_timeout": 30},
    })  # fmt: skip


def test_sweep_callback_logs_the_table_to_wandb_in_the_sweep_group(fake_sweep, monkeypatch):
    # Catches: no W&B summary run, a run outside the sweep's group, a table that differs
    # from report.md.
    from fedkws.report import SweepReport
    from test_tracking import offline_run

    monkeypatch.delenv("WANDB_MODE", raising=False)
    SweepReport().on_multirun_end(_sweep_config(fake_sweep, "offline"))
    for name in ("report.md", "report.csv", "report.png", "report_bars.png"):
        assert (fake_sweep / name).is_file(), name
    run = offline_run(fake_sweep)
    assert (run["group"], run["name"]) == (f"bn_study/{fake_sweep.name}", "report")
    tables = fake_sweep.glob("wandb/offline-run-*/files/media/table/*.table.json")
    files = {p.name.rsplit("_", 2)[0]: p for p in tables}  # <key>_<step>_<hash>.table.json
    logged = json.loads(files["report"].read_text())
    text = (fake_sweep / "report.md").read_text()
    md, vs = markdown_table(text), _comparison(text)  # one W&B table: both, side by side
    assert logged["columns"] == list(md[FED]) + list(vs[FED])[1:]
    assert [row[0] for row in logged["data"]] == [CENTRAL, FED, LOCAL]
    assert logged["data"][1] == list(md[FED].values()) + list(vs[FED].values())[1:]
    values = json.loads(files["report_values"].read_text())
    assert values["columns"][:3] == ["cell", "seeds", "missing"]
    assert [row[:3] for row in values["data"]] == [
        [CENTRAL, 3, ""],
        [FED, 3, ""],
        [LOCAL, 2, "seed=2"],
    ]


def test_sweep_callback_with_wandb_disabled_logs_nothing(fake_sweep):
    from fedkws.report import SweepReport

    SweepReport().on_multirun_end(_sweep_config(fake_sweep, "disabled"))
    assert (fake_sweep / "report.csv").is_file()
    assert not (fake_sweep / "wandb").exists()


def test_columns_keep_the_matching_values_with_their_vs_central_twin(fake_sweep, capsys):
    # Catches: a pattern that keeps other columns or drops the settings, a 'vs central'
    # column lost with its value column, and a pattern matching nothing read as "all".
    from fedkws import cli
    from fedkws.report import report

    report([fake_sweep], markdown=fake_sweep / "full.md")
    markdown = fake_sweep / "test.md"
    assert cli.main(["report", str(fake_sweep), "--columns", "test/*/acc",
                     "--markdown", str(markdown)]) == 0  # fmt: skip
    rows, full = _csv_rows(markdown.with_suffix(".csv")), _csv_rows(fake_sweep / "full.csv")
    stats = {c.removesuffix("_mean") for c in rows[FED] if c.endswith("_mean")}
    modes = ("eval", "train", "recalibrated")
    assert stats == {f"test/{m}/acc" for m in modes} | {f"test/{m}/acc_vs_central" for m in modes}
    assert rows[FED]["strategy"] == "fedavg" and rows[FED]["seeds"] == "3"
    for column in ("test/eval/acc_mean", "test/eval/acc_vs_central_mean"):
        assert rows[FED][column] == full[FED][column]  # the same numbers as the whole report
    header = markdown.read_text().splitlines()[0]
    assert "test/eval/acc" in header and "val/eval/acc" not in header
    with pytest.raises(SystemExit) as stop:
        cli.main(["report", str(fake_sweep), "--columns", "nothing/*"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "val/eval/acc" in err
    assert err.startswith("error: --columns nothing/* matches no column")
    # Catches: a typo'd pattern beside one that matches, its columns dropped unsaid.
    with pytest.raises(SystemExit) as stop:
        cli.main(["report", str(fake_sweep), "--columns", "test/*/acc,tset/eval/acc"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith("error: --columns tset/eval/acc matches no column")


def test_a_failure_keeps_its_message_and_for_a_fault_its_traceback(tmp_path):
    from fedkws.errors import ConfigError, read_failure, write_failure

    write_failure(tmp_path / "mistake", ConfigError("first line\nsecond line"))
    assert (tmp_path / "mistake" / "failed.txt").read_text() == "first line\nsecond line\n"
    assert read_failure(tmp_path / "mistake") == "first line"
    try:
        {}["key"]
    except KeyError as err:  # a fault, not a user error: where it happened is kept too
        write_failure(tmp_path / "fault", err)
    text = (tmp_path / "fault" / "failed.txt").read_text()
    assert text.startswith("KeyError: 'key'\n\nTraceback (most recent call last):")
    assert 'tests/test_report.py", line' in text
    assert read_failure(tmp_path / "fault") == "KeyError: 'key'"
    assert read_failure(tmp_path / "no_failure") is None


def _multirun_yaml(sweep: Path, task: list[str]) -> None:
    """The multirun.yaml Hydra writes for ``fedkws-train -m <task>``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    fixed = [t for t in task if "," not in t]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=fixed, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.overrides.task = task
    sweep.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, sweep / "multirun.yaml")


def test_a_stopped_sweeps_jobs_that_never_started_are_listed(tmp_path):
    # Catches: a sweep stopped by Ctrl-C whose report lists only the jobs that made their
    # folders, so the table reads as if the sweep were smaller.
    from fedkws.report import report

    sweep = tmp_path / "sweep"
    _multirun_yaml(sweep, ["experiment=bn_ablation", "seed=0,1", "train.local_epochs=2"])
    ran = [("full", "iid", 0), ("full", "iid", 1), ("full", "dirichlet", 0),
           ("params_only", "iid", 0)]  # fmt: skip
    for bn, partition, seed in ran:
        folder = sweep / f"bn={bn},partition={partition},train.local_epochs=2" / f"seed={seed}"
        _write_run(folder, seed, "fedavg", {"eval": [0.5]}, {"eval": 0.5})
    text = report([sweep], markdown=tmp_path / "report.md")
    why = "not started: the sweep stopped before it, or is still running"
    listed = re.findall(rf"^- (\S+) \({why}\)$", text, re.M)
    every = {(bn, p, s) for bn in ("full", "params_only", "local")
             for p in ("iid", "dirichlet") for s in (0, 1)}  # fmt: skip
    assert sorted(listed) == sorted(f"bn={bn},partition={p},train.local_epochs=2/seed={s}"
                                    for bn, p, s in every - set(ran))  # fmt: skip
    assert markdown_table(text)["bn=local,partition=iid,train.local_epochs=2"]["seeds"] == "0"
    # A job folder the sweep does not account for: its list is not trusted, nothing added.
    _write_run(sweep / "other" / "seed=0", 0, "fedavg", {"eval": [0.5]}, {"eval": 0.5})
    assert "not started" not in report([sweep])


def test_an_unreadable_multirun_yaml_is_said_not_skipped(tmp_path, capsys):
    # Catches: a damaged multirun.yaml silently dropping the list of jobs never started.
    from fedkws.report import report

    sweep = tmp_path / "sweep"
    _write_run(sweep / "seed=0", 0, "fedavg", {"eval": [0.5]}, {"eval": 0.5})
    (sweep / "multirun.yaml").write_text("x: [\n")
    report([sweep])
    warning = [line for line in capsys.readouterr().err.splitlines() if "multirun" in line]
    assert len(warning) == 1 and warning[0].startswith(f"warning: {sweep / 'multirun.yaml'} ")
    assert "cannot be read (" in warning[0] and "never started are not listed" in warning[0]


def test_a_second_sweeps_cells_are_named_from_its_own_folder(tmp_path):
    # Catches: the cells of any folder but the first named from their last two path parts,
    # so a cell name with a path in it ("cache_dir=/a/b,...") lost its front.
    from fedkws.report import report

    first, second = tmp_path / "fed", tmp_path / "central"
    _write_run(first / "bn=full" / "seed=0", 0, "fedavg", {"eval": [0.5]}, {"eval": 0.5})
    cell = "cache_dir=/tmp/x/cache,strategy=central"
    _write_run(second / cell / "seed=0", 0, "central", {"eval": [0.9]}, {"eval": 0.9})
    assert set(markdown_table(report([first, second]))) == {"bn=full", cell}


def test_a_fedbn_cell_has_its_bars(tmp_path):
    # Catches: FedBN/SiloBN cells (no global model: test/fedbn/<mode>/acc_mean) left empty
    # in the bar chart, with no "missing" note either.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.container import BarContainer

    from fedkws.report import SweepTable, draw_bars
    from fedkws.tracking import Recorder, Result, RoundRecord, WandbLogger

    folder = tmp_path / "sweep" / "bn=local" / "seed=0"
    folder.mkdir(parents=True)
    logger = WandbLogger("disabled", "x", {}, folder)
    recorder = Recorder(folder, Result(config={"seed": 0}), logger)
    recorder.log_round(RoundRecord(1, {"fed/eval/acc_mean": 0.6}, 1.0))
    recorder.finish({"strategy": "fedavg", "bn_sync": "local", "complete": True,
                     "rounds_completed": 1, "test/fedbn/eval/acc_mean": 0.7})  # fmt: skip
    _write_run(tmp_path / "sweep" / "bn=full" / "seed=0", 0, "fedavg", {"eval": [0.5]},
               {"eval": 0.5})  # fmt: skip
    fig, ax = plt.subplots()
    try:
        draw_bars(ax, SweepTable.build([tmp_path / "sweep"]))
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["eval", "eval (each client's model, mean)"]
        cells = [t.get_text() for t in ax.get_xticklabels()]
        fedbn = bars[labels.index("eval (each client's model, mean)")]
        assert fedbn[cells.index("bn=local")].get_height() == pytest.approx(0.7)
    finally:
        plt.close(fig)


def test_the_grids_half_width_is_the_t_intervals_unclipped():
    # Catches: the ± of report_grid.png taken from the table's interval clipped to [0, 1],
    # which understated it near 1 (0.026 instead of 0.038 for these three seeds).
    from types import SimpleNamespace

    from fedkws.grid import _cell_stats

    def cell(*values):
        return SimpleNamespace(results=[SimpleNamespace(summary={"k": v}) for v in values])

    values = np.array([0.97, 0.99, 1.00])
    t_975_df2 = 4.302652729911275  # Student's t, 97.5 % quantile, 2 degrees of freedom
    mean, half = _cell_stats(cell(*values), "k")
    assert mean == pytest.approx(values.mean())
    assert half == pytest.approx(t_975_df2 * values.std(ddof=1) / np.sqrt(3), rel=1e-9)
    assert _cell_stats(cell(0.5), "k") == (0.5, None) and _cell_stats(cell(), "k") is None


def test_a_sweep_resumed_with_more_rounds_finds_its_jobs_folders(tmp_path):
    # Catches: train.rounds / train.stop_after_round in the job folder names, so the same
    # sweep with resume=true (more rounds, or without its stop) started every job over in
    # new folders, and the report listed the stopped ones as missing.
    from omegaconf import OmegaConf

    from fedkws.train import job_folders

    folders = []
    for task in (["seed=0,1", "bn=full,local", "train.rounds=2", "train.stop_after_round=1"],
                 ["seed=0,1", "bn=full,local", "train.rounds=3", "resume=true"]):  # fmt: skip
        _multirun_yaml(tmp_path / str(len(folders)), task)
        jobs = job_folders(OmegaConf.load(tmp_path / str(len(folders)) / "multirun.yaml"))
        folders.append(sorted(folder for _, folder in jobs))
    assert folders[0] == folders[1] == ["bn=full/seed=0", "bn=full/seed=1", "bn=local/seed=0",
                                        "bn=local/seed=1"]  # fmt: skip
    # A sweep over the rounds themselves: refused (its jobs would share folders), saying why.
    from fedkws.errors import ConfigError
    from fedkws.train import _refuse_shared_job_folders

    _multirun_yaml(tmp_path / "rounds", ["train.rounds=2,3"])
    with pytest.raises(ConfigError, match="train.rounds=3 is left out .* command of its own"):
        _refuse_shared_job_folders(OmegaConf.load(tmp_path / "rounds" / "multirun.yaml"))


def test_a_report_with_no_finished_run_is_one_error(tmp_path):
    # Catches: a table of "missing" rows and exit status 0 when every run failed, which
    # a script running `fedkws report` after its sweep would take for a result.
    sweep = tmp_path / "sweep"
    for i, why in enumerate(["no Ray instance answers", "optimizer.lr=9: too large"] * 2):
        (sweep / f"job{i}").mkdir(parents=True)
        (sweep / f"job{i}" / "failed.txt").write_text(f"{why}\n")
    done = _report(sweep)
    assert done.returncode == 2 and done.stdout == "", done
    assert error_lines(done.stderr) == [
        f"error: no run under {sweep} has finished: job0 (failed: no Ray instance answers); "
        "job1 (failed: optimizer.lr=9: too large); job2 (failed: no Ray instance answers); "
        "and 1 more"
    ]
    # One finished run: the report, with the failed ones listed under it.
    _write_run(sweep / "job4", 0, "fedavg", {"eval": [0.5]}, {"eval": 0.5})
    done = _report(sweep)
    assert done.returncode == 0, done
    assert "- job3 (failed: optimizer.lr=9: too large)" in done.stdout
