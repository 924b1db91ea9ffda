"""Sweep overhead: a 6-job multirun vs 6 x one job's time in its rounds.

The ratio is a multirun's wall time over the sum of its jobs' time inside their
rounds (training, evaluation, recording: ``seconds`` in results.json), so
everything else a sweep pays (imports, data, Ray, actors, final evaluation, the
report) is the overhead. Measured on two sweeps:

- **The study sweep**, the target's measure: ``experiment=bn_ablation`` as the
  study runs it (its six cells, ResNet-10 width 32, 4 clients, 10 rounds; the
  shared-BatchNorm cells recalibrate exactly at rounds 5 and 10), one job after
  another on the shared Ray head.
- **A short-job sweep**, which shows the fixed cost per job: six seeds of a
  small job (ResNet-10 width 16, 4 IID clients, 3 rounds, one local epoch, eval
  mode), run three times side by side: one job after another attached to one
  shared Ray head (the default, ``federation.sweep_ray=true``; each job hands its
  Ray actors on to the next), each job starting its own Ray, and two jobs at a
  time on the shared head (``hydra/launcher=fedkws_parallel``: one Ray actor per
  job instead of two). The parallel sweep's ratio is over the sequential sweep's
  time in rounds: its own jobs' rounds, which share the cores with the other
  job's, are longer. The jobs' metrics on the shared head must equal those with
  one Ray per job.

Start-up per job is each job's ``setup`` and ``clients_start`` (results.json
``phases_s``). Both sweeps run with W&B off, as every benchmark does.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import common
import fedrun
from common import Ratio

TITLE = "sweep: a 6-job multirun vs its jobs' time in rounds (the study sweep; short jobs)"
NAME = "sweep"
NOTES = ""
JOBS = 6


STUDY = ["experiment=bn_ablation", "logger=disabled", "progress=false"]


def overrides() -> list[str]:
    """The short job's configuration (the sweep adds the seeds)."""
    return ["model=resnet", "model.depth=10", "model.width=16", "partition=iid",
            "partition.num_clients=4", "bn=full", "bn.eval_modes=[eval]", "train.rounds=3",
            "train.local_epochs=1", "logger=disabled", "progress=false"]  # fmt: skip


PHASE_WORDS = {
    "setup": "data, partition, model, W&B",
    "clients_start": "Ray connection, actors' start, discovery",
    "rounds": "the rounds (the ratio's denominator)",
    "record": "after each round: results.json, checkpoint, console",
    "final_queries": "what the final evaluation asks of the clients: the final model's exact "
    "statistics (unless the last round's evaluation computed them), or under FedBN and SiloBN "
    "each client's model on the shared test split",
    "clients_stop": "actors and Ray connection ended (the final evaluation starts meanwhile)",
    "final_evaluation": "validation and test in every final mode, intervals, plots: what is "
    "left of it once the clients stopped",
}


def _phases(results: dict[str, dict]) -> str:
    """Mean seconds per job in each phase (results.json ``phases_s``), as a Markdown table."""
    runs = [r["summary"] for r in results.values()]
    rows = ["| phase | what | s per job (mean over jobs) |", "|---|---|---|"]
    for phase in PHASE_WORDS:
        mean = sum(r["phases_s"].get(phase, 0.0) for r in runs) / len(runs)
        rows.append(f"| {phase} | {PHASE_WORDS[phase]} | {mean:.2f} |")
    walls = sum(r["wall_s"] for r in runs) / len(runs)
    rows.append(f"| (whole job, `wall_s`) | from the job's start to its summary | {walls:.2f} |")
    return "\n".join(rows)


def _sweep(shared: bool, folder: Path, parallel: bool = False) -> tuple[float, dict[str, dict]]:
    """The short-job sweep: its wall time and its jobs' results (:func:`_multirun`)."""
    seeds = ",".join(str(s) for s in range(JOBS))
    launcher = ["hydra/launcher=fedkws_parallel"] if parallel else []
    return _multirun(
        [*overrides(), *launcher, f"seed={seeds}", f"federation.sweep_ray={str(shared).lower()}"],
        folder,
    )


def _multirun(overrides_: list[str], folder: Path) -> tuple[float, dict[str, dict]]:
    """``fedkws-train -m overrides_`` into ``folder``: wall time, each job's results.

    The results.json files are keyed by their job's folder, relative to the sweep's.
    """
    wall = fedrun.train([*overrides_, f"hydra.sweep.dir={folder}"], 3600, NAME, multirun=True)
    results = {
        str(f.parent.relative_to(folder)): json.loads(f.read_text())
        for f in sorted(folder.rglob("results.json"))
    }
    if len(results) != JOBS:
        raise common.BenchmarkError(f"expected {JOBS} runs in {folder}, found {len(results)}")
    return wall, results


def _in_rounds(results: dict[str, dict]) -> float:
    """The jobs' summed time inside their rounds (the ratios' denominator)."""
    return sum(r["seconds"] for result in results.values() for r in result["rounds"])


def _numbers(result: dict) -> list:
    """What must not depend on where the clients ran: every round's metrics but its timings."""
    return [{k: v for k, v in r["metrics"].items() if not k.startswith("time/")}
            for r in result["rounds"]]  # fmt: skip


