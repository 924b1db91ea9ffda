"""Ray actors handed on from one simulation to the next in this process: a sweep's jobs.

Every Flower simulation builds a pool of Ray actors and, when it ends, ends them
and its Ray connection. Each new actor is a new process that imports torch,
Flower and fedkws before it answers its first message: about 3 s of a sweep
job's start on 2 cores, and another second to end them. The actors hold
nothing of a run (the ClientApp comes with every message, the data are opened
from paths the messages name, each client's own state lives in the run
folder), so the jobs of a sequential sweep can share them.

While :func:`keeping` is on (:class:`fedkws.train.SweepRay` turns it on for the
jobs that run one after another in the sweep's own process), a simulation that
ends with every actor idle leaves its pool and its Ray connection to the next
one. The next simulation takes them if it asks for the same Ray instance
(``ray.init`` arguments), the same client resources, the same number of
actors and the same process-wide settings of its clients (device,
deterministic algorithms: set once per process, before its first CUDA
operation), and every actor still answers; otherwise the actors are killed
and a fresh pool is built, as without keeping. A job that runs no simulation
on Ray (centralised, in process) ends what is kept first: idle actors would
hold their memory (and GPU) meanwhile, and a connection left open while no
job needs it would end the process if its Ray instance went away (Ray ends a
driver that loses its head for a minute).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fedkws import lifecycle

READY_TIMEOUT_S = 10.0  # an actor that does not answer within this is not reused


@dataclass
class _Kept:
    on: bool = False
    connection: tuple | None = None  # the ray.init arguments of the connection kept
    pool: Any = None  # Flower's BasicActorPool of the last simulation
    resources: tuple | None = None  # its actors' client resources and process-wide settings
    reused: int = 0  # actors the last simulation took from the one before


_KEPT = _Kept()


def key(mapping: Mapping[str, Any] | None) -> tuple:
    """``mapping`` as a comparable tuple (``ray.init`` arguments, client resources)."""
    return tuple(sorted((str(k), repr(v)) for k, v in (mapping or {}).items()))


def active() -> bool:
    """Whether simulations in this process hand their actors on."""
    return _KEPT.on


def reused_actors() -> int:
    """How many actors the last simulation took over from the one before (0: it built its own)."""
    return _KEPT.reused if _KEPT.on else 0


@contextmanager
def keeping() -> Iterator[None]:
    """Within this block, simulations hand their actors and Ray connection on; ended after.

    Between the simulations the actors wait idle, holding their CPUs on the Ray
    instance, and the connection stays open.
    """
    _KEPT.on = True
    try:
        yield
    finally:
        _KEPT.on = False
        end()


def end() -> None:
    """End the Ray connection, and with it any actors kept (Ray ends a driver's actors)."""
    _KEPT.connection, _KEPT.pool, _KEPT.resources, _KEPT.reused = None, None, None, 0
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    lifecycle.reclaim_sigterm()  # Ray's shutdown reset SIGTERM (see lifecycle)


def end_if_kept() -> None:
    """For a job that runs no simulation on Ray: end what an earlier job kept, if anything."""
    if _KEPT.connection is not None:
        end()


def connect(init_args: Mapping[str, Any]) -> None:
    """Before ``ray.init``: end a kept connection made with other arguments than ``init_args``."""
    if _KEPT.connection is not None and _KEPT.connection != key(init_args):
        end()


def _alive(pool) -> bool:
    import ray

    if len(pool.pool) != pool.num_actors:  # an actor still busy with a message of the last run
        return False
    try:
        ray.get([actor.__ray_ready__.remote() for actor in pool.pool], timeout=READY_TIMEOUT_S)
    except Exception:  # a dead actor (RayActorError) or one that does not answer in time
        return False
    return True


def _kill(pool) -> None:
    """End a pool's actors now: a ``terminate`` message would wait behind their work."""
    import ray

    for actor in [*pool.pool, *pool._future_to_actor.values()]:  # idle, and still busy
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone, or its connection is: nothing left to end
            pass


def _take(resources: tuple):
    """The kept pool, if it was made for ``resources`` and has the actors a new pool would."""
    from flwr.simulation.ray_transport import ray_actor

    pool, _KEPT.pool = _KEPT.pool, None
    if pool is None:
        return None
    fits = (
        _KEPT.resources == resources
        and pool.num_actors == ray_actor.pool_size_from_resources(dict(pool.client_resources))
        and _alive(pool)
    )
    if fits:
        return pool
    _kill(pool)
    return None


@contextmanager
def handing_on(init_args: Mapping[str, Any], settings: Mapping[str, Any]) -> Iterator[None]:
    """Around one simulation (``ray.init`` done): reuse a kept pool, keep this one's at its end.

    ``settings``: what its clients set once per process (see the module docstring).
    Flower's Ray backend builds its pool in ``build`` and ends it, and Ray, in
    ``terminate``; within this block both consult what is kept instead. The
    connection is marked kept only when the simulation returns: one that raises
    leaves the caller to end it, as it would without keeping.
    """
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    build, terminate = RayBackend.build, RayBackend.terminate
    _KEPT.reused = 0

    def made_for(backend) -> tuple:
        return key(backend.client_resources) + (("settings", key(settings)),)

    def build_or_take(backend, app_fn) -> None:
        pool = _take(made_for(backend))
        if pool is None:
            build(backend, app_fn)
            return
        backend.pool, backend.app_fn = pool, app_fn
        _KEPT.reused = pool.num_actors

    def keep(backend) -> None:
        # The backend keeps its pool too: after an abort, its workers may still be
        # handing actors back to it.
        _KEPT.pool, _KEPT.resources = backend.pool, made_for(backend)

    RayBackend.build, RayBackend.terminate = build_or_take, keep
    try:
        yield
    finally:
        RayBackend.build, RayBackend.terminate = build, terminate
    _KEPT.connection = key(init_args)
