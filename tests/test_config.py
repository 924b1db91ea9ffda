"""Every option of every config group composes; bad choices are explained."""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from torch.nn.modules.batchnorm import _BatchNorm

from commands import run_command
from fedkws import CONF_DIR
from fedkws.core.models import bn_layers, bn_state_keys, build_model, count_parameters
from fedkws.data.pipeline import augment_config, data_config, feature_config
from fedkws.errors import ConfigError
from fedkws.spec import from_config
from helpers import compose_cfg

# conf/hydra/ holds Hydra's own settings (launchers), not an axis of the study.
GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((Path(CONF_DIR) / g).glob("*.yaml"))]


def test_config_groups_are_the_study_axes():
    assert GROUPS == sorted(
        ["dataset", "features", "augment", "model", "norm", "optimizer", "partition",
         "strategy", "bn", "logger", "arm", "experiment"]
    )  # fmt: skip


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_builds(group, option, tmp_path):
    cfg = compose_cfg([f"{group}={option}"], tmp_path)
    # The plain builders accept what the config says.
    feature_config(cfg.features)
    augment_config(cfg.augment)
    data_config(cfg.dataset)
    spec = from_config(cfg).model.build_args(num_classes=12)  # validates the whole config
    if spec["name"] != "resnet" or spec.get("depth", 18) <= 18:
        build_model(**spec)


# The option files that select a rule, and the key each sets: the files on disk are
# the list of choices, so a rule added in code without a file (or the reverse) fails.
# group: (config key, where the validated spec keeps it)
SELECTORS = {
    "strategy": ("strategy.name", "strategy.name"),
    "bn": ("bn.sync", "bn.sync"),
    "norm": ("norm.kind", "model.norm"),
    "partition": ("partition.scheme", "partition.scheme"),
}


def _spec_value(spec, group: str):
    obj = spec
    for attr in SELECTORS[group][1].split("."):
        obj = getattr(obj, attr)
    return obj


# Option files that are a variant of another rule rather than a rule of their own:
# partition=channels is IID labels with feature-shift clients.
VARIANTS = {("partition", "channels"): "iid"}
SELECTED = [(g, o) for g, o in OPTIONS if g in SELECTORS]


@pytest.mark.parametrize(("group", "option"), SELECTED, ids=[f"{g}={o}" for g, o in SELECTED])
def test_each_option_file_selects_the_rule_it_is_named_after(group, option, tmp_path):
    # Catches: a strategy (or bn sync, norm, partition) file the code rejects or renames.
    spec = from_config(compose_cfg([f"{group}={option}"], tmp_path))
    assert _spec_value(spec, group) == VARIANTS.get((group, option), option)
    if (group, option) == ("partition", "channels"):
        assert spec.partition.channels > 0
    if group == "strategy":
        assert spec.strategy.central == (option == "central")


@pytest.mark.parametrize("group", sorted(SELECTORS))
def test_code_accepts_exactly_the_option_files(group, tmp_path):
    # Catches: a rule accepted by the code that no config file offers, or the reverse.
    key = SELECTORS[group][0]
    with pytest.raises(ConfigError) as err:
        from_config(compose_cfg([f"{key}=no_such_rule"], tmp_path))
    line = next(ln for ln in str(err.value).splitlines() if ln.startswith(f"{key}="))
    allowed = set(re.findall(r"[A-Za-z0-9_]+", line.split("must be one of", 1)[1]))
    assert allowed == {o for g, o in OPTIONS if g == group and (g, o) not in VARIANTS}