def _startups(results: dict[str, dict]) -> list[float]:
    """Each job's start-up: its data, model and W&B, then its clients' start (phases_s)."""
    return [r["summary"]["phases_s"]["setup"] + r["summary"]["phases_s"]["clients_start"]
            for r in results.values()]  # fmt: skip


def run(args) -> list[Ratio]:
    """The study sweep, then the short-job sweep three ways, side by side."""
    global NOTES
    with tempfile.TemporaryDirectory(prefix="fedkws-bench-") as tmp:
        study_wall, studied = _multirun(STUDY, Path(tmp) / "study")
        shared_wall, shared = _sweep(True, Path(tmp) / "shared")
        own_wall, own = _sweep(False, Path(tmp) / "own")
        par_wall, parallel = _sweep(True, Path(tmp) / "parallel", parallel=True)
    study_rounds, shared_rounds = _in_rounds(studied), _in_rounds(shared)
    own_rounds, par_rounds = _in_rounds(own), _in_rounds(parallel)
    study_phases, phases = _phases(studied), _phases(shared)
    study_startup = sum(_startups(studied)) / JOBS
    study = study_wall / study_rounds
    ratio = shared_wall / shared_rounds
    outside = (shared_wall - shared_rounds) / JOBS
    own_outside = (own_wall - own_rounds) / JOBS
    par_ratio = par_wall / shared_rounds
    startups, own_startups = _startups(shared), _startups(own)
    startup = sum(startups) / JOBS
    reused = [r["summary"].get("ray_actors_reused", 0) for r in shared.values()]
    # The job folders name the non-swept overrides too (sweep_ray differs): match by seed.
    by_seed = [{Path(k).name: r for k, r in rs.items()} for rs in (shared, own)]
    same = (
        by_seed[0].keys() == by_seed[1].keys()
        and len(by_seed[0]) == JOBS
        and all(_numbers(by_seed[0][k]) == _numbers(by_seed[1][k]) for k in by_seed[0])
    )
    NOTES = (
        f"Study sweep (`fedkws-train -m {' '.join(STUDY)}`): {study_wall:.1f} s wall, "
        f"{study_rounds:.1f} s in rounds, {(study_wall - study_rounds) / JOBS:.1f} s per job "
        f"outside its rounds. Where its jobs' time goes:\n\n{study_phases}\n\n"
        "Short-job sweep (3 rounds of a width-16 ResNet-10, six seeds), "
        f"shared Ray head: {shared_wall:.1f} s wall, {shared_rounds:.1f} s in rounds, Ray "
        f"actors taken over from the job before: {reused}; one Ray per job: {own_wall:.1f} s "
        f"wall, {own_rounds:.1f} s in rounds ({own_wall / own_rounds:.2f}x, {own_outside:.1f} s "
        f"per job outside its rounds, start-up {sum(own_startups) / JOBS:.2f} s per job); two "
        f"jobs at a time on the shared head: {par_wall:.1f} s wall "
        f"({par_wall / shared_wall:.2f}x the time of one at a time), {par_rounds:.1f} s in "
        "its jobs' rounds. Start-up per job on the shared head (setup + clients_start, s): "
        f"{', '.join(f'{s:.2f}' for s in startups)}.\n\nWhere a short job's time goes "
        "(sequential sweep on the shared head; the rest of the multirun's wall time is the "
        f"process's imports, the head's start, Hydra and the sweep report):\n\n{phases}"
    )
    short = f"short jobs: {JOBS} x 3 rounds, {shared_rounds / JOBS:.1f} s in rounds each"
    return [
        Ratio("study sweep: multirun wall / jobs' time in rounds", study, "<= 1.2x",
              study <= 1.2, f"experiment=bn_ablation, {JOBS} jobs of 10 rounds, "
              f"{study_rounds / JOBS:.0f} s in rounds each, shared Ray head"),
        Ratio("study sweep: start-up per job", study_startup, "<= 3 s", study_startup <= 3.0,
              f"setup + clients_start, mean over the {JOBS} jobs (the first starts the "
              "actors)", unit="s"),
        Ratio("short jobs: multirun wall / jobs' time in rounds", ratio,
              "(no target: the fixed cost per job)", True, f"{short}, shared Ray head"),
        Ratio("short jobs: parallel multirun wall / sequential jobs' time in rounds",
              par_ratio, "(no target: two jobs at a time on 2 cores)", True,
              f"{short} one at a time, the parallel sweep's wall over their time in rounds; "
              "2 at a time, shared Ray head"),
        Ratio("short jobs: start-up per job", startup, "<= 3 s", startup <= 3.0,
              f"setup + clients_start, mean over the {JOBS} jobs (the first starts the "
              f"actors); one Ray per job: {sum(own_startups) / JOBS:.2f} s", unit="s"),
        Ratio("short jobs: start-up + finish per job", outside, "(no target)", True,
              f"multirun wall outside the rounds / {JOBS}; one Ray per job: "
              f"{own_outside:.1f} s", unit="s"),
        Ratio("same metrics, shared head (actors handed on) vs one Ray per job",
              float(same), "1 (every round's metrics equal)", same,
              "every job's per-round metrics but timings", unit=""),
    ]  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(common.main_for(__file__))
