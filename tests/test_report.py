"""The sweep report: a real (tiny, centralised) multirun read back by ``fedkws report``."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedkws import CONF_DIR
from helpers import tiny_dataset_overrides

BIN = Path(sys.executable).parent
# summary key of each column the report must show (independent of report.py)
COLUMNS = {
    "val/eval/acc": "final/val/eval/acc",
    "val/train/acc": "final/val/train/acc",
    "test/eval/acc": "test/eval/acc",
    "test/train/acc": "test/train/acc",
}


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "FLWR_TELEMETRY_ENABLED": "0"}


def _table(text: str) -> dict[str, dict[str, str]]:
    """Rows of the first Markdown table in ``text``, keyed by the ``run`` column."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True))
            for ln in lines[2:]]  # fmt: skip
    return {row["run"]: row for row in rows}


def _report(*args: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "fedkws"), "report", *map(str, args)],
        capture_output=True, text=True, timeout=120, env=_env(),
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
    # Keep the data paths out of the run folder names, as a user's sweep would.
    keys = list(OmegaConf.load(Path(CONF_DIR) / "config.yaml").hydra.job.config.override_dirname
                .exclude_keys) + ["data_dir", "cache_dir", "dataset.root"]  # fmt: skip
    cmd = [
        str(BIN / "fedkws-train"), "-m", "strategy=central", "model=cnn", "train.rounds=1",
        "seed=0,1", "optimizer.lr=0.001,0.003", *tiny_dataset_overrides(data_dir, tiny_root),
        "logger=disabled", "progress=false", f"hydra.sweep.dir={sweep_dir}",
        f"hydra.job.config.override_dirname.exclude_keys=[{','.join(keys)}]",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=work, env=_env())
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
    out = _report(sweep)
    assert out.returncode == 0, out.stderr
    rows = _table(out.stdout)
    assert set(rows) == set(cells)  # one row per cell, seeds merged
    for name, runs in cells.items():
        row = rows[name]
        assert row["seeds"] == "2" and row["missing"] == "-"
        assert row["strategy"] == "central" and row["rounds"] == "1"
        for column, key in COLUMNS.items():
            assert row[column] == _mean_sd([run[key] for run in runs]), (name, column)
    # The Hydra callback wrote the same table into the sweep folder at the end.
    assert _table((sweep / "report.md").read_text()) == rows
    assert (sweep / "report.png").read_bytes()[:4] == b"\x89PNG"


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
    out = _report(copy)
    assert out.returncode == 0, out.stderr
    rows = _table(out.stdout)
    assert set(rows) == {partial, full, "optimizer.lr=0.1"}
    assert (rows[partial]["seeds"], rows[partial]["missing"]) == ("1", "seed=1")
    for column, key in COLUMNS.items():
        assert rows[partial][column] == _single(kept, key)
    assert (rows[full]["seeds"], rows[full]["missing"]) == ("2", "-")
    crashed_row = rows["optimizer.lr=0.1"]
    assert (crashed_row["seeds"], crashed_row["missing"]) == ("0", "seed=0")
    assert all(crashed_row[column] == "missing" for column in COLUMNS)
    listed = out.stdout.split("missing (", 1)[1]
    assert f"{partial}/seed=1 (no results.json)" in listed
    assert "optimizer.lr=0.1/seed=0 (no results.json)" in listed
