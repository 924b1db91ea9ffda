"""Shared fixtures: one tiny synthetic dataset (and cache) per session, configs copied per test.

Shared settings and helpers live in ``helpers.py``, imported explicitly by the tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig

from helpers import TINY, compose_cfg

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist workers share the cores: each gets its share of torch threads.
    import torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    share = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(share)
    # ... and so do the commands the tests start (fedkws-train, fedkws report): with torch's
    # default of one thread per core they would spin against the other worker's tests.
    os.environ.setdefault("OMP_NUM_THREADS", str(share))

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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data folder (datasets + caches) shared by the whole session.

    Under pytest-xdist the workers share it too (their temp folders have one
    parent): the dataset and the feature caches are built once, under the
    lock files fedkws itself takes when several processes want the same data.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "data"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def tiny_root(data_dir) -> Path:
    """The tiny synthetic dataset, generated once per session (once for all workers)."""
    from fedkws.data.pipeline import ensure_dataset

    return ensure_dataset(data_dir / "tiny", generate=dict(TINY), progress=False)


@pytest.fixture
def make_cfg(data_dir, tiny_root):
    """``make_cfg([...overrides])`` -> a config on the tiny dataset."""

    def make(overrides: list[str] | None = None) -> DictConfig:
        return compose_cfg(list(overrides or []), data_dir, tiny_root)

    return make
