"""The shared Ray head of a sweep: started once, attached to by every job, ended afterwards.

A real head, started and ended by the sweep callback around a simulation that
attaches to it, is the Ray cell of ``test_golden.py``; here, when none is started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from omegaconf import OmegaConf

from fedkws.fl.ray_head import LocalRayHead, attach_args
from fedkws.train import SweepRay, _only_centralised_jobs


def test_attaching_drops_what_only_a_new_ray_instance_takes():
    args = {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False, "log_to_driver": True}
    assert attach_args(args, "127.0.0.1:6379") == {
        "log_to_driver": True,
        "address": "127.0.0.1:6379",
    }
    assert args["num_cpus"] == 2  # the caller's dict is left alone


def _sweep_config(strategy="fedavg", task=(), params=None, **federation):
    """What Hydra hands ``on_multirun_start``: the base config (swept choices not applied)."""
    fed = {"backend": "ray", "sweep_ray": True, "ray_address": None,
           "ray_init_args": {"num_cpus": 1}, **federation}  # fmt: skip
    hydra = {"overrides": {"task": list(task)}, "sweeper": {"params": params}}
    return OmegaConf.create({"federation": fed, "strategy": {"name": strategy}, "hydra": hydra})


def test_no_head_when_the_sweep_does_not_need_one(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for cfg in (
        _sweep_config(backend="inprocess"),
        _sweep_config(sweep_ray=False),
        _sweep_config(ray_address="127.0.0.1:1"),  # the user's own Ray instance
        _sweep_config("central", ["strategy=central", "seed=0,1"]),  # centralised jobs only
        # Catches: `fedkws-prepare -m` (data and partitions only) starting a Ray head.
        OmegaConf.merge(_sweep_config(), {"hydra": {"job": {"name": "prepare"}}}),
    ):
        callback = SweepRay()
        callback.on_multirun_start(cfg)
        try:
            assert callback.head is None and "RAY_ADDRESS" not in os.environ
        finally:
            callback.on_multirun_end(cfg)


@pytest.mark.parametrize(
    ("base", "task", "params", "centralised"),
    [
        ("central", ["strategy=central", "optimizer.lr=0.1,0.2"], None, True),
        ("central", ["arm=central"], {"seed": "0,1,2"}, True),
        ("fedavg", ["seed=0,1"], None, False),
        ("fedavg", ["strategy=central,fedbn"], None, False),  # swept: the base is not used
        ("fedavg", ["strategy=central,central"], None, True),
        ("fedavg", ["experiment=main"], {"arm": "central,batch_params_only"}, False),
        ("central", ["strategy=glob(*)"], None, False),  # a choice it cannot list
        ("central", ["strategy=central", "strategy.name=cyclic", "seed=0,1"], None, False),
        ("central", ["arm=central", "strategy.name=central,fedavg"], None, False),
    ],
)  # fmt: skip
def test_a_sweep_of_centralised_jobs_needs_no_ray(base, task, params, centralised):
    assert _only_centralised_jobs(_sweep_config(base, task, params)) is centralised


def test_an_address_where_no_ray_answers_is_one_error_in_seconds(make_cfg, tmp_path, capsys):
    # Catches: ray.init retrying for many minutes (and ignoring SIGTERM) on a wrong address.
    import socket
    import time

    from fedkws.errors import user_errors
    from fedkws.run import run

    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"federation.ray_address=127.0.0.1:{port}"
    cfg = make_cfg(["model=cnn", "model.channels=[4,4]", "train.rounds=1",
                    "partition.num_clients=2", address])  # fmt: skip
    start = time.monotonic()
    with pytest.raises(SystemExit) as exited, user_errors():
        run(cfg, tmp_path / "run")
    assert exited.value.code == 2 and time.monotonic() - start < 60
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert f"no Ray instance answers at 127.0.0.1:{port}" in lines[0]


@pytest.mark.parametrize("address", ["auto", "ray://10.0.0.5:10001"])
def test_addresses_ray_resolves_itself_are_not_probed(address):
    from fedkws.fl.ray_head import check_reachable

    check_reachable(address)  # no error, no connection attempt


def test_a_head_stuck_in_its_shutdown_is_killed_with_its_processes(tmp_path):
    """Stands in for `ray start --block` hanging on SIGTERM: it and its child must still end."""
    child_pid = tmp_path / "child.pid"
    stuck = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"open({str(child_pid)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(300)\n"
    )
    head = LocalRayHead()
    head._process = subprocess.Popen([sys.executable, "-c", stuck], start_new_session=True)
    deadline = time.monotonic() + 30
    while not child_pid.exists() or not child_pid.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = int(child_pid.read_text())
    head.stop(grace=0.5)
    assert head._process is None
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie that init has yet to reap), within a second."""
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state == "Z":
            return False
        time.sleep(0.05)
    return True


