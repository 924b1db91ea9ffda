"""``run(spec, run_dir) -> Result``: one run, centralised or federated, with or without Hydra.

The order is what makes a run safe to start: validate the spec, check the
folder (refuse to overwrite, check a resume), and only then write anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape

from fedkws import lifecycle
from fedkws.core import loops
from fedkws.core.models import count_parameters
from fedkws.errors import FAILED_FILE, RunRefused, write_failure
from fedkws.fileio import folder_in_use
from fedkws.fl import actor_keeper
from fedkws.recipes import common
from fedkws.recipes.central import CentralRecipe
from fedkws.recipes.federated import FederatedRecipe
from fedkws.spec import RunSpec, from_config
from fedkws.tracking import Result


def preflight(spec: RunSpec, run_dir: Path, clients_here: bool = True):
    """Every check before a run starts: folders writable, no overwrite, a valid resume.

    Writes nothing into the run folder. Returns the checkpoint to resume from, if any;
    a resume loads the data here (generated or cached as the run would) to refuse data
    other than the checkpoint's rounds trained on. ``clients_here``: False under
    ``flwr run``, whose SuperNodes may keep their state on other machines.
    """
    common.check_writable(run_dir, "run folder")
    common.check_data_folders(spec)
    loaded = common.check_folder(spec, run_dir, clients_here)
    if loaded is not None and loaded[0].data:
        identity = common.load_data(spec).identity()
        common.refuse_other_data(loaded[0], identity, f"resume: {run_dir}")
    return loaded


def run(
    spec: RunSpec | Any,
    run_dir: Path | str,
    wandb_names: tuple[str, str] | None = None,
    grid: Any = None,
) -> Result:
    """Train one configuration; write results.json, plots, checkpoints; return the Result.

    A run that fails (not one that is stopped) leaves why in its folder's failed.txt,
    which ``fedkws report`` reads; a later attempt into the folder removes it.

    Parameters
    ----------
    spec
        A :class:`~fedkws.spec.RunSpec`, or a composed config (read with
        :func:`~fedkws.spec.from_config`).
    run_dir
        Where the run's files go.
    wandb_names
        W&B group and run name; default: the experiment name and the folder name.
    grid
        A Flower ``Grid`` whose SuperNodes are the clients (a ServerApp under
        ``flwr run``); default: the federated recipe starts its own simulation.
    """
    if not isinstance(spec, RunSpec):
        spec = from_config(spec)
    lifecycle.reset()  # a stop requested for an earlier run does not end this one
    run_dir = Path(run_dir)
    loaded = preflight(spec, run_dir, clients_here=grid is None)
    if spec.resume and loaded is None:  # the same command serves a job's first start and requeue
        common.console.print(
            f"resume=true: no checkpoint in {escape(str(run_dir))} yet: starting at round 1"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    with folder_in_use(run_dir, RunRefused):  # no second run writes here meanwhile
        (run_dir / FAILED_FILE).unlink(missing_ok=True)  # an earlier attempt's, resumed now
        try:
            return _train(spec, run_dir, loaded, wandb_names, grid)
        except Exception as err:
            if _a_failure(err) and not common.finished(run_dir):
                write_failure(run_dir, err)  # why, in the folder, for fedkws report
            raise


def _a_failure(err: Exception) -> bool:
    """Whether ``err`` is the run's failure, to be kept in its folder.

    Not a stop that was asked for (Ctrl-C, SIGTERM), nor a refusal (which leaves the
    folder as it was). A finished run's records stand, whatever failed after them.
    """
    stopped = isinstance(err, lifecycle.Interrupted) or lifecycle.signal_received()
    return not stopped and not isinstance(err, RunRefused)


def _train(spec: RunSpec, run_dir: Path, loaded, wandb_names, grid) -> Result:
    """:func:`run` once its folder is checked and held: set up, train, finish."""
    if spec.strategy.central or spec.federation.backend != "ray" or grid is not None:
        actor_keeper.end_if_kept()  # a sweep's earlier job's idle actors: not needed here
    determinism = loops.set_determinism(spec.train.deterministic)  # before any CUDA operation
    common.console.print(common.describe_devices(spec))
    record = common.Run(spec, run_dir, wandb_names or (spec.name, run_dir.name))
    recipe = (
        CentralRecipe(spec, record)
        if spec.strategy.central
        else FederatedRecipe(spec, record, grid)
    )
    try:
        with record.timed("setup"):  # data, partition, model, W&B
            recipe.setup(run_dir)
            if loaded is not None:
                recipe.restore(loaded[0])
            record.open(loaded, recipe.parts.data)
        return _train_and_finish(spec, recipe, record, run_dir)
    finally:
        loops.set_determinism(determinism)
        if isinstance(recipe, FederatedRecipe):
            from fedkws.fl import simulation

            simulation.end_early()  # Ray, if its setup started it and no simulation took it


def _train_and_finish(spec: RunSpec, recipe, record: common.Run, run_dir: Path) -> Result:
    ok = False
    try:
        common.console.print(_headline(spec, recipe, run_dir))
        recipe.train()
        result = recipe.finish(run_dir)
        if closing := _closing(spec, result, run_dir):
            common.console.print(closing)
        ok = True
    finally:
        record.close(ok)
    return result


def _closing(spec: RunSpec, result, run_dir: Path) -> str:
    """A run's last lines: its final accuracies, or where a stopped run goes on from."""
    summary = result.summary
    if summary.get("complete", True):
        return common.format_final(summary)
    # train.stop_after_round: the last round's numbers are above
    done = summary.get("rounds_completed", result.rounds[-1].round if result.rounds else 0)
    return (
        f"stopped after round {done} of {spec.train.rounds} (train.stop_after_round): "
        f"the same command with resume=true continues it from {escape(str(run_dir))}"
    )


def _headline(spec: RunSpec, recipe, run_dir: Path) -> str:
    if spec.strategy.central:
        how = "centralised"
    else:
        how = f"{spec.strategy.name}, {len(recipe.parts.clients)} clients, bn_sync={spec.bn.sync}"
    rounds = f"{spec.train.rounds} round{'s' if spec.train.rounds != 1 else ''}"
    return (
        f"[bold]{escape(spec.name)}[/bold]: {spec.model.name} "
        f"({count_parameters(recipe.model):,} parameters, norm={spec.model.norm}), {how}, "
        f"{rounds} -> {escape(str(run_dir))}"  # folder names hold brackets: not markup
    )
