"""A single run starts Ray and its clients' actors while it reads its data.

``simulation.start_early`` begins both in a background thread; the run's
``simulate`` then takes them instead of starting its own. These tests start real
Ray instances, each under a temporary folder of its own, so that what is left
running can be counted.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading

import pytest

from fedkws.errors import FederationError
from fedkws.fl import simulation
from fedkws.fl.server_app import FlowerClients

RESOURCES = {"num_cpus": 1, "num_gpus": 0.0}


@pytest.fixture(autouse=True)
def _nothing_left_running():
    """A test that fails midway leaves no Ray to the tests after it in this worker."""
    yield
    simulation.end_early()
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_tmp():
    """A short temporary root for one Ray instance (its socket paths are limited in length)."""
    folder = tempfile.mkdtemp(prefix="fk-ray-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _ray_processes(folder: str) -> set[int]:
    out = subprocess.run(["pgrep", "-f", f"raylet.*{folder}"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


@pytest.fixture
def builds(monkeypatch):
    """The threads in which Flower's Ray backend built an actor pool itself (``build``)."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    made: list[str] = []
    build = RayBackend.build

    def counted(backend, app_fn) -> None:
        made.append(threading.current_thread().name)
        build(backend, app_fn)

    monkeypatch.setattr(RayBackend, "build", counted)
    return made


def _discover(answered: list[int]):
    def main(grid) -> None:
        clients = FlowerClients(grid, 2, task=None)
        clients.discover()  # every node's ClientApp answers, on an actor of the pool
        answered.extend(sorted(clients.nodes))

    return main


def _ray_is_up() -> bool:
    import ray

    return ray.is_initialized()


def test_the_simulation_takes_the_ray_instance_and_actors_started_early(ray_tmp, builds):
    init_args = {"num_cpus": 2, "_temp_dir": ray_tmp}
    simulation.start_early(RESOURCES, init_args, actors=1)
    early = simulation._EARLY[0]
    answered: list[int] = []
    simulation.simulate(_discover(answered), num_supernodes=2, client_resources=RESOURCES,
                        ray_init_args=init_args, actors=1)  # fmt: skip
    assert answered == [0, 1]
    assert builds == []  # the pool started early served the messages: Flower built none
    assert early.pool.num_actors == 1  # capped by `actors` (2 CPUs would give 2)
    assert not _ray_is_up() and not early.thread.is_alive() and not simulation._EARLY
    assert not _ray_processes(ray_tmp)


def test_what_no_simulation_took_is_ended(ray_tmp):
    """A run that fails while it reads its data, or needs no clients."""
    simulation.start_early(RESOURCES, {"num_cpus": 2, "_temp_dir": ray_tmp})
    thread = simulation._EARLY[0].thread
    simulation._EARLY[0].wait()
    assert _ray_processes(ray_tmp)  # still up after the thread that started it stopped working
    simulation.end_early()
    assert not _ray_is_up() and not thread.is_alive() and not simulation._EARLY
    assert not _ray_processes(ray_tmp)
    simulation.end_early()  # nothing left: nothing to do


def test_a_simulation_asking_for_other_resources_starts_its_own(ray_tmp, builds):
    init_args = {"num_cpus": 2, "_temp_dir": ray_tmp}
    simulation.start_early(RESOURCES, init_args, actors=2)
    answered: list[int] = []
    simulation.simulate(_discover(answered), num_supernodes=2, client_resources=RESOURCES,
                        ray_init_args=init_args, actors=1)  # fmt: skip
    assert answered == [0, 1] and builds == ["MainThread"]  # a pool of its own
    assert not _ray_is_up() and not simulation._EARLY and not _ray_processes(ray_tmp)


def test_a_failed_early_start_fails_the_simulation_with_its_reason(ray_tmp):
    init_args = {"num_cpus": 2, "_temp_dir": ray_tmp, "object_store_memory": 1}
    simulation.start_early(RESOURCES, init_args)
    with pytest.raises(FederationError, match="the Flower simulation failed: .*object store"):
        simulation.simulate(_discover([]), num_supernodes=2, client_resources=RESOURCES,
                            ray_init_args=init_args)  # fmt: skip
    assert not _ray_is_up() and not simulation._EARLY and not _ray_processes(ray_tmp)


def test_a_pool_that_cannot_be_built_fails_the_simulation_and_ends_ray(ray_tmp):
    """Ray started, but no actor fits: Ray is ended before the thread that started it."""
    init_args = {"num_cpus": 2, "_temp_dir": ray_tmp}
    simulation.start_early({"num_cpus": 4, "num_gpus": 0.0}, init_args)
    thread = simulation._EARLY[0].thread
    with pytest.raises(FederationError, match="ActorPool is empty"):
        simulation.simulate(_discover([]), num_supernodes=2,
                            client_resources={"num_cpus": 4, "num_gpus": 0.0},
                            ray_init_args=init_args)  # fmt: skip
    assert not _ray_is_up() and not thread.is_alive() and not _ray_processes(ray_tmp)


def test_a_ray_the_caller_started_is_left_to_the_simulation(ray_tmp):
    import ray

    ray.init(num_cpus=2, _temp_dir=ray_tmp, include_dashboard=False, logging_level="WARNING")
    try:
        simulation.start_early(RESOURCES, {"num_cpus": 2})
        assert not simulation._EARLY  # nothing started: ray.init twice would fail the run
    finally:
        ray.shutdown()


def test_a_run_whose_setup_fails_leaves_no_ray_behind(make_cfg, tmp_path, ray_tmp, monkeypatch):
    from fedkws.errors import ConfigError
    from fedkws.run import run

    started = []
    start_early = simulation.start_early
    monkeypatch.setattr(simulation, "start_early", lambda **kw: started.append(start_early(**kw)))
    cfg = make_cfg(["federation.backend=ray", "partition.num_clients=100000",
                    f"+federation.ray_init_args._temp_dir={ray_tmp}"])  # fmt: skip
    with pytest.raises(ConfigError, match="num_clients=100000"):
        run(cfg, tmp_path / "run")
    assert started == [None]  # Ray was starting while the data were read
    assert not _ray_is_up() and not simulation._EARLY and not _ray_processes(ray_tmp)
