"""Shared fixtures: a tiny synthetic dataset generated once, and Hydra composition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from fedkws import CONF_DIR

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

# Real Speech Commands files, kept beside the checkout (../shared/reference).
REFERENCE = Path(
    os.environ.get(
        "FEDKWS_REFERENCE_DIR",
        Path(__file__).resolve().parents[2] / "shared" / "reference" / "speech_commands_v0.02",
    )
)


@pytest.fixture
def reference() -> Path:
    """The real reference files; CI must have them, a bare clone skips what needs them."""
    if not REFERENCE.is_dir():
        message = f"real Speech Commands reference files not found at {REFERENCE}"
        if os.environ.get("CI"):
            pytest.fail(message + " (set FEDKWS_REFERENCE_DIR)")
        pytest.skip(message + " (set FEDKWS_REFERENCE_DIR)")
    return REFERENCE


# The smallest corpus on which a small ResNet learns something within a few rounds.
TINY = {"speakers": 16, "utterances": 2, "seed": 0, "noise_seconds": 5}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data folder (datasets + caches) shared by the whole session."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def tiny_root(data_dir) -> Path:
    """The tiny synthetic dataset, generated once per session."""
    from fedkws.data.synth import generate

    root = data_dir / "tiny"
    generate(
        root,
        num_speakers=TINY["speakers"],
        utterances_per_word=TINY["utterances"],
        seed=TINY["seed"],
        noise_seconds=TINY["noise_seconds"],
        progress=False,
    )
    return root


def compose_cfg(overrides: list[str], data_dir: Path, tiny_root: Path | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with overrides, shrunk for tests."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["logger=disabled", *overrides])
    with open_dict(cfg):
        cfg.data_dir = str(data_dir)
        cfg.cache_dir = str(data_dir / "cache")
        cfg.progress = False
        if tiny_root is not None and cfg.dataset.get("generate") is not None:
            cfg.dataset.root = str(tiny_root)
            cfg.dataset.generate = dict(TINY)
    return cfg


@pytest.fixture
def make_cfg(data_dir, tiny_root):
    """``make_cfg([...overrides])`` -> a config on the tiny dataset."""

    def make(overrides: list[str] | None = None) -> DictConfig:
        return compose_cfg(list(overrides or []), data_dir, tiny_root)

    return make
