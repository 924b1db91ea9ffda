"""Shared by the federation benchmarks: run ``fedkws-train`` and read what it measured.

A run is a real ``fedkws-train`` process (Flower simulation on Ray, results.json);
its per-round records carry ``time/train_s`` and ``time/eval_s``, measured by the
round loop, so the framework's own start-up and finish are the rest of the wall time
(and ``time/recalibration_s``, the exact recalibration's part of ``time/eval_s``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import common


@dataclass
class RunTimes:
    """Wall time of one ``fedkws-train`` invocation and what its rounds recorded."""

    wall_s: float
    train_s: list[float]
    eval_s: list[float]
    round_s: list[float]
    run_dir: Path
    recalibration_s: list[float]  # the part of eval_s spent recalibrating (0: none that round)

    @property
    def rounds_s(self) -> float:
        """Time spent inside rounds (training + evaluation + recording)."""
        return sum(self.round_s)

    @property
    def outside_s(self) -> float:
        """Start-up and finish: the wall time outside the rounds."""
        return self.wall_s - self.rounds_s


def env() -> dict[str, str]:
    """The environment of a benchmark run: no telemetry, no W&B, no leftover Ray address."""
    out = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", WANDB_MODE="disabled")
    out.pop("RAY_ADDRESS", None)
    return out


def train(overrides: list[str], timeout: float, name: str, multirun: bool = False) -> float:
    """Run ``fedkws-train [-m] overrides`` from the repository root; return its wall time."""
    command = [str(common.VENV_BIN / "fedkws-train"), *(["-m"] if multirun else []), *overrides]
    common.progress(name, " ".join(command[1:]))
    start = time.perf_counter()
    done = subprocess.run(
        command, cwd=common.ROOT, env=env(), timeout=timeout, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise common.BenchmarkError(f"fedkws-train failed ({done.returncode}): {' | '.join(tail)}")
    return wall


def read(run_dir: Path, wall_s: float) -> RunTimes:
    """The per-round times recorded in ``run_dir/results.json``."""
    rounds = json.loads((run_dir / "results.json").read_text())["rounds"]
    return RunTimes(
        wall_s=wall_s,
        train_s=[r["metrics"]["time/train_s"] for r in rounds],
        eval_s=[r["metrics"]["time/eval_s"] for r in rounds],
        round_s=[r["seconds"] for r in rounds],
        run_dir=run_dir,
        recalibration_s=[r["metrics"].get("time/recalibration_s", 0.0) for r in rounds],
    )


def single(overrides: list[str], run_dir: Path, timeout: float, name: str) -> RunTimes:
    """One job in ``run_dir`` (which must not exist yet)."""
    wall = train([*overrides, f"hydra.run.dir={run_dir}"], timeout, name)
    return read(run_dir, wall)
