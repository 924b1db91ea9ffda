"""Every experiment preset smoke-runs tiny.

That every sweep cell composes and validates is tests/test_config.py's job (cells
parsed with Hydra's own OverridesParser, counted against the documented job count).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedkws import CONF_DIR
from fedkws.run import run
from helpers import evaluated_modes

PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
TINY_RUN = [
    "train.rounds=1",
    "train.batch_size=32",
    "model.depth=10",
    "model.width=8",
    "partition.min_partition_size=2",
]
# Presets on the small CNN shrink its channels instead of a ResNet's depth and width.
TINY_CNN = ["train.rounds=1", "train.batch_size=32", "model.channels=[4,4]",
            "partition.min_partition_size=2"]  # fmt: skip


def _tiny(preset: str, make_cfg) -> list[str]:
    # One thread per client: a preset reserving more (seed_faithful: 2) would run its in-process
    # clients on more threads than this test worker's share of the cores.
    tiny = TINY_CNN if make_cfg([f"experiment={preset}"]).model.name == "cnn" else TINY_RUN
    return [*tiny, "federation.client_resources.num_cpus=1"]


def test_presets_exist():
    assert {"seed_repro", "bn_ablation", "norm_augment_ablation"} <= set(PRESETS)


BACKENDS = ["inprocess", pytest.param("ray", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_smoke_runs_tiny(preset, backend, make_cfg, tmp_path):
    cfg = make_cfg(
        [f"experiment={preset}", *_tiny(preset, make_cfg), f"federation.backend={backend}"]
    )
    result = run(cfg, tmp_path / preset)
    assert [r.round for r in result.rounds] == [1]
    assert result.summary["complete"]
    assert (tmp_path / preset / "results.json").is_file()
    assert not list((tmp_path / preset).glob("*.png"))  # plots=false (the tests' default)


def test_seed_repro_centralised_baseline_smoke(make_cfg, tmp_path):
    cfg = make_cfg(["experiment=seed_repro", "strategy=central", *TINY_RUN, "plots=true"])
    result = run(cfg, tmp_path / "central")
    assert result.summary["bn_sync"] == "central"
    assert "test/eval/acc" in result.summary and "test/train/acc" in result.summary
    modes = evaluated_modes(result.summary)
    pngs = {p.name for p in (tmp_path / "central").glob("*.png")}
    assert "train" in modes and pngs == {"accuracy.png"} | {f"confusion_{m}.png" for m in modes}
