"""Every option of every config group composes; bad choices are explained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose_cfg
from fedkws import CONF_DIR
from fedkws.core.models import build_model
from fedkws.data.pipeline import augment_config, data_config, feature_config
from fedkws.spec import from_config

GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((Path(CONF_DIR) / g).glob("*.yaml"))]


def test_config_groups_are_the_study_axes():
    assert GROUPS == sorted(
        ["dataset", "features", "augment", "model", "norm", "optimizer", "partition",
         "strategy", "bn", "logger", "experiment"]
    )  # fmt: skip


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_builds(group, option, tmp_path):
    cfg = compose_cfg([f"{group}={option}"], tmp_path)
    # The plain builders accept what the config says.
    feature_config(cfg.features)
    augment_config(cfg.augment)
    data_config(cfg.dataset)
    spec = from_config(cfg).model.build_args(num_classes=12)
    if spec["name"] != "resnet" or spec.get("depth", 18) <= 18:
        build_model(**spec)
    assert cfg.strategy.name in ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "central")
    assert cfg.bn.sync in ("full", "params_only", "local")


def test_every_yaml_opens_with_the_command_that_runs_it():
    for path in Path(CONF_DIR).rglob("*.yaml"):
        head = path.read_text().splitlines()[:20]
        assert any("fedkws-train" in line or "fedkws-prepare" in line for line in head), path


def test_wrong_choice_lists_valid_options(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fedkws.train", "norm=bacth", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Could not find 'norm/bacth'" in result.stderr
    for valid in ("batch", "group", "layer", "instance", "none"):
        assert valid in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_dataset_gives_one_line_error(tmp_path):
    missing = tmp_path / "no_such_dataset"
    result = subprocess.run(
        [sys.executable, "-m", "fedkws.train", "dataset=speech_commands_v2",
         f"dataset.root={missing}", "dataset.download=null", "logger=disabled",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and str(missing) in lines[-1]
    assert "fedkws generate" in lines[-1] and "Traceback" not in result.stderr


def test_seed_repro_preset(tmp_path):
    cfg = compose_cfg(["experiment=seed_repro"], tmp_path)
    assert cfg.name == "seed_repro" and cfg.train.rounds == 12
    assert list(cfg.partition.names) == ["alice", "bob"] and cfg.bn.sync == "params_only"
    assert cfg.model.depth == 34


def test_prepare_prints_dataset_and_partition_summary(make_cfg, tmp_path):
    from fedkws.prepare import prepare_data

    cfg = make_cfg(["partition=dirichlet", "partition.alpha=0.2", "partition.min_partition_size=2"])
    text = prepare_data(cfg, tmp_path)
    assert "12class" in text and "_silence_" in text and "total" in text
    assert "partition 'dirichlet'" in text and "4 clients" in text
    assert (tmp_path / "partition.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "data_summary.txt").read_text().strip() == text.strip()