# Small but architecturally identical variants of every model family.
FAMILIES = {
    "cnn": {},
    "res8": {"maps": 8},
    "res15": {"maps": 8},
    "resnet10": {"width": 4},
    "resnet18": {"width": 4},
    "resnet34": {"width": 4},
    "resnet50": {"width": 4},
}
# BatchNorm layers, counted by hand from the architectures: cnn two convs; res8 and
# res15 one per conv after the stem (6, 13); ResNets one per conv, plus the stem and
# one per projection shortcut (3 for basic blocks, 4 for bottlenecks).
BN_COUNT = {
    "cnn": 2,
    "res8": 6,
    "res15": 13,
    "resnet10": 1 + 4 * 2 + 3,
    "resnet18": 1 + 8 * 2 + 3,
    "resnet34": 1 + 16 * 2 + 3,
    "resnet50": 1 + 16 * 3 + 4,
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bn_layers_are_listed_in_forward_order(name):
    # Catches: bn_layers in registration order where forward order differs (e.g. a
    # shortcut's BatchNorm run before the main path), a BN run twice or never.
    torch.manual_seed(0)
    model = build_model(name, 12, norm="batch", **FAMILIES[name])
    called: list[_BatchNorm] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: called.append(m))
        for m in model.modules()
        if isinstance(m, _BatchNorm)
    ]
    model.train()
    model(torch.randn(2, 1, 40, 101))
    for h in hooks:
        h.remove()
    assert len(called) == BN_COUNT[name]
    assert [m for _, m in bn_layers(model)] == called


def test_state_dict_keys_of_a_hand_countable_model():
    # Catches: BN keys missing a buffer (num_batches_tracked), conv or head keys taken
    # for BN keys, a conv bias left in before BatchNorm.
    model = build_model("cnn", 12, norm="batch", channels=(4, 4), pooled=(1, 1))
    buffers = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    bn = {f"features.{i}.{k}" for i in (1, 5) for k in buffers}
    other = {"features.0.weight", "features.4.weight", "classifier.weight", "classifier.bias"}
    assert bn_state_keys(model) == bn
    assert set(model.state_dict()) == bn | other
    # conv 1x4x8x20 + BN 2x4 + conv 4x4x4x10 + BN 2x4 + linear 4x12 + 12
    assert count_parameters(model) == 640 + 8 + 640 + 8 + 48 + 12


