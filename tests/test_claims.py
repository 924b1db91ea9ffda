"""Published claims read off a sweep: paired per-seed differences and their verdicts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedkws import claims
from fedkws.report import SweepTable, report

T_975 = {1: 12.706204736, 2: 4.302652730}  # Student t quantiles (printed tables), df 1 and 2
EVAL, TRAIN, FED = "test/eval/acc", "test/train/acc", "final/fed/eval/acc_mean"
SWEEP = {  # cell -> {summary key: value per seed}
    "arm=group,partition=dirichlet": {EVAL: [0.50, 0.55, 0.60]},
    "arm=batch_full,partition=dirichlet": {EVAL: [0.40, 0.50, 0.45]},
    "arm=batch_params_only,partition=iid": {EVAL: [0.08, 0.09, 0.085], TRAIN: [0.6, 0.62, 0.64]},
    "arm=batch_full,partition=iid": {EVAL: [0.05, 0.06, 0.07]},
    "arm=batch_fedbn,partition=channels": {FED: [0.7, 0.8]},
    "arm=batch_full,partition=channels": {FED: [0.6, 0.65, 0.9], EVAL: [0.5, 0.5, 0.5]},
}


def _write(folder: Path, seed: int, summary: dict) -> None:
    from fedkws.tracking import Recorder, Result, RoundRecord, WandbLogger

    folder.mkdir(parents=True)
    recorder = Recorder(
        folder, Result(config={"seed": seed}), WandbLogger("disabled", "x", {}, folder)
    )
    recorder.log_round(RoundRecord(1, {"val/eval/acc": 0.5}, 1.0))
    recorder.finish({"strategy": "fedavg", "complete": True, "rounds_completed": 1, **summary})


@pytest.fixture
def sweep(tmp_path) -> Path:
    for cell, keys in SWEEP.items():
        for seed in range(len(next(iter(keys.values())))):
            _write(tmp_path / cell / f"seed={seed}", seed, {k: v[seed] for k, v in keys.items()})
    return tmp_path


def _expected(diffs: list[float]) -> tuple[float, float, float]:
    """mean and t interval, computed here from the quantile table."""
    n, mean = len(diffs), sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = T_975[n - 1] * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def test_verdicts_pair_seeds_and_read_the_interval(sweep):
    # Catches: unpaired means, the wrong direction, a z interval, claims without cells listed.
    found = {v.claim.text: v for v in claims.verdicts(SweepTable.build([sweep]).cells)}
    by_source = {v.claim.source: v for v in found.values()}
    assert set(by_source) == {"the 2020 tutorial", "the 2020 tutorial's fix",
                              "Hsieh et al. 2020", "Li et al. 2021"}  # fmt: skip
    cases = {  # source -> (better - worse per seed, verdict)
        "the 2020 tutorial": ([0.6 - 0.08, 0.62 - 0.09, 0.64 - 0.085], "reproduced"),
        "the 2020 tutorial's fix": ([0.05 - 0.08, 0.06 - 0.09, 0.07 - 0.085], "contradicted"),
        "Hsieh et al. 2020": ([0.10, 0.05, 0.15], "not resolved"),  # mean 0.10, [-0.024, 0.224]
        "Li et al. 2021": ([0.7 - 0.6, 0.8 - 0.65], "not resolved"),  # two seeds paired
    }
    for source, (diffs, verdict) in cases.items():
        got = by_source[source]
        assert got.diffs == pytest.approx(diffs) and got.verdict == verdict, source
        mean, lo, hi = _expected(diffs)
        assert got.interval == pytest.approx((lo, hi), abs=1e-6)
        assert got.difference().startswith(f"{mean:+.3f} ± {np.std(diffs, ddof=1):.3f}")


def test_the_report_lists_the_claims_below_its_tables(sweep):
    text = report([sweep])
    section = text.split("published claims", 1)[1]
    rows = [line for line in section.splitlines() if " | " in line][1:]
    assert len(rows) == 4 and not any(line.startswith("|") for line in rows)
    assert any("Hsieh et al. 2020 | dirichlet |" in r and r.endswith("| 3 | not resolved")
               for r in rows)  # fmt: skip


def test_a_sweep_without_the_arms_has_no_claims(tmp_path):
    _write(tmp_path / "optimizer.lr=0.1" / "seed=0", 0, {EVAL: 0.5})
    assert "published claims" not in report([tmp_path])


def test_cells_split_by_a_third_axis_are_not_compared(tmp_path):
    # Catches: a claim read off whichever of several matching cells comes first.
    for augment in ("none", "shift"):
        for arm in ("group", "batch_full"):
            for seed in (0, 1):
                cell = f"arm={arm},augment={augment},partition=dirichlet"
                _write(tmp_path / cell / f"seed={seed}", seed, {EVAL: 0.1 * (seed + 1)})
    assert claims.verdicts(SweepTable.build([tmp_path]).cells) == []


def test_the_grid_draws_each_cells_mean_in_its_row_and_column(sweep, tmp_path, monkeypatch):
    # Catches: a cell drawn in another row or column, sd shown as the interval, a panel
    # for a metric no cell has.
    from helpers import spy_on_figures

    drawn = spy_on_figures(monkeypatch)
    report([sweep], plot=tmp_path / "r.png")
    assert (tmp_path / "r_grid.png").stat().st_size > 0
    panels = [ax for axes in drawn if hasattr(axes, "shape") and axes.shape == (1, 2)
              for ax in axes[0]]  # fmt: skip
    assert [ax.get_title() for ax in panels] == [
        "global model, eval mode (test)",
        "per client, own test split (mean)",
    ]
    eval_panel = panels[0]
    rows = [t.get_text() for t in eval_panel.get_yticklabels()]
    cols = [t.get_text() for t in eval_panel.get_xticklabels()]
    texts = {(int(round(t.get_position()[1])), int(round(t.get_position()[0]))): t.get_text()
             for t in eval_panel.texts}  # fmt: skip
    group = texts[(rows.index("group"), cols.index("dirichlet"))]
    mean, lo, hi = _expected([0.50, 0.55, 0.60])  # the cell's values, as an interval
    assert group == f"{mean:.2f}\n±{(hi - lo) / 2:.2f}"
    assert (rows.index("batch_fedbn"), cols.index("channels")) not in texts  # no global model


def test_the_grid_of_a_sweep_with_list_values_and_a_constant_override(tmp_path, monkeypatch):
    # Catches: cell names split at every comma ("dictionary update sequence element" with
    # model.channels=[4,4]: no table at the sweep's end), and no grid once the command
    # line held one more override with the same value in every job (train.local_epochs=3).
    from helpers import spy_on_figures

    for channels, acc in (("[4,4]", 0.3), ("[2,2]", 0.2)):
        for partition in ("iid", "dirichlet"):
            cell = f"model.channels={channels},partition={partition},train.local_epochs=3"
            _write(tmp_path / "sweep" / cell / "seed=0", 0, {EVAL: acc})
    drawn = spy_on_figures(monkeypatch)
    report([tmp_path / "sweep"], plot=tmp_path / "r.png")
    panel = next(axes[0][0] for axes in drawn if hasattr(axes, "shape") and axes.shape == (1, 1))
    assert [t.get_text() for t in panel.get_yticklabels()] == ["[2,2]", "[4,4]"]
    assert [t.get_text() for t in panel.get_xticklabels()] == ["dirichlet", "iid"]
    assert panel.get_ylabel() == "model.channels" and panel.get_xlabel() == "partition"
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
             for t in panel.texts}  # fmt: skip
    assert texts == {(0, 0): "0.20", (0, 1): "0.20", (1, 0): "0.30", (1, 1): "0.30"}


def test_cell_names_keep_escaped_and_bracketed_commas_in_their_values():
    from fedkws.report import cell_overrides

    assert cell_overrides(r"logger.notes=a\,b,model.channels=[4,4],x='c,d',seed=0") == {
        "logger.notes": r"a\,b",
        "model.channels": "[4,4]",
        "x": "'c,d'",
        "seed": "0",
    }
    assert cell_overrides("not an override") is None
