"""The ``fedkws`` command, run as a user runs it: help, a report, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import cli_env

FEDKWS = str(Path(sys.executable).parent / "fedkws")


def _fedkws(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [FEDKWS, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=cli_env(),
    )


def _results_json(folder: Path, summary: dict) -> None:
    """A finished run's results.json, written by hand (not by the project's writer)."""
    folder.mkdir(parents=True)
    rounds = [{"round": 1, "metrics": {"val/eval/acc": summary["final/val/eval/acc"]},
               "seconds": 1.0, "clients": {}}]  # fmt: skip
    payload = {"config": {}, "rounds": rounds, "summary": summary}
    (folder / "results.json").write_text(json.dumps(payload))


def test_help_lists_the_subcommands():
    out = _fedkws("--help")
    assert out.returncode == 0 and out.stderr == ""
    for command in ("generate", "download", "report"):
        assert command in out.stdout


# Two-sided 95 % Student t quantiles t_{0.975, df} (printed tables; independent of fedkws).
T975 = {1: 12.706204736174707, 2: 4.302652729911275}


def _t95(values: list[float], lo: float = 0.0) -> str:
    """``[lo, hi]`` of mean ± t * sd / sqrt(n), clipped to [lo, 1], as the report prints it."""
    n = len(values)
    mean = sum(values) / n
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    half = T975[n - 1] * sd / n**0.5
    sign = "+" if lo < 0 else ""
    return f"[{max(mean - half, lo):{sign}.3f}, {min(mean + half, 1.0):{sign}.3f}]"


def _rows(stdout: str) -> dict[str, list[str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in lines]
    return {row[0]: row for row in cells[2:]} | {"header": cells[0]}


def test_report_on_a_folder(tmp_path):
    base = {"strategy": "fedavg", "bn_sync": "full", "norm": "batch", "rounds_completed": 3,
            "complete": True, "wall_s": 10.0}  # fmt: skip
    _results_json(tmp_path / "runs" / "bn=full" / "seed=0",
                  {**base, "final/val/eval/acc": 0.5, "test/eval/acc": 0.25})  # fmt: skip
    _results_json(tmp_path / "runs" / "bn=full" / "seed=1",
                  {**base, "final/val/eval/acc": 0.7, "test/eval/acc": 0.75})  # fmt: skip
    _results_json(tmp_path / "runs" / "bn=local" / "seed=0",
                  {**base, "bn_sync": "local", "final/val/eval/acc": 0.125,
                   "test/eval/acc": 0.375})  # fmt: skip
    out = _fedkws("report", tmp_path / "runs", "--markdown", tmp_path / "table.md")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| bn=")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    # mean and sample std of (0.5, 0.7) = 0.6 and 0.1414; of (0.25, 0.75) = 0.5 and 0.3536;
    # t interval of 2 seeds: mean ± 12.706 * sd / sqrt(2), clipped to [0, 1]
    # columns: run, seeds, missing, strategy, bn_sync, norm, rounds, val/eval, test/eval, wall
    assert cells == [
        ["bn=full", "2", "-", "fedavg", "full", "batch", "3", "0.600 ± 0.141 [0.000, 1.000]",
         "0.500 ± 0.354 [0.000, 1.000]", "10"],
        ["bn=local", "1", "-", "fedavg", "local", "batch", "3", "0.125", "0.375", "10"],
    ]  # fmt: skip
    assert (tmp_path / "table.md").read_text().strip() == out.stdout.strip()


def test_report_intervals_differences_and_reference_row(tmp_path):
    # A centralised reference (1 seed, with its bootstrap intervals), a federated cell of
    # 3 seeds (t interval over seeds), and one of 1 seed (its own intervals).
    common = {"bn_sync": "full", "norm": "batch", "rounds_completed": 5, "complete": True,
              "wall_s": 1.0}  # fmt: skip
    central = {**common, "strategy": "central", "final/val/eval/acc": 0.91,
               "final/val/eval/acc_ci95": [0.88, 0.935], "test/eval/acc": 0.9,
               "test/eval/acc_ci95": [0.87, 0.925], "test/recalibrated/acc": 0.905,
               "test/diff/recalibrated-eval": {"diff": 0.005, "ci95": [-0.002, 0.012]}}  # fmt: skip
    _results_json(tmp_path / "runs" / "strategy=central" / "seed=0", central)
    fed = {"val": [0.71, 0.75, 0.8], "test": [0.70, 0.74, 0.81], "rec": [0.78, 0.8, 0.83]}
    for seed in range(3):
        _results_json(
            tmp_path / "runs" / "alpha=0.1" / f"seed={seed}",
            {**common, "strategy": "fedavg", "final/val/eval/acc": fed["val"][seed],
             "final/val/eval/acc_ci95": [0.0, 1.0],  # per-seed bounds: never averaged
             "test/eval/acc": fed["test"][seed], "test/eval/acc_ci95": [0.1, 0.2],
             "test/recalibrated/acc": fed["rec"][seed],
             "test/diff/recalibrated-eval": {
                 "diff": fed["rec"][seed] - fed["test"][seed], "ci95": [0.0, 0.1]}},
        )  # fmt: skip
    one = {**common, "strategy": "fedavg", "final/val/eval/acc": 0.5,
           "final/val/eval/acc_ci95": [0.4, 0.61], "test/eval/acc": 0.55,
           "test/diff/recalibrated-eval": {"diff": -0.125, "ci95": [-0.25, None]}}  # fmt: skip
    _results_json(tmp_path / "runs" / "alpha=1.0" / "seed=0", one)
    out = _fedkws("report", tmp_path / "runs")
    assert out.returncode == 0, out.stderr
    rows = _rows(out.stdout)
    assert rows["header"][7:] == ["val/eval/acc", "test/eval/acc", "test/recalibrated/acc",
                                  "test/diff/recalibrated-eval", "wall s"]  # fmt: skip
    order = [line.split("|")[1].strip() for line in out.stdout.splitlines()
             if line.startswith("| ")][1:]  # fmt: skip
    assert order == ["strategy=central", "alpha=0.1", "alpha=1.0"]  # the reference first
    assert rows["strategy=central"][7:11] == [
        "0.910 [0.880, 0.935]",
        "0.900 [0.870, 0.925]",
        "0.905",
        "+0.005 [-0.002, +0.012]",
    ]
    diffs = [r - t for r, t in zip(fed["rec"], fed["test"], strict=True)]  # 0.08, 0.06, 0.02
    assert rows["alpha=0.1"][1] == "3"
    assert rows["alpha=0.1"][7:11] == [
        f"0.753 ± 0.045 {_t95(fed['val'])}",  # mean 0.7533, sd 0.0451
        f"0.750 ± 0.056 {_t95(fed['test'])}",
        f"0.803 ± 0.025 {_t95(fed['rec'])}",
        f"+0.053 ± 0.031 {_t95(diffs, lo=-1.0)}",
    ]
    # the t interval is the seeds', not the mean of the per-seed bounds [0.1, 0.2]
    assert _t95(fed["test"]) == "[0.612, 0.888]"  # 0.75 ± 4.303 * 0.0557 / sqrt(3)
    # a null bound (non-finite when written) shows no interval rather than a broken one
    assert rows["alpha=1.0"][7:11] == ["0.500 [0.400, 0.610]", "0.550", "-",
                                       "-0.125"]  # fmt: skip


BAD_INPUT = {
    "report-nonexistent": ["report", "/nonexistent/sweep"],
    "report-empty-folder": ["report", "{tmp}"],
    "report-no-paths": ["report"],
    "report-unwritable-markdown": ["report", "{runs}", "--markdown", "/nonexistent/dir/t.md"],
    "generate-without-root": ["generate"],
    "generate-no-speakers": ["generate", "--root", "{tmp}/data", "--speakers", "0"],
    # Catches: the default --held-out-speakers (60) with fewer than 121 speakers: a ValueError.
    "generate-held-out-too-many": ["generate", "--root", "{tmp}/data", "--speakers", "60"],
    # Catches: argparse letting --unknown-words 3 (its default value) pass beside --all-words.
    "generate-unknown-and-all-words": [
        "generate", "--root", "{tmp}/data", "--all-words", "--unknown-words", "3",
    ],  # fmt: skip
    "generate-root-is-a-file": ["generate", "--root", "{runs}/results.json"],
    # Catches: "[Errno 17] File exists" (a file above --root).
    "generate-root-under-a-file": ["generate", "--root", "{runs}/results.json/data"],
    # Catches: 100 accepted, with a summary counting 100 of the 25 other words.
    "generate-unknown-words-over-25": [
        "generate",
        "--root",
        "{tmp}/data",
        "--unknown-words",
        "100",
    ],
    # Catches: the table written over the run's own results.json (exit 0, the run lost).
    "report-markdown-onto-results": ["report", "{runs}", "--markdown", "{runs}/results.json"],
    "report-plot-not-png": ["report", "{runs}", "--plot", "{tmp}/curves.txt"],
    # Catches: any other file of a run replaced (its plot, its Hydra config), and outputs
    # that replace each other (a .csv markdown is its own CSV; one name for both).
    "report-markdown-onto-a-run-file": ["report", "{runs}", "--markdown", "{runs}/accuracy.png"],
    "report-markdown-new-file-in-a-run": ["report", "{runs}", "--markdown", "{runs}/t.md"],
    "report-markdown-into-hydra": ["report", "{runs}", "--markdown", "{runs}/.hydra/t.md"],
    "report-markdown-is-its-csv": ["report", "{runs}", "--markdown", "{tmp}/t.csv"],
    "report-markdown-is-the-plot": [
        "report",
        "{runs}",
        "--markdown",
        "{tmp}/t.png",
        "--plot",
        "{tmp}/t.png",
    ],
    "unknown-command": ["frobnicate"],
    # Catches: ValueError tracebacks (a checksum or URL that is no such thing), "" taken for
    # the current folder (its files replaced by the archive's), a file as the root.
    "download-empty-root": ["download", "--root", ""],
    "download-sha256-not-hex": ["download", "--root", "{tmp}/sc", "--sha256", "abc"],
    "download-url-unparsable": ["download", "--root", "{tmp}/sc", "--url", "http://[::1"],
    # Catches: --url "" downloading the official archive without verifying it.
    "download-url-empty": ["download", "--root", "{tmp}/sc", "--url", ""],
    "download-root-is-a-file": [
        "download", "--root", "{runs}/results.json", "--url", "http://127.0.0.1:9/sc.tar.gz",
    ],
    "download-into-a-folder-of-other-files": [
        "download", "--root", "{runs}", "--url", "http://127.0.0.1:9/sc.tar.gz",
    ],
    # Catches: "PosixPath('.') has an empty name" tracebacks.
    "report-markdown-empty": ["report", "{runs}", "--markdown", ""],
    "report-plot-empty": ["report", "{runs}", "--plot", ""],
}  # fmt: skip
KNOWN_TRACEBACK: dict[str, str] = {}  # name -> reason, for a case that still prints a traceback


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(
            args,
            id=name,
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN_TRACEBACK[name])]
            if name in KNOWN_TRACEBACK
            else [],
        )
        for name, args in BAD_INPUT.items()
    ],
)
def test_bad_input_gives_one_error_line(args, tmp_path):
    runs = tmp_path / "runs" / "seed=0"
    _results_json(runs, {"complete": True, "final/val/eval/acc": 0.5})
    (runs / "accuracy.png").write_bytes(b"the run's plot")
    (runs / ".hydra").mkdir()
    (runs / ".hydra" / "config.yaml").write_text("seed: 0\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = [a.format(tmp=empty, runs=runs) for a in args]
    out = _fedkws(*argv, cwd=tmp_path)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, out.stderr
    assert out.stdout == ""
    assert not (empty / "data").exists()  # nothing half-generated
    assert json.loads((runs / "results.json").read_text())["summary"]["complete"]  # untouched
    assert (runs / "accuracy.png").read_bytes() == b"the run's plot"
    assert not any(empty.iterdir())  # nothing written
    assert sorted(p.name for p in runs.rglob("*")) == [".hydra", "accuracy.png", "config.yaml",
                                                        "results.json"]  # fmt: skip


def test_generate_with_an_empty_root_writes_nothing(tmp_path):
    # Catches: --root "" taken for the current folder (an empty one was generated into).
    out = _fedkws("generate", "--root", "", "--speakers", "3", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert [line for line in out.stderr.splitlines() if "error:" in line] == [
        "error: fedkws generate: argument --root: empty: name the folder "
        "(see fedkws generate --help)"
    ]
    assert not any(tmp_path.iterdir())


def test_a_default_that_does_not_fit_is_called_the_default(tmp_path):
    # Catches: "--held-out-speakers=60 leaves no training speaker" to a user who never gave it.
    out = _fedkws("generate", "--root", "data", "--speakers", "60", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "error: --held-out-speakers=60 (the default) leaves no training speaker" in out.stderr
    out = _fedkws("generate", "--root", "data", "--speakers", "60", "--held-out-speakers", "40",
                  cwd=tmp_path)  # fmt: skip
    assert "error: --held-out-speakers=40 leaves no training speaker" in out.stderr
    assert not (tmp_path / "data").exists()