def _sweep_cells(preset: str) -> list[list[str]]:
    """Every job of ``-m experiment=<preset>``, parsed the way Hydra's sweeper parses them."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={preset}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params or {}
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [f"{o.get_key_element()}={o.get_value_element_as_str()}"]
        for o in overrides
    ]
    return [list(cell) for cell in itertools.product(*axes)]


SWEEPS = [
    p.stem
    for p in sorted((Path(CONF_DIR) / "experiment").glob("*.yaml"))
    if re.search(r"^\s*sweeper:", p.read_text(), re.MULTILINE)
]


# literature and augment_ablation reuse bn_study's arms and partitions: slow only.
@pytest.mark.parametrize(
    "preset",
    [pytest.param(p, marks=pytest.mark.slow) if p in ("literature", "augment_ablation") else p
     for p in SWEEPS],
)  # fmt: skip
def test_every_sweep_cell_composes_and_validates(preset, tmp_path):
    # Catches: a sweep value the config or the code rejects, and a cell count that differs
    # from the one the preset documents ("6 jobs").
    cells = _sweep_cells(preset)
    documented = re.search(
        r"(\d+) jobs", (Path(CONF_DIR) / "experiment" / f"{preset}.yaml").read_text()
    )
    assert documented and len(cells) == int(documented.group(1))
    assert len({tuple(c) for c in cells}) == len(cells)
    # A seed changes no composition: one seed per combination of the other axes.
    distinct = {tuple(i for i in c if not i.startswith("seed=")): c for c in cells}
    for cell in distinct.values():
        spec = from_config(compose_cfg([f"experiment={preset}", *cell], tmp_path))
        assert spec.name == preset
        for item in cell:
            key, value = item.split("=", 1)
            if key in SELECTORS:
                assert str(_spec_value(spec, key)) == VARIANTS.get((key, value), value)
            if key == "arm":  # the arm's choices win over the preset's
                text = (Path(CONF_DIR) / "arm" / f"{value}.yaml").read_text()
                for group, attr in (("norm", "model.norm"), ("bn", "bn.sync")):
                    chosen = re.search(rf"override /{group}: (\w+)", text).group(1)
                    want = chosen if group == "norm" else _bn_sync(chosen)
                    assert _spec_value_at(spec, attr) == want, (cell, group)
                assert spec.strategy.central == ("override /strategy: central" in text)


def _spec_value_at(spec, path: str):
    obj = spec
    for attr in path.split("."):
        obj = getattr(obj, attr)
    return obj


def _bn_sync(option: str) -> str:
    # A bn option file sets bn.sync to its own name, except FedBN's file `local`.
    return re.search(r"^sync: (\w+)", (Path(CONF_DIR) / "bn" / f"{option}.yaml").read_text(),
                     re.MULTILINE).group(1)  # fmt: skip


def test_every_yaml_opens_with_the_command_that_runs_it():
    for path in Path(CONF_DIR).rglob("*.yaml"):
        head = path.read_text().splitlines()[:20]
        assert any("fedkws-train" in line or "fedkws-prepare" in line for line in head), path


def test_wrong_choice_lists_valid_options(tmp_path):
    result = run_command(
        [sys.executable, "-m", "fedkws.train", "norm=bacth", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Could not find 'norm/bacth'" in result.stderr
    for valid in ("batch", "group", "layer", "instance", "none", "ws"):
        assert valid in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_dataset_gives_one_line_error(tmp_path):
    missing = tmp_path / "no_such_dataset"
    result = run_command(
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


def test_a_seed_only_sweep_puts_its_jobs_in_the_sweep_folder(data_dir, tiny_root, tmp_path):
    # Catches: a sweep over nothing but excluded keys (seed) has an empty override dirname,
    # so the job folder '/seed=0' was absolute and the runs went to the filesystem's root.
    from omegaconf import OmegaConf

    from helpers import cli_env, tiny_dataset_overrides

    overrides = [o for o in tiny_dataset_overrides(data_dir, tiny_root) if o != "plots=false"]
    config = OmegaConf.load(Path(CONF_DIR) / "config.yaml")
    keys = [*config.hydra.job.config.override_dirname.exclude_keys,
            *(o.split("=", 1)[0] for o in overrides), "federation.sweep_ray"]  # fmt: skip
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "fedkws.prepare", "-m", "seed=0,1", *overrides,
        "federation.sweep_ray=false", f"hydra.sweep.dir={sweep}",
        f"hydra.job.config.override_dirname.exclude_keys=[{','.join(keys)}]",
    ]  # fmt: skip
    out = run_command(command, capture_output=True, text=True, env=cli_env(), timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    for seed in (0, 1):
        assert (sweep / f"seed={seed}" / "data_summary.txt").is_file(), out.stdout[-2000:]
    # Catches: a training report of prepare's jobs, each listed as a run that never started.
    assert not (sweep / "report.md").exists() and "not started" not in out.stdout


def test_prepare_prints_dataset_and_partition_summary(make_cfg, tmp_path):
    from fedkws.prepare import prepare_data

    cfg = make_cfg(["partition=dirichlet", "partition.alpha=0.2", "partition.min_partition_size=2"])
    text = prepare_data(cfg, tmp_path)
    assert "12class" in text and "_silence_" in text and "total" in text
    assert "partition 'dirichlet'" in text and "4 clients" in text
    assert (tmp_path / "partition.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "data_summary.txt").read_text().strip() == text.strip()
    # Each split's speakers and examples, counted independently from the cache's arrays.
    from fedkws.recipes.common import load_data
    from fedkws.spec import from_config

    data = load_data(from_config(cfg))
    for code, split in enumerate(("training", "validation", "testing")):
        rows = data.splits == code
        names = set(data.speaker_names[data.speakers[rows]].tolist()) - {"_silence_"}
        assert f"{split} {len(names)} speakers/{int(rows.sum())} examples" in text.splitlines()
