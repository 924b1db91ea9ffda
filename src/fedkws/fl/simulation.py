"""The one place that starts the clients: Flower's simulation (Ray) or the in-process grid.

``flwr.simulation.run_simulation`` is deprecated in favour of ``flwr run``;
the apps in :mod:`fedkws.fl.client_app` and :mod:`fedkws.fl.server_app` are
standard ``ClientApp`` / ``ServerApp`` objects, so moving to ``flwr run``
means replacing only this module.

Flower runs the ServerApp's main function in a thread and only logs what it
raises; :func:`simulate` hands the exception back to the caller instead, so a
failed run ends the process with its reason rather than hanging or exiting 0.

A single run begins Ray and its clients' actors with :func:`start_early` before
it reads its data, so that their start-up (about 4 s on 2 cores) overlaps it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flwr.serverapp import Grid

from fedkws import lifecycle
from fedkws.errors import FederationError
from fedkws.fl import actor_keeper, prompt_engine
from fedkws.fl.ray_head import attach_args, check_reachable

BACKENDS = ("ray", "inprocess")


def _worth_showing(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if "Traceback (most recent call last)" in message:
        return False
    if record.levelno >= logging.ERROR and lifecycle.aborting():
        return False  # messages cut off by the abort the user asked for: not news
    # fedkws-train runs its simulation through run_simulation on purpose (see above); the
    # warning would tell every user to change a call they never made.
    return not (message.startswith("DEPRECATED FEATURE") and "`run_simulation`" in message)


def quiet_flower_logging() -> None:
    """Flower logs through its own handler; stop the same lines reaching Hydra's root handler.

    Flower also logs whole tracebacks when a simulation fails; fedkws reports the
    reason in one ``error:`` line instead, so those records are dropped, and so is
    the deprecation warning of ``run_simulation``, the call this module makes.
    """
    flwr_log = logging.getLogger("flwr")
    flwr_log.propagate = False
    if _worth_showing not in flwr_log.filters:
        flwr_log.addFilter(_worth_showing)


def simulate(
    main: Callable[[Grid], None],
    num_supernodes: int,
    backend: str = "ray",
    client_resources: Mapping[str, Any] | None = None,
    ray_init_args: Mapping[str, Any] | None = None,
    ray_address: str | None = None,
    actors: int | None = None,
    actor_settings: Mapping[str, Any] | None = None,
) -> None:
    """Run ``main(grid)`` against ``num_supernodes`` SuperNodes of fedkws's ClientApp.

    Each SuperNode gets ``node_config["partition-id"]`` in ``0..num_supernodes-1``
    (fewer nodes than clients: the messages name their clients).
    With ``ray_address`` the simulation attaches to that running Ray instance
    (see :mod:`fedkws.fl.ray_head`) instead of starting its own. ``actors``
    caps its pool of Ray actors (see :func:`actor_pool_capped`). ``actor_settings``:
    what the clients set once per actor process (see :mod:`fedkws.fl.actor_keeper`).
    Whatever ``main`` raises is raised here, after the backend has shut down.
    """
    from fedkws.fl.client_app import app as client_app

    if backend == "inprocess":
        from fedkws.fl.inprocess import InProcessGrid

        main(InProcessGrid(client_app, num_supernodes))
        return
    raised: list[BaseException] = []
    started, ended = threading.Event(), threading.Event()

    def guarded(grid: Grid) -> None:
        started.set()
        try:
            main(grid)
        except BaseException as err:  # handed back to the caller below
            raised.append(err)
        finally:
            ended.set()

    init_args = _init_args(ray_init_args, ray_address)
    try:
        with actor_pool_capped(actors):
            _run_ray(guarded, client_app, num_supernodes, client_resources or {}, init_args,
                     actor_settings or {},
                     early_key=_early_key(client_resources or {}, init_args, actors))  # fmt: skip
    except FederationError:
        # The backend died and asked the ServerApp thread to stop: let it end before the
        # caller goes on (a sweep's next job clears the stop request it would wait for).
        if started.is_set():
            ended.wait(timeout=30)
        raise
    if raised:
        raise raised[0]


def _init_args(ray_init_args: Mapping[str, Any] | None, ray_address: str | None) -> dict:
    """The ``ray.init`` arguments of a simulation (checks that ``ray_address`` answers)."""
    init_args = dict(ray_init_args or {})
    if ray_address:
        check_reachable(ray_address)
        return attach_args(init_args, ray_address)
    # Without an address, always a new local instance: a plain ray.init() would attach to
    # whatever `ray start` last recorded on this machine, even a head that has since ended.
    return {"address": "local", **init_args}


@contextmanager
def actor_pool_capped(actors: int | None) -> Iterator[None]:
    """Within this block, a simulation's Ray actor pool has at most ``actors`` actors.

    Flower makes the pool as large as the whole Ray instance allows (its CPUs
    divided by ``client_resources.num_cpus``) and holds those CPUs until the
    simulation ends. Simulations that share one instance at the same time, the
    jobs of a parallel sweep, would each ask for all of it and wait for each
    other's actors; capped, each keeps to its share. ``None``: Flower's size.
    """
    if actors is None:
        yield
        return
    from flwr.simulation.ray_transport import ray_actor

    fits = ray_actor.pool_size_from_resources  # looked up by name when a pool is built
    ray_actor.pool_size_from_resources = lambda resources: min(actors, fits(resources))
    try:
        yield
    finally:
        ray_actor.pool_size_from_resources = fits


def _run_ray(
    main, client_app, num_supernodes, client_resources, ray_init_args, actor_settings,
    early_key: tuple | None = None,
) -> None:  # fmt: skip
    _ray_environment(client_resources)
    from flwr.simulation import run_simulation

    from fedkws.fl.server_app import make_server_app

    quiet_flower_logging()
    keep = actor_keeper.active()
    kept, early = False, None
    try:
        early = _claim_early(early_key)  # what start_early started for this simulation
        if keep:
            actor_keeper.connect(ray_init_args)
        _init_ray(ray_init_args)
        if keep:
            pool_source = actor_keeper.handing_on(ray_init_args, actor_settings)
        else:
            pool_source = _adopted(early.pool if early else None)
        with pool_source, prompt_engine.prompt():
            run_simulation(
                server_app=make_server_app(main),
                client_app=client_app,
                num_supernodes=num_supernodes,
                backend_name="ray",
                backend_config=_backend_config(client_resources, ray_init_args),
            )
        kept = keep
    except lifecycle.Interrupted:
        raise  # SIGTERM while Ray was starting (see _init_ray)
    except Exception as err:
        # The backend died (e.g. Ray could not place the clients) while the ServerApp thread
        # may still wait for nodes: tell it to stop, so the process ends instead of hanging.
        lifecycle.request_stop()
        cause: BaseException = err
        while cause.__cause__ is not None:  # the root reason, not Flower's wrapper
            cause = cause.__cause__
        reason = " ".join(str(cause).split())[:300] or type(cause).__name__
        raise FederationError(f"the Flower simulation failed: {reason}") from err
    finally:
        if not kept:  # Flower's backend already ended Ray, unless the simulation never started
            actor_keeper.end()
        if early is not None:
            early.release()


def _ray_environment(client_resources: Mapping[str, Any]) -> None:
    """What Ray and Flower read from the environment, set before Ray starts."""
    # Telemetry stays off unless the user explicitly turned it on.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # CPU-only clients: keep Ray from touching accelerator variables (and warning about it).
    # With GPUs requested (fractional num_gpus), Ray sets each actor's CUDA_VISIBLE_DEVICES
    # to the GPU it assigned; fedkws never sets that variable itself.
    if not float(client_resources.get("num_gpus") or 0.0) > 0:
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def _backend_config(client_resources: Mapping[str, Any], init_args: Mapping[str, Any]) -> dict:
    """The ``backend_config`` of Flower's Ray backend."""
    backend_config: dict[str, Any] = {
        "client_resources": dict(client_resources),
        "actor": {"tensorflow": 0},  # what run_simulation would add
    }
    if init_args:
        backend_config["init_args"] = dict(init_args)
    return backend_config