@pytest.mark.slow
def test_a_head_whose_owner_is_killed_ends_itself(tmp_path):
    """SIGKILL leaves the sweep's process no chance to stop its head; the head stops itself."""
    script = (
        "import time\n"
        "from fedkws.fl.ray_head import LocalRayHead\n"
        "head = LocalRayHead(num_cpus=1)\n"
        "head.start()\n"
        "print(head._temp_dir, flush=True)\n"
        "time.sleep(300)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    temp = owner.stdout.readline().strip()
    try:
        assert temp and _ray_processes(temp)
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 30
        while _ray_processes(temp) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _ray_processes(temp)
        assert not os.path.exists(temp)
    finally:
        if owner.poll() is None:
            owner.kill()
        for pid in _ray_processes(temp) if temp.startswith(tempfile.gettempdir()) else []:
            os.kill(pid, signal.SIGKILL)  # only left if the test failed


def _ray_processes(temp: str) -> list[int]:
    """The head and the Ray processes it started: every command line that names its folder."""
    out = subprocess.run(["pgrep", "-f", temp], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split() if _alive(int(p))]


def test_a_port_that_accepts_but_is_not_ray_is_refused_in_seconds():
    # Catches: federation.ray_address at a listener that never answers as Ray (the
    # dashboard's port, another server): ray.init retried without end.
    import socket
    import threading
    import time

    from fedkws.errors import FederationError
    from fedkws.fl.ray_head import check_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        accepted = []
        threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(FederationError, match="accepts connections but does not answer as"):
            check_reachable(address, timeout=1.0)
        assert time.monotonic() - started < 10


def test_a_grpc_server_passes_the_check_whatever_the_proxy_settings(monkeypatch):
    # Catches: the probe's channel going through http_proxy (Ray's own channels do not),
    # refusing a working head, the sweep's own 127.0.0.1 one included.
    from concurrent import futures

    import grpc

    from fedkws.fl.ray_head import check_reachable

    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("grpc_proxy", "http://127.0.0.1:9")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        check_reachable(f"127.0.0.1:{port}", timeout=5.0)
    finally:
        server.stop(None)


# The third job, with other client resources, costs another pool's start: slow.
@pytest.mark.parametrize("other_resources", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_sequential_sweeps_jobs_hand_their_actors_on(
    other_resources, make_cfg, tmp_path, monkeypatch
):
    # Catches: every job of a sequential sweep starting its own actors (about 3 s of each
    # job's start on 2 cores), a job's clients computing other numbers in actors that an
    # earlier job of another config (seed, features, partition file) used, a pool reused
    # for a job that asks for other client resources, and actors or the Ray connection
    # outliving the sweep.
    import json

    import ray

    from fedkws import lifecycle
    from fedkws.fl import actor_keeper
    from fedkws.run import run
    from helpers import golden_view

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    overrides = ["model=cnn", "model.channels=[4,4]", "train.rounds=1", "partition.num_clients=2",
                 "bn.eval_modes=[eval]", "federation.backend=ray"]  # fmt: skip
    earlier = make_cfg([*overrides, "seed=1", "features=mfcc"])
    cfg = make_cfg(overrides)
    sweep_cfg = OmegaConf.create({"federation": cfg.federation, "strategy": cfg.strategy,
                                  "hydra": {"overrides": {"task": ["seed=0,1"]}}})  # fmt: skip
    sweep = SweepRay()
    sweep.on_multirun_start(sweep_cfg)
    try:
        assert actor_keeper.active()
        with lifecycle.graceful_interrupts():  # as fedkws-train runs its jobs
            run(earlier, tmp_path / "first")
            later = run(cfg, tmp_path / "second")
            assert ray.is_initialized()  # kept between the jobs
            if other_resources:
                # One actor of all the head's CPUs: not the pool the jobs before made.
                cpus = int(ray.cluster_resources()["CPU"])
                other = [*overrides, f"federation.client_resources.num_cpus={cpus}"]
                run(make_cfg(other), tmp_path / "other")
    finally:
        sweep.on_multirun_end(sweep_cfg)
    assert not actor_keeper.active() and not ray.is_initialized()
    names = ("first", "second", "other") if other_resources else ("first", "second")
    reused = [
        json.loads((tmp_path / name / "results.json").read_text())["summary"]["ray_actors_reused"]
        for name in names
    ]
    # The head has ray_init_args.num_cpus (2 by default): two actors of one CPU each.
    assert reused == [0, 2, 0][: len(names)]
    # The same clients in this process (the same numbers as in fresh actors: test_golden).
    alone = run(make_cfg([*overrides[:-1], "federation.backend=inprocess"]), tmp_path / "alone")
    assert golden_view(later) == golden_view(alone)
