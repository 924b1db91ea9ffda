"""Sweep overhead: a 6-job multirun vs 6 x one job's time in its rounds.

Six seeds of one small federated job (ResNet-10 width 16, 4 IID clients, 3
rounds, one local epoch, eval mode) as one ``fedkws-train -m`` multirun. The
ratio is the multirun's wall time over the sum of the jobs' time inside their
rounds (training, evaluation, recording: ``seconds`` in results.json), so
everything else a sweep pays (imports, data, Ray, actors, final evaluation,
the report) is the overhead. Start-up per job is each job's ``setup`` and
``clients_start`` (results.json ``phases_s``). The jobs' metrics on the
shared head must equal those with one Ray per job.
Run three times, side by side: jobs one after another attached to one shared
Ray head (the default, ``federation.sweep_ray=true``; each job hands its Ray
actors on to the next), each job starting its own Ray, and two jobs at a time
on the shared head
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


def _results(folder: Path) -> dict[str, dict]:
    """Each job's results.json by its folder name."""
    return {f.parent.name: json.loads(f.read_text()) for f in sorted(folder.rglob("results.json"))}


def _numbers(result: dict) -> list:
    """What must not depend on where the clients ran: every round's metrics but its timings."""
    return [{k: v for k, v in r["metrics"].items() if not k.startswith("time/")}
            for r in result["rounds"]]  # fmt: skip


def _startups(results: dict[str, dict]) -> list[float]:
    """Each job's start-up: its data, model and W&B, then its clients' start (phases_s)."""
    return [r["summary"]["phases_s"]["setup"] + r["summary"]["phases_s"]["clients_start"]
            for r in results.values()]  # fmt: skip


def run(args) -> list[Ratio]:
    """The three sweeps, side by side."""
    global NOTES
    with tempfile.TemporaryDirectory(prefix="fedkws-bench-") as tmp:
        shared_wall, shared_rounds = _sweep(True, Path(tmp) / "shared")
        phases = _phases(Path(tmp) / "shared")
        shared = _results(Path(tmp) / "shared")
        own_wall, own_rounds = _sweep(False, Path(tmp) / "own")
        own = _results(Path(tmp) / "own")
        par_wall, par_rounds = _sweep(True, Path(tmp) / "parallel", parallel=True)
    ratio = shared_wall / shared_rounds
    outside = (shared_wall - shared_rounds) / JOBS
    own_outside = (own_wall - own_rounds) / JOBS
    par_ratio = par_wall / shared_rounds
    startups, own_startups = _startups(shared), _startups(own)
    startup = sum(startups) / JOBS
    reused = [r["summary"].get("ray_actors_reused", 0) for r in shared.values()]
    same = shared.keys() == own.keys() and all(
        _numbers(shared[k]) == _numbers(own[k]) for k in shared
    )
    NOTES = (
        f"shared Ray head: {shared_wall:.1f} s wall, {shared_rounds:.1f} s in rounds, Ray "
        f"actors taken over from the job before: {reused}; one Ray per job: {own_wall:.1f} s "
        f"wall, {own_rounds:.1f} s in rounds ({own_wall / own_rounds:.2f}x, {own_outside:.1f} s "
        f"per job outside its rounds, start-up {sum(own_startups) / JOBS:.2f} s per job); two "
        f"jobs at a time on the shared head: {par_wall:.1f} s wall "
        f"({shared_wall / par_wall:.2f}x faster than one at a time), {par_rounds:.1f} s in "
        "its jobs' rounds. Start-up per job on the shared head (setup + clients_start, s): "
        f"{', '.join(f'{s:.2f}' for s in startups)}.\n\nWhere a job's time goes (sequential "
        "sweep on the shared head; the rest of the multirun's wall time is the process's "
        f"imports, the head's start, Hydra and the sweep report):\n\n{phases}"
    )
    return [
        Ratio("parallel multirun wall / sequential jobs' time in rounds", par_ratio, "<= 1.2x",
              par_ratio <= 1.2, f"{JOBS} jobs, 2 at a time, shared Ray head"),
        Ratio("multirun wall / jobs' time in rounds", ratio, "<= 1.2x", ratio <= 1.2,
              f"{JOBS} jobs, shared Ray head"),
        Ratio("start-up per job in a sweep", startup, "<= 3 s", startup <= 3.0,
              f"setup + clients_start, mean over the {JOBS} jobs (the first starts the "
              f"actors); one Ray per job: {sum(own_startups) / JOBS:.2f} s", unit="s"),
        Ratio("start-up + finish per job in a sweep", outside, "(no target)", True,
              f"multirun wall outside the rounds / {JOBS}; one Ray per job: "
              f"{own_outside:.1f} s", unit="s"),
        Ratio("same metrics, shared head (actors handed on) vs one Ray per job",
              float(same), "1 (every round's metrics equal)", same,
              "every job's per-round metrics but timings", unit=""),
    ]  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(common.main_for(__file__))