def _init_ray(init_args: Mapping[str, Any]) -> None:
    """Start (or attach to) Ray here rather than in Flower's backend, which then skips it.

    The same arguments Flower's simulation would pass (its defaults: Ray logs
    warnings only; the actors see this process's ``sys.path``). Done here so that
    the SIGTERM handler Ray's core worker installs (one that ends the process at
    once) can be replaced by fedkws's, which stops the run after its current step
    like Ctrl-C (see :mod:`fedkws.lifecycle`).
    """
    import ray

    if ray.is_initialized():  # as in Flower's backend: a Ray the caller started is used as is
        lifecycle.reclaim_sigterm()
        return
    try:
        _ray_init(init_args)
    except SystemExit as exit_:
        # While ray.init runs, Ray's own Python SIGTERM handler is in place: sys.exit(15).
        if exit_.code != signal.SIGTERM or not lifecycle.reclaim_sigterm():
            raise
        lifecycle.signalled(signal.SIGTERM)
        raise lifecycle.Interrupted from None
    lifecycle.reclaim_sigterm()


def _ray_init(init_args: Mapping[str, Any]) -> None:
    """``ray.init`` with the arguments Flower's backend would add (see :func:`_init_ray`)."""
    import ray

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    defaults = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **{**defaults, **init_args})


# --------------------------------------------------------------------------- early start


@dataclass
class _Early:
    """Ray and a pool of the clients' actors, started by a background thread.

    The thread stays until Ray has ended (:meth:`release`): Ray's processes are
    killed when the thread that started them ends (``PR_SET_PDEATHSIG``).
    """

    key: tuple
    thread: threading.Thread = field(init=False)
    pool: Any = None
    error: BaseException | None = None
    ray_ended: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)

    def wait(self) -> None:
        """Until Ray and the pool are started, or failed to."""
        self.started.wait()

    def release(self) -> None:
        """Ray has ended: the thread that started it may end too."""
        self.ray_ended.set()
        self.thread.join()


_EARLY: list[_Early] = []  # at most one


