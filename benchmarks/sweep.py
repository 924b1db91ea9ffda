"""Sweep overhead: a 6-job multirun vs 6 x one job's time in its rounds.

Six seeds of one small federated job (ResNet-10 width 16, 4 IID clients, 3
rounds, one local epoch, eval mode) as one ``fedkws-train -m`` multirun. The
ratio is the multirun's wall time over the sum of the jobs' time inside their
rounds (training, evaluation, recording: ``seconds`` in results.json), so
everything else a sweep pays (imports, data, Ray, actors, final evaluation,
the report) is the overhead. Start-up per job is that overhead divided by six.
Run three times, side by side: jobs one after another attached to one shared
Ray head (the default, ``federation.sweep_ray=true``), each job starting its
own Ray, and two jobs at a time on the shared head
(``hydra/launcher=fedkws_parallel``: one Ray actor per job instead of two).
The parallel sweep's ratio is over the sequential sweep's time in rounds: its
own jobs' rounds, which share the cores with the other job's, are longer.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import common
import fedrun
from common import Ratio

TITLE = "sweep: a 6-job multirun vs 6 x one job's time in rounds"
NAME = "sweep"
NOTES = ""
JOBS = 6


def overrides() -> list[str]:
    """One job's configuration (the sweep adds the seeds)."""
    return ["model=resnet", "model.depth=10", "model.width=16", "partition=iid",
            "partition.num_clients=4", "bn=full", "bn.eval_modes=[eval]", "train.rounds=3",
            "train.local_epochs=1", "logger=disabled", "progress=false"]  # fmt: skip


PHASE_WORDS = {
    "setup": "data, partition, model, W&B",
    "clients_start": "Ray connection, actors' start, discovery",
    "rounds": "the rounds (the ratio's denominator)",
    "record": "after each round: results.json, checkpoint, console",
    "final_queries": "the final model's exact statistics from the clients",
    "clients_stop": "actors and Ray connection ended (the final evaluation starts meanwhile)",
    "final_evaluation": "validation and test in every final mode, intervals, plots: what is "
    "left of it once the clients stopped",
}


def _phases(folder: Path) -> str:
    """Mean seconds per job in each phase (results.json ``phases_s``), as a Markdown table."""
    runs = [json.loads(f.read_text())["summary"] for f in sorted(folder.rglob("results.json"))]
    rows = ["| phase | what | s per job (mean over jobs) |", "|---|---|---|"]
    for phase in PHASE_WORDS:
        mean = sum(r["phases_s"].get(phase, 0.0) for r in runs) / len(runs)
        rows.append(f"| {phase} | {PHASE_WORDS[phase]} | {mean:.2f} |")
    walls = sum(r["wall_s"] for r in runs) / len(runs)
    rows.append(f"| (whole job, `wall_s`) | from the job's start to its summary | {walls:.2f} |")
    return "\n".join(rows)


def _sweep(shared: bool, folder: Path, parallel: bool = False) -> tuple[float, float]:
    seeds = ",".join(str(s) for s in range(JOBS))
    launcher = ["hydra/launcher=fedkws_parallel"] if parallel else []
    wall = fedrun.train(
        [*overrides(), *launcher, f"seed={seeds}", f"federation.sweep_ray={str(shared).lower()}",
         f"hydra.sweep.dir={folder}"], 3600, NAME, multirun=True,
    )  # fmt: skip
    runs = sorted(folder.rglob("results.json"))
    if len(runs) != JOBS:
        raise RuntimeError(f"expected {JOBS} runs in {folder}, found {len(runs)}")
    in_rounds = sum(r["seconds"] for f in runs for r in json.loads(f.read_text())["rounds"])
    return wall, in_rounds


def run(args) -> list[Ratio]:
    """Both sweeps, side by side."""
    global NOTES
    with tempfile.TemporaryDirectory(prefix="fedkws-bench-") as tmp:
        shared_wall, shared_rounds = _sweep(True, Path(tmp) / "shared")
        phases = _phases(Path(tmp) / "shared")
        own_wall, own_rounds = _sweep(False, Path(tmp) / "own")
        par_wall, par_rounds = _sweep(True, Path(tmp) / "parallel", parallel=True)
    ratio = shared_wall / shared_rounds
    startup = (shared_wall - shared_rounds) / JOBS
    own_startup = (own_wall - own_rounds) / JOBS
    par_ratio = par_wall / shared_rounds
    NOTES = (
        f"shared Ray head: {shared_wall:.1f} s wall, {shared_rounds:.1f} s in rounds; "
        f"one Ray per job: {own_wall:.1f} s wall, {own_rounds:.1f} s in rounds "
        f"({own_wall / own_rounds:.2f}x, {own_startup:.1f} s per job outside its rounds); "
        f"two jobs at a time on the shared head: {par_wall:.1f} s wall "
        f"({shared_wall / par_wall:.2f}x faster than one at a time), {par_rounds:.1f} s in "
        "its jobs' rounds.\n\nWhere a job's time goes (sequential sweep on the shared head; "
        "the rest of the multirun's wall time is the process's imports, the head's start, "
        f"Hydra and the sweep report):\n\n{phases}"
    )
    return [
        Ratio("parallel multirun wall / sequential jobs' time in rounds", par_ratio, "<= 1.2x",
              par_ratio <= 1.2, f"{JOBS} jobs, 2 at a time, shared Ray head"),
        Ratio("multirun wall / jobs' time in rounds", ratio, "<= 1.2x", ratio <= 1.2,
              f"{JOBS} jobs, shared Ray head"),
        Ratio("start-up + finish per job in a sweep", startup, "<= 3 s", startup <= 3.0,
              f"one Ray per job: {own_startup:.1f} s", unit="s"),
    ]  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(common.main_for(__file__))
