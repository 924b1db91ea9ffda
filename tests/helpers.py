"""Shared test settings: the small federated configuration most federated tests start from.

Kept out of conftest.py so tests import it explicitly.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, open_dict

from fedkws import CONF_DIR

CHANCE = 1 / 12

# The smallest corpus on which a small ResNet learns something within a few rounds.
TINY = {"speakers": 16, "utterances": 2, "seed": 0, "noise_seconds": 5}


@lru_cache(maxsize=None)
def _composed_groups(choices: tuple[str, ...]) -> DictConfig:
    """The config of these config-group choices, composed by Hydra once per test worker."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["logger=disabled", *choices])


def _is_group(override: Override) -> bool:
    """Whether Hydra treats ``override`` as a config-group choice (its defaults list's rule)."""
    return (Path(CONF_DIR) / override.key_or_group).is_dir() and not isinstance(
        override.value(), dict
    )


@lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    """``compose("config", overrides)``, Hydra composing each set of group choices once.

    A composition costs Hydra 60-90 ms and the tests ask for over 300 distinct override
    lists, most of which differ only in values. Hydra composes the defaults list from
    the group choices, then applies the value overrides to the result with
    ``_apply_overrides_to_config``; this does the same, composing the groups once for
    all the value overrides used with them. Anything touching ``hydra.``, and sweeps
    (which Hydra refuses here), are composed whole. A group is a folder of ``conf/``:
    true while fedkws adds no config search path or ConfigStore group of its own.
    """
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    if any(o.key_or_group.startswith("hydra") or o.is_sweep_override() for o in parsed):
        return _composed_groups(overrides)  # Hydra's own checks (a sweep needs --multirun)
    choices = tuple(o.input_line for o in parsed if _is_group(o))
    cfg = copy.deepcopy(_composed_groups(choices))
    ConfigLoaderImpl._apply_overrides_to_config([o for o in parsed if not _is_group(o)], cfg)
    return cfg


def compose_cfg(overrides: list[str], data_dir: Path, tiny_root: Path | None = None) -> DictConfig:
    """A fresh copy of ``conf/config.yaml`` with ``overrides``, shrunk for tests.

    Composition is cached; every call returns its own deep copy, so no test can
    change another test's config. No plots unless ``plots=true`` is among the overrides
    (drawing them is a third of a tiny run's time).
    """
    cfg = copy.deepcopy(_composed(tuple(overrides)))
    with open_dict(cfg):
        cfg.data_dir = str(data_dir)
        cfg.cache_dir = str(data_dir / "cache")
        cfg.progress = False
        cfg.plots = "plots=true" in overrides
        if tiny_root is not None and cfg.dataset.get("generate") is not None:
            cfg.dataset.root = str(tiny_root)
            cfg.dataset.generate = dict(TINY)
    return cfg


# A ResNet-10 of width 16 on two clients of the tiny dataset: learns within 3 rounds.
SMALL_FEDERATION = [
    "model=resnet",
    "model.depth=10",
    "model.width=16",
    "train.rounds=3",
    "train.local_epochs=2",
    "train.batch_size=16",
    "train.eval_batch_size=64",
    "optimizer.lr=3e-3",
    "partition.num_clients=2",
    "partition.min_partition_size=5",
]

# The golden runs: the three presets that carry the project's claims, shrunk.
GOLDEN = {
    "seed_repro": [
        "experiment=seed_repro", "model.width=8", "train.rounds=2", "train.batch_size=32",
    ],
    "bn_ablation_full_dirichlet": [
        "experiment=bn_ablation", "bn=full", "partition=dirichlet", "partition.alpha=0.3",
        "partition.num_clients=3", "model.width=8", "train.rounds=2",
        "bn.recalibrate_every=1",
    ],
    "central": [
        "experiment=seed_repro", "strategy=central", "model.width=8", "train.rounds=2",
        "train.batch_size=32", "bn.eval_modes=[eval,train,recalibrated]",
    ],
}  # fmt: skip


def evaluated_modes(summary: dict) -> set[str]:
    """The eval modes a run's final evaluation recorded on the test split (``test/<mode>/*acc``)."""
    return {k.split("/")[1] for k in summary if k.startswith("test/") and k.endswith("acc")}


def golden_view(result) -> dict:
    """What the golden test pins of a run: per-round accuracies, sampling, what crossed the wire."""
    rounds = []
    for rec in result.rounds:
        rounds.append(
            {
                "round": rec.round,
                "acc": {
                    k: v
                    for k, v in sorted(rec.metrics.items())
                    if k.endswith(("/acc", "/acc_mean")) and not k.startswith("time/")
                },
                "clients": {
                    pid: {
                        k: info[k]
                        for k in ("num-examples", "keys_received", "bn_keys_received")
                        if k in info
                    }
                    for pid, info in sorted(rec.clients.items())
                },
            }
        )
    test = {
        k: v
        for k, v in sorted(result.summary.items())
        if k.startswith("test/") and k.endswith("/acc")
    }
    return {"rounds": rounds, "test": test}


# --------------------------------------------------------------------------- the real CLI


def tiny_dataset_overrides(data_dir, tiny_root) -> list[str]:
    """Command-line overrides that point ``fedkws-train`` at the session's tiny dataset."""
    return [
        f"data_dir={data_dir}",
        f"cache_dir={data_dir / 'cache'}",
        f"dataset.root={tiny_root}",
        f"dataset.generate.speakers={TINY['speakers']}",
        f"dataset.generate.utterances={TINY['utterances']}",
        f"dataset.generate.noise_seconds={TINY['noise_seconds']}",
        "plots=false",  # a third of a tiny run's time; the tests that check plots say plots=true
        # The full 35-word layout and the 10 % held-out rule, as the tiny dataset is generated.
        "dataset.generate.held_out_speakers=null",
        "dataset.generate.unknown_words=null",
    ]


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: W&B off, telemetry off, this checkout's code."""
    import os

    return {**os.environ, "WANDB_MODE": "disabled", "FLWR_TELEMETRY_ENABLED": "0"}


def train_command(*overrides: str) -> list[str]:
    """``fedkws-train`` with ``overrides``, as a user types it."""
    import sys

    return [sys.executable, "-m", "fedkws.train", *overrides]


def error_lines(stderr: str) -> list[str]:
    """The ``error:`` lines of a command's stderr."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def spy_on_figures(monkeypatch) -> list:
    """Record the axes of every figure drawn through :func:`fedkws.plots.figure` (still saved)."""
    from contextlib import contextmanager

    import fedkws.plots as plots

    drawn: list = []
    original = plots.figure

    @contextmanager
    def spy(*args, **kwargs):
        with original(*args, **kwargs) as (fig, ax):
            drawn.append(ax)
            yield fig, ax

    monkeypatch.setattr(plots, "figure", spy)
    return drawn


def markdown_table(text: str) -> dict[str, dict[str, str]]:
    """Rows of the first Markdown table (lines starting with ``|``) in ``text``, keyed by
    their first column."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    return {cells[0]: dict(zip(header, cells, strict=True)) for cells in rows}