def _early_key(
    client_resources: Mapping[str, Any], init_args: Mapping[str, Any], actors: int | None
) -> tuple:
    """What a simulation must ask for to take what :func:`start_early` started."""
    return actor_keeper.key(client_resources), actor_keeper.key(init_args), actors


def start_early(
    client_resources: Mapping[str, Any],
    ray_init_args: Mapping[str, Any] | None = None,
    ray_address: str | None = None,
    actors: int | None = None,
) -> None:
    """Start Ray and the clients' actors in a background thread, while the run sets up.

    Neither depends on the data: Ray's start takes about 2 s on 2 cores, and each
    actor imports torch, Flower and fedkws before its first message (2 s more).
    Begun before the data are read, the next :func:`simulate` on Ray with the same
    ``client_resources``, ``ray_init_args``, ``ray_address`` and ``actors`` finds
    them started (or waits for them); one with other arguments ends them and starts
    its own. A failure to start is raised by that :func:`simulate`, as if it had
    started Ray itself. Call :func:`end_early` when the run ends: it ends whatever
    no simulation took (a run that failed in its set-up, or needed no clients).

    Not while :mod:`fedkws.fl.actor_keeper` hands actors on from one simulation to
    the next (a sequential sweep's jobs on its shared head); nothing either when
    Ray is already initialised in this process (:func:`simulate` uses it as is).
    A SIGTERM between Ray's start and :func:`simulate` still asks fedkws to stop,
    but Ray's core worker, whose handler runs first (fedkws takes it back in
    :func:`_init_ray`), prints its own lines about it too.
    """
    if actor_keeper.active():
        raise RuntimeError("start_early: a sweep's simulations hand their actors on instead")
    end_early()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # the caller's Ray: simulate uses it as is
        return
    _ray_environment(client_resources)
    quiet_flower_logging()
    init_args = _init_args(ray_init_args, ray_address)
    resources = dict(client_resources)
    _silence_thread_warning()
    early = _Early(_early_key(resources, init_args, actors))
    early.thread = threading.Thread(
        target=_start, args=(early, init_args, resources, actors), name="fedkws-ray-start",
        daemon=True,
    )  # fmt: skip
    _EARLY.append(early)
    early.thread.start()


def _start(early: _Early, init_args: dict, resources: dict, actors: int | None) -> None:
    """:func:`start_early`'s thread: Ray and the pool, then wait until Ray has ended."""
    try:
        _ray_init(init_args)
        early.pool = _actor_pool(init_args, resources, actors)
    except BaseException as err:  # raised by the simulation that claims it
        early.error = err
    finally:
        early.started.set()
    early.ray_ended.wait()


def _actor_pool(init_args: dict, resources: dict, actors: int | None):
    """The clients' actors, started as ``RayBackend.build`` starts them, at most ``actors``."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor

    backend = RayBackend(_backend_config(resources, init_args))  # checks the resources
    # actor_pool_capped's cap applied here: that context manager swaps a module function,
    # which this thread must not do.
    pool = BasicActorPool(ClientAppActor, backend.client_resources, backend.actor_kwargs)
    if actors is not None:
        pool.actors_capacity = min(actors, pool.actors_capacity)
    pool.add_actors_to_pool(pool.actors_capacity)  # they start in their own processes
    # RayBackend.build's own record (DEBUG), which shows the pool's size
    logging.getLogger("flwr").debug("Constructed ActorPool with: %i actors", pool.num_actors)
    return pool


def end_early() -> None:
    """End what :func:`start_early` started and no simulation took; nothing if none."""
    if not _EARLY:
        return
    _EARLY[0].wait()  # interrupted (a second Ctrl-C), it stays listed for the next call
    early = _EARLY.pop()
    actor_keeper.end()  # Ray, if it started, and with this driver's connection its actors
    early.release()


def _claim_early(key: tuple | None) -> _Early | None:
    """What :func:`start_early` started for ``key``, once started; None if nothing.

    Raises what stopped it from starting. Started for other arguments: ended here.
    Its caller releases it (:meth:`_Early.release`) once Ray has ended.
    """
    if not _EARLY:
        return None
    if key is None or _EARLY[0].key != key:
        end_early()
        return None
    _EARLY[0].wait()
    if (error := _EARLY[0].error) is not None:
        end_early()  # Ray may have started before the pool failed: ended first
        raise error
    return _EARLY.pop()


@contextmanager
def _adopted(pool) -> Iterator[None]:
    """Within this block, Flower's Ray backend takes ``pool`` instead of building one."""
    if pool is None:
        yield
        return
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    build = RayBackend.build

    def take(backend, app_fn) -> None:
        backend.pool, backend.app_fn = pool, app_fn

    RayBackend.build = take
    try:
        yield
    finally:
        RayBackend.build = build


def _silence_thread_warning() -> None:
    """Ray warns that a ``ray.init`` outside the main thread sets no SIGTERM handler.

    fedkws installs its own once the simulation takes Ray (:func:`_init_ray`).
    """
    worker_log = logging.getLogger("ray._private.worker")
    if _no_sigterm_note not in worker_log.filters:
        worker_log.addFilter(_no_sigterm_note)


def _no_sigterm_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("SIGTERM handler is not set")
