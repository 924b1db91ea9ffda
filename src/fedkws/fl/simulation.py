"""The one place that starts Flower's in-process simulation (Ray backend).

``flwr.simulation.run_simulation`` is deprecated in favour of ``flwr run``;
the apps in :mod:`fedkws.fl.client_app` and :mod:`fedkws.fl.server_app` are
standard ``ClientApp`` / ``ServerApp`` objects, so moving to ``flwr run``
means replacing only this module.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from flwr.serverapp import ServerApp


def quiet_flower_logging() -> None:
    """Flower logs through its own handler; stop the same lines reaching Hydra's root handler."""
    logging.getLogger("flwr").propagate = False


def simulate(
    server_app: ServerApp,
    num_clients: int,
    client_resources: dict[str, Any],
    ray_init_args: dict[str, Any] | None = None,
    verbose: bool = False,
) -> None:
    """Run ``server_app`` against ``num_clients`` virtual SuperNodes of our ClientApp.

    Each SuperNode gets ``node_config["partition-id"]`` in ``0..num_clients-1``.
    """
    # Telemetry stays off unless the user explicitly turned it on.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # CPU-only clients: keep Ray from touching accelerator variables (and warning about it).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    from fedkws.fl.client_app import app as client_app

    quiet_flower_logging()
    backend_config: dict[str, Any] = {"client_resources": dict(client_resources)}
    if ray_init_args:
        backend_config["init_args"] = dict(ray_init_args)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_clients,
        backend_name="ray",
        backend_config=backend_config,
        verbose_logging=verbose,
    )
