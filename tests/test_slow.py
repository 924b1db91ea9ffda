"""The presets at their real sizes (minutes each): ``make test-slow``."""

from __future__ import annotations

import pytest

from fedkws.run import run
from helpers import compose_cfg

pytestmark = pytest.mark.slow
CHANCE = 1 / 12


def test_seed_repro_collapses_and_baseline_learns(data_dir, tmp_path):
    fed = run(compose_cfg(["experiment=seed_repro"], data_dir), tmp_path / "fed")
    final = fed.rounds[-1].metrics
    assert [r.round for r in fed.rounds] == list(range(1, 13))
    assert all(r.metrics["val/eval/acc"] < 1.5 * CHANCE for r in fed.rounds)
    assert final["val/train/acc"] > 0.6
    central = run(
        compose_cfg(["experiment=seed_repro", "strategy=central"], data_dir), tmp_path / "central"
    )
    assert central.rounds[-1].metrics["val/eval/acc"] > 0.5
