"""The ServerApp that ``flwr run`` starts: fedkws's configuration, read from the run config.

``pyproject.toml`` names this module's ``app`` and fedkws's ClientApp
(:mod:`fedkws.fl.client_app`) in ``[tool.flwr.app.components]``. The run
config (``[tool.flwr.app.config]``, changed per run with ``flwr run . -c
'key=value'``) carries the fedkws configuration:

``experiment``  a preset of ``conf/experiment/`` (empty: none).
``overrides``   Hydra overrides, space-separated (shell quoting), composed against
                ``conf/`` (:data:`fedkws.CONF_DIR`) exactly as ``fedkws-train`` composes
                its command line.
``run-dir``     where the run's files go; empty: ``outputs/<name>/flwr/<date>/<time>``.

Relative paths (``run-dir``, ``data_dir``, ``cache_dir``, ``dataset.root``) are
taken from the project folder (the one holding ``conf/``), whichever folder the
SuperLink was started in, and every path the clients are sent is absolute.

The run is :func:`fedkws.run.run` with the ``Grid`` Flower hands over instead of a
simulation that fedkws starts itself: results.json, checkpoints, plots and W&B
come from here, the server side, as under ``fedkws-train``; the SuperNodes only
run the ClientApp, which reads its partition from ``node_config["partition-id"]``
(or, with fewer nodes than clients under ``federation.supernodes``, from each
message). Which runtime executes the clients (Flower's simulation, or
SuperNodes) and its resources are Flower's federation settings, so
``federation.*`` keys of the fedkws config other than ``num_cpus`` (the clients'
torch threads) and ``supernodes`` do not apply.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedkws import CONF_DIR
from fedkws.errors import ConfigError, hydra_error_line, print_error

PROJECT_DIR = Path(CONF_DIR).parent
PATH_KEYS = ("data_dir", "cache_dir", "dataset.root")  # in this order: later ones may derive

app = ServerApp()


def _user_errors() -> tuple[type[BaseException], ...]:
    from fedkws.errors import _user_error_types

    return _user_error_types()


def hydra_overrides(run_config: Mapping[str, Any]) -> list[str]:
    """``experiment=<preset>`` (if one is named), then the ``overrides`` string, split."""
    try:
        overrides = shlex.split(str(run_config.get("overrides", "")))
    except ValueError as err:
        raise ConfigError(f"run config overrides: {err}") from None
    experiment = str(run_config.get("experiment", "")).strip()
    return [f"experiment={experiment}", *overrides] if experiment else overrides


def compose_config(run_config: Mapping[str, Any]):
    """The fedkws config of a run config, with its paths made absolute."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=hydra_overrides(run_config))
    except HydraException as err:  # in the words fedkws-train uses for the same mistake
        raise ConfigError(f"run config experiment/overrides: {hydra_error_line(err)}") from None
    for key in PATH_KEYS:  # existing keys: set through the node that holds them
        *parents, leaf = key.split(".")
        node = cfg
        for parent in parents:
            node = node[parent]
        value = node.get(leaf)
        if value and not Path(str(value)).is_absolute():
            node[leaf] = str(PROJECT_DIR / str(value))
    return cfg


def run_folder(run_config: Mapping[str, Any], name: str, now: float | None = None) -> Path:
    """``run-dir``, or ``outputs/<name>/flwr/<date>/<time>``; relative to the project folder."""
    given = str(run_config.get("run-dir", "")).strip()
    stamp = time.localtime(now)
    default = Path("outputs", name, "flwr", time.strftime("%Y-%m-%d", stamp),
                   time.strftime("%H-%M-%S", stamp))  # fmt: skip
    path = Path(given).expanduser() if given else default
    return path if path.is_absolute() else PROJECT_DIR / path


def _keep_config(resolved: dict, run_config: Mapping[str, Any], run_dir: Path) -> None:
    """``.hydra/config.yaml`` (resolved) and ``overrides.yaml``, as ``fedkws-train`` keeps them."""
    import yaml

    from fedkws.fileio import write_text

    folder = run_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    write_text(folder / "overrides.yaml", yaml.safe_dump(hydra_overrides(run_config)))


class _NoUserErrorTraceback(logging.Filter):
    """Flower logs what a ServerApp raises with its traceback; a user error is one line."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102 - logging API
        err = record.exc_info[1] if record.exc_info else None
        while err is not None and not isinstance(err, _user_errors()):
            err = err.__cause__ or err.__context__
        if err is not None:
            record.exc_info, record.exc_text = None, None
        return True


def serve(grid: Grid, run_config: Mapping[str, Any]) -> Path:
    """Compose, check and run the configuration against ``grid``; return the run folder."""
    from fedkws.errors import RunRefused
    from fedkws.fileio import folder_in_use
    from fedkws.run import preflight, run
    from fedkws.spec import from_config

    cfg = compose_config(run_config)
    spec = from_config(cfg)
    if spec.strategy.central:
        raise ConfigError(
            "strategy=central: the centralised baseline has no clients to run under "
            "`flwr run`; run it with fedkws-train"
        )
    run_dir = run_folder(run_config, spec.name)
    preflight(spec, run_dir, clients_here=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    with folder_in_use(run_dir, RunRefused):  # not another run's folder meanwhile
        _keep_config(spec.resolved, run_config, run_dir)
        run(spec, run_dir, grid=grid)  # a failure's failed.txt: written by run()
    return run_dir


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the fedkws configuration of ``context.run_config`` with ``grid``'s SuperNodes.

    A user error (config, data, federation) is printed as ``error:`` lines and
    raised, so Flower marks the run failed, without a traceback in its log.
    """
    flwr_log = logging.getLogger("flwr")
    if not any(isinstance(f, _NoUserErrorTraceback) for f in flwr_log.filters):
        flwr_log.addFilter(_NoUserErrorTraceback())
    try:
        run_dir = serve(grid, context.run_config)
    except _user_errors() as err:
        print_error(err)
        raise
    print(f"fedkws: run {context.run_id} finished -> {run_dir}")
