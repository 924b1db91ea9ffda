"""Parallel sweeps on one Ray head: each job's simulation keeps to its share of the actors.

The whole chain in a real Ray run (the sweep callback's head, ``FEDKWS_ACTORS``,
the capped pool Flower reports building) is checked by the golden test's Ray
cell; a real parallel multirun by the slow test at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedkws.fl.simulation import actor_pool_capped
from fedkws.spec import from_config
from fedkws.train import SweepRay, _parallel_jobs
from helpers import cli_env, compose_cfg, tiny_dataset_overrides, train_command


def test_the_cap_is_where_flowers_actor_pool_reads_its_size(monkeypatch):
    # Catches: a cap that Flower's pool never reads (e.g. after Flower moves the lookup).
    from flwr.simulation.ray_transport import ray_actor

    monkeypatch.setattr(ray_actor, "pool_size_from_resources", lambda resources: 4)

    def capacity() -> int:  # what Flower's Ray backend builds its pool with (no Ray needed)
        return ray_actor.BasicActorPool(
            ray_actor.ClientAppActor, {"num_cpus": 1}, {}
        ).actors_capacity

    with actor_pool_capped(1):
        assert capacity() == 1
    with actor_pool_capped(8):
        assert capacity() == 4  # a cap above what fits changes nothing
    with actor_pool_capped(None):
        assert capacity() == 4
    assert capacity() == 4  # restored after the block
    with pytest.raises(RuntimeError), actor_pool_capped(1):
        raise RuntimeError("a failed simulation")
    assert capacity() == 4  # restored after a failure too


@pytest.mark.parametrize(
    ("launcher", "expected"),
    [({}, 1), ({"n_jobs": 3}, 3), ({"n_jobs": 1}, 1), ({"n_jobs": -1}, os.cpu_count() or 1)],
)
def test_parallel_jobs_read_from_the_launcher(launcher, expected):
    assert _parallel_jobs(OmegaConf.create({"hydra": {"launcher": launcher}})) == expected


@pytest.mark.parametrize(
    ("n_jobs", "task", "expected"),
    [(3, ["seed=0,1"], 2), (2, ["seed=0,1,2", "optimizer.lr=0.1,0.2"], 2), (3, ["seed=0"], 1)],
)
def test_parallel_jobs_are_no_more_than_the_sweeps_jobs(n_jobs, task, expected):
    # Catches: a worker that never gets a job (n_jobs above the sweep's jobs), which a
    # terminal's Ctrl-C ended with Python's own handler, breaking joblib's pool.
    from fedkws.train import _fit_parallel_jobs_to_the_sweep

    config = OmegaConf.create({"hydra": {"launcher": {"n_jobs": n_jobs},
                                         "overrides": {"task": task}, "sweeper": {}}})  # fmt: skip
    OmegaConf.set_readonly(config.hydra, True)  # as Hydra hands it to the callbacks
    _fit_parallel_jobs_to_the_sweep(config)
    assert config.hydra.launcher.n_jobs == expected


def test_federation_actors_comes_from_the_environment_unless_set(make_cfg, monkeypatch):
    monkeypatch.setenv("FEDKWS_ACTORS", "3")
    assert from_config(make_cfg([])).federation.actors == 3
    assert from_config(make_cfg(["federation.actors=2"])).federation.actors == 2
    monkeypatch.delenv("FEDKWS_ACTORS")
    assert from_config(make_cfg([])).federation.actors is None


def test_the_sweep_callback_travels_to_launcher_workers_without_its_head():
    import pickle

    sweep = SweepRay()
    sweep.head, sweep.set_actors = object(), True  # a head object cannot be pickled
    copy = pickle.loads(pickle.dumps(sweep))
    assert copy.head is None and copy.set_actors is False


@pytest.mark.parametrize(
    ("federation", "expected"),
    [
        ({"ray_address": "10.0.0.5:6379"}, "on the Ray instance at 10.0.0.5:6379 need"),
        ({"client_resources": {"num_cpus": 1, "num_gpus": 0.5}}, "with GPU clients need"),
    ],
)
def test_parallel_jobs_on_a_share_fedkws_cannot_work_out_need_actors(
    federation, expected, capsys, monkeypatch
):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Catches: parallel jobs on the user's own Ray instance each sizing its pool to all of it
    # (two pools built at once can each hold some actors and wait for the rest).
    base = {"backend": "ray", "sweep_ray": True, "actors": None, **federation}
    config = {"federation": base, "strategy": {"name": "fedavg"},
              "hydra": {"overrides": {"task": []}, "launcher": {"n_jobs": 2}}}  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        SweepRay().on_multirun_start(OmegaConf.create(config))
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: federation.actors=null: 2 jobs")
    assert expected in lines[0]
    assert "RAY_ADDRESS" not in os.environ  # refused before any head was started


def test_parallel_jobs_on_the_users_ray_instance_with_actors_given_attach_to_it(monkeypatch):
    monkeypatch.delenv("FEDKWS_ACTORS", raising=False)
    config = {"federation": {"backend": "ray", "sweep_ray": True, "actors": 1,
                             "ray_address": "10.0.0.5:6379"},
              "strategy": {"name": "fedavg"},
              "hydra": {"overrides": {"task": []}, "launcher": {"n_jobs": 2}}}  # fmt: skip
    sweep = SweepRay()
    sweep.on_multirun_start(OmegaConf.create(config))
    assert sweep.head is None and "FEDKWS_ACTORS" not in os.environ


def test_where_the_clients_run_may_change_on_resume(data_dir):
    # Catches: a sweep resumed against a new Ray head refused as a changed config.
    from fedkws.recipes.common import _differences
    from fedkws.spec import comparable

    def spec(*overrides):
        return from_config(compose_cfg(list(overrides), data_dir))

    before = spec("federation.ray_address=127.0.0.1:6379", "federation.actors=2")
    moved = spec("federation.ray_address=127.0.0.1:7000", "federation.sweep_ray=false")
    assert _differences(comparable(before.resolved), moved.comparable()) == []
    threads = spec("federation.client_resources.num_cpus=2")  # clients' torch threads: compared
    assert _differences(before.comparable(), threads.comparable()) == [
        "federation.client_resources.num_cpus"
    ]


def _scores(results: dict) -> list[dict[str, float]]:
    """Every accuracy and loss, per round and final (times left out)."""
    keep = [{k: v for k, v in r["metrics"].items() if "/acc" in k or "/loss" in k}
            for r in results["rounds"]]  # fmt: skip
    return [*keep, {k: v for k, v in results["summary"].items() if k.startswith("test/")}]


@pytest.mark.slow
def test_a_parallel_sweep_runs_its_jobs_at_once_with_the_sequential_results(
    data_dir, tiny_root, tmp_path
):
    def sweep(folder: Path, *launcher: str) -> dict[str, dict]:
        command = train_command(
            "-m", *launcher, "model=cnn", "model.channels=[4,4]", "partition.num_clients=3",
            "train.rounds=2", "seed=0,1", *tiny_dataset_overrides(data_dir, tiny_root),
            "logger=disabled", "progress=false", f"hydra.sweep.dir={folder}",
        )  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return {p.parent.name: p for p in folder.rglob("seed=*/results.json")}

    sequential = sweep(tmp_path / "sequential")
    parallel = sweep(tmp_path / "parallel", "hydra/launcher=fedkws_parallel")
    assert sorted(parallel) == sorted(sequential) == ["seed=0", "seed=1"]
    for seed, path in parallel.items():
        got, want = (json.loads(p.read_text()) for p in (path, sequential[seed]))
        assert _scores(got) == _scores(want), seed
        # Each job ran with its share of the head (the callback's FEDKWS_ACTORS reached the
        # launcher's worker processes); the sequential jobs with Flower's full pool.
        assert (got["config"]["federation"]["actors"], want["config"]["federation"]["actors"]) == (
            1,
            None,
        )
    # The two jobs were alive at the same time: each started before the other finished.
    spans = [
        (path.parent.joinpath(".hydra", "config.yaml").stat().st_mtime, path.stat().st_mtime)
        for path in parallel.values()
    ]
    (start_a, end_a), (start_b, end_b) = spans
    assert start_a < end_b and start_b < end_a, spans


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_stop_to_a_parallel_sweep_goes_to_its_job_workers_only(tmp_path, signame):
    """The sweep's process passes SIGINT / SIGTERM to its joblib workers, not its other children.

    Catches: ``kill -INT`` of a parallel sweep's process ignored (its jobs ran on to the end).
    """
    import signal
    import sys
    import time

    from fedkws import lifecycle

    signum = getattr(signal, signame)

    def child(name: str, marker: str) -> subprocess.Popen:
        """A child that writes its name to a file on the signal; ``marker`` on its command line."""
        code = (
            "import signal, sys, time\n"
            f"signal.signal(signal.{signame}, lambda *a: (open({str(tmp_path / name)!r}, 'w'),"
            " sys.exit(0)))\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", code, marker], stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"ready\n"
        return proc

    worker = child("worker", "--as-if popen_loky_posix")
    idle = child("idle", "--as-if popen_loky_posix")  # Catches: an idle worker killed (pool broken)
    other = child("other", "--something-else")  # e.g. joblib's resource tracker, the Ray head
    before = signal.getsignal(signum)
    restore = lifecycle.pass_stops_to_children("popen_loky_posix")
    registry = Path(os.environ[lifecycle._FORWARDING_ENV])
    (registry / str(worker.pid)).touch()  # what graceful_interrupts does in a job's worker
    try:
        os.kill(os.getpid(), signum)  # handled in this process: passed on, not fatal
        assert worker.wait(timeout=10) == 0 and (tmp_path / "worker").exists()
        time.sleep(0.3)
        assert other.poll() is None and not (tmp_path / "other").exists()
        assert idle.poll() is None and not (tmp_path / "idle").exists()
    finally:
        restore()
        for proc in (other, idle, worker):
            proc.kill()
    assert signal.getsignal(signum) is before and lifecycle._FORWARDING_ENV not in os.environ
    assert not registry.exists()
    # The sweep's exit status, read once by the command (catches: a later sweep of the same
    # process taken for stopped, its jobs skipped and its report not written).
    assert lifecycle.sweep_stop_code() is None
    assert lifecycle.take_sweep_stop() == 128 + signum and lifecycle.take_sweep_stop() is None
    # With no worker to pass it to, the signal does what it did before: Python's own
    # handler, set here (a suite started in the background inherits SIGINT ignored).
    default = "default_int_handler" if signame == "SIGINT" else "SIG_DFL"
    alone = subprocess.run(
        [sys.executable, "-c", "import os, signal, time\n"
         "from fedkws import lifecycle\n"
         f"signal.signal(signal.{signame}, signal.{default})\n"
         "lifecycle.pass_stops_to_children('popen_loky_posix')\n"
         f"os.kill(os.getpid(), signal.{signame})\ntime.sleep(10)\n"],
        timeout=60, capture_output=True, text=True,
    )  # fmt: skip
    if signame == "SIGTERM":
        assert alone.returncode == -signal.SIGTERM
    else:  # Python's own handler: KeyboardInterrupt
        assert alone.returncode != 0 and "KeyboardInterrupt" in alone.stderr
    # Catches: a signal the process ignored (a script's background job) ending it.
    ignored = subprocess.run(
        [sys.executable, "-c", "import os, signal\n"
         "from fedkws import lifecycle\n"
         f"signal.signal(signal.{signame}, signal.SIG_IGN)\n"
         "lifecycle.pass_stops_to_children('popen_loky_posix')\n"
         f"os.kill(os.getpid(), signal.{signame})\nprint('still here')\n"],
        timeout=60, capture_output=True, text=True,
    )  # fmt: skip
    assert ignored.returncode == 0 and ignored.stdout == "still here\n", ignored.stderr


def test_a_job_starting_after_the_sweep_stopped_stops_at_once(tmp_path, monkeypatch):
    # Catches: a job between its start-of-job check and its registration when the stop
    # came (it was not told, trained its whole job, and the sweep waited for it); and a
    # second signal changing the recorded exit status.
    import signal

    from fedkws import lifecycle

    monkeypatch.setenv(lifecycle._FORWARDING_ENV, str(tmp_path))
    assert lifecycle.mark_sweep_stop(143) and lifecycle.mark_sweep_stop(130)
    assert lifecycle.sweep_stop_code() == 143  # the first signal's
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with lifecycle.graceful_interrupts():
            with pytest.raises(lifecycle.Interrupted):
                lifecycle.raise_if_stopping()
            assert lifecycle.exit_code() == 143
        # Between jobs the worker takes a stop as the sweep's, not as its own end.
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        lifecycle.reset()


def test_a_jobs_second_signal_within_a_second_is_the_same_stop_in_a_parallel_sweep(monkeypatch):
    # Catches: a terminal's Ctrl-C, which reaches a parallel sweep's job directly and again
    # through the sweep's process, taken for a second Ctrl-C (the job aborted, not stopped).
    import signal
    import time

    from fedkws import lifecycle

    monkeypatch.setenv(lifecycle._FORWARDING_ENV, "1")
    with lifecycle.graceful_interrupts():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C, through the sweep
        time.sleep(0.2)  # both handlers have run: no KeyboardInterrupt
        assert lifecycle.exit_code() == 130
        time.sleep(lifecycle._SAME_STOP_S)
        with pytest.raises(KeyboardInterrupt):  # a Ctrl-C of its own later: abort
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        # Catches: that abort's copy through the sweep raising a second KeyboardInterrupt
        # in the middle of the job's clean-up.
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "Ctrl-C"])
def test_a_stop_ends_every_job_of_a_parallel_sweep(data_dir, tiny_root, tmp_path, how):
    """Before, SIGTERM ended the sweep's process at once and its jobs died with Ray's errors,
    and SIGINT to the sweep's process alone was ignored. ``Ctrl-C``: SIGINT to the whole
    process group, as a terminal sends it (each job gets it twice: one stop, not an abort)."""
    import signal
    import time

    signum = signal.SIGTERM if how == "SIGTERM" else signal.SIGINT
    name = "SIGTERM" if how == "SIGTERM" else "Ctrl-C"

    sweep = tmp_path / "sweep"
    command = train_command(
        "-m", "hydra/launcher=fedkws_parallel", "model=cnn", "train.rounds=100", "seed=0,1,2",
        *tiny_dataset_overrides(data_dir, tiny_root), "logger=disabled",
        f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job${hydra.job.num}",
    )  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(), start_new_session=True)  # fmt: skip
    try:
        results = [sweep / f"job{k}" / "results.json" for k in (0, 1)]
        deadline = time.monotonic() + 300
        while not all(p.is_file() and '"round": 1' in p.read_text() for p in results):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        if how == "Ctrl-C":
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # Catches: the third job (queued: two at a time) started once a worker was free.
    assert f"{sweep / 'job2'} not started" in out and not (sweep / "job2").exists(), out[-2000:]
    assert "Sweep " not in out  # no report of a stopped sweep, as a sequential one
    assert proc.returncode == 128 + signum, err[-3000:]
    assert err.count(f"{name}: stopping after this step") == 2, err[-3000:]  # both jobs
    # Catches: the first job to stop ending the sweep (joblib then ended the other mid-step).
    assert err.count(f"error: interrupted ({name}); completed rounds are kept") == 2, err[-3000:]
    assert "KeyboardInterrupt" not in err, err[-3000:]
    assert "Traceback" not in err and "actor died" not in err.lower(), err[-3000:]
    for path in results:  # each job kept its complete rounds
        rounds = [r["round"] for r in json.loads(path.read_text())["rounds"]]
        assert rounds == list(range(1, len(rounds) + 1)) and rounds
