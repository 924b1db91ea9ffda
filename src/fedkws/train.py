"""Hydra entry point: ``fedkws-train [overrides]``; see ``conf/config.yaml``.

The config is read into a :class:`~fedkws.spec.RunSpec` once, here. Hydra is
told not to write into the run folder (``hydra.output_subdir: null``, job
logging to the console only); its files (``.hydra/``) are written by
:func:`_keep_hydra_files` once the run is known to start, so a refused run
leaves the folder exactly as it was.
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fedkws import CONF_DIR
from fedkws.errors import hydra_mistakes_in_one_line, print_error, user_errors

if TYPE_CHECKING:
    from fedkws.spec import RunSpec

_STARTED = time.time()


def _hydra_context(name: str, seed: str) -> tuple[Path, tuple[str, str]]:
    """The run folder, and the W&B group (the sweep) and run name (the override dirname)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        label = hc.job.override_dirname or name
    except OmegaConfBaseException:  # an override's `${nope}`: said by the config's own check
        label = name
    if hc.mode == RunMode.MULTIRUN:
        return run_dir, (f"{name}/{Path(hc.sweep.dir).name}", f"{label}/seed={seed}")
    return run_dir, (name, label)


def _keep_hydra_files(cfg: DictConfig, run_dir: Path) -> None:
    """What Hydra would have written to ``.hydra/``: the config, the overrides, Hydra's own."""
    from hydra.core.hydra_config import HydraConfig

    from fedkws.fileio import write_text

    folder = run_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    hc = HydraConfig.get()
    write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text(folder / "overrides.yaml", OmegaConf.to_yaml(list(hc.overrides.task)))
    write_text(folder / "hydra.yaml", OmegaConf.to_yaml({"hydra": hc}))


# The highest folder of hydra.run.dir that did not exist before Hydra made the run folder,
# recorded by FolderGuard. In the environment, not a module global: under `python -m
# fedkws.train` Hydra's callback lives in a second copy of this module.
_NEW_FOLDERS_ENV = "FEDKWS_NEW_FOLDERS_FROM"
# A copy of the multirun.yaml a sweep's folder held before Hydra wrote its own (FolderGuard),
# put back when the sweep is refused (``_job``): a refused sweep changes nothing on disk.
_PRIOR_MULTIRUN_ENV = "FEDKWS_PRIOR_MULTIRUN"


def _first_missing(folder: Path) -> Path | None:
    """The highest ancestor of ``folder`` (or itself) that does not exist yet."""
    missing = None
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def _tidy_refused(run_dir: Path) -> None:
    """Remove the folders Hydra created for this refused run, if they are empty and new.

    The run folder itself, and each folder above it up to the first one that did not
    exist before (``outputs/<name>/<date>`` of a first refused run).
    """
    try:
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            if run_dir.stat().st_ctime >= _STARTED - 1:
                run_dir.rmdir()
        top = Path(os.environ[_NEW_FOLDERS_ENV]) if os.environ.get(_NEW_FOLDERS_ENV) else None
        folder = run_dir.resolve().parent
        while top is not None and top in (folder, *folder.parents) and folder.is_dir():
            if any(folder.iterdir()):
                break
            folder.rmdir()
            if folder == top:
                break
            folder = folder.parent
    except OSError:
        pass


def _keep_prior_multirun(sweep_dir: Path) -> None:
    """Copy the sweep folder's multirun.yaml (Hydra rewrites it next) aside, for a refusal."""
    import atexit
    import tempfile

    prior = sweep_dir / "multirun.yaml"
    if not prior.is_file():
        os.environ[_PRIOR_MULTIRUN_ENV] = ""
        return
    handle, copy = tempfile.mkstemp(prefix="fedkws-multirun-", suffix=".yaml")
    with os.fdopen(handle, "wb") as out:
        out.write(prior.read_bytes())
    os.environ[_PRIOR_MULTIRUN_ENV] = copy
    atexit.register(lambda: Path(copy).unlink(missing_ok=True))


def _restore_prior_multirun(sweep_dir: Path) -> None:
    """A refused sweep: its folder's multirun.yaml as it was before (none if it had none)."""
    copy = os.environ.get(_PRIOR_MULTIRUN_ENV)
    if copy is None:
        return
    target = sweep_dir / "multirun.yaml"
    try:
        if copy:
            shutil.copyfile(copy, target)
        else:
            target.unlink(missing_ok=True)
    except OSError:
        pass


class FolderGuard(Callback):
    """Hydra creates the run or sweep folder before fedkws runs: check it can, first."""

    def _check(self, folder: str, key: str) -> None:
        from fedkws.errors import ConfigError
        from fedkws.recipes.common import check_writable

        with user_errors():
            if not folder.strip():  # an unset shell variable: Hydra would use the current folder
                raise ConfigError(f"{key}='': must name a folder (an unset shell variable?)")
            try:
                check_writable(Path(folder), key)
            except ConfigError as err:
                raise ConfigError(str(err)) from None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:  # noqa: D102 - Hydra hook
        missing = _first_missing(Path(str(config.hydra.run.dir)).resolve())
        os.environ[_NEW_FOLDERS_ENV] = "" if missing is None else str(missing)
        self._check(str(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:  # noqa: D102
        self._check(str(config.hydra.sweep.dir), "hydra.sweep.dir")
        _keep_prior_multirun(Path(str(config.hydra.sweep.dir)))
        if (config.hydra.get("launcher") or {}).get("n_jobs") == 0:
            with user_errors():
                from fedkws.errors import ConfigError

                raise ConfigError(
                    "hydra.launcher.n_jobs=0: must be the number of jobs at once (>= 1), "
                    "or negative as in joblib (-1: one per core)"
                )
        with user_errors():
            _refuse_shared_job_folders(config)
        check_sweep(config, kwargs.get("config_name") or "config")
        _fit_parallel_jobs_to_the_sweep(config)
        if _on_slurm(config) and not (shutil.which("sbatch") and shutil.which("srun")):
            with user_errors():
                from fedkws.errors import ConfigError

                raise ConfigError(
                    "hydra/launcher=fedkws_slurm submits every job to SLURM, and this "
                    "machine has no SLURM (no sbatch, srun): run the sweep from a login node"
                )


def _on_slurm(config: DictConfig) -> bool:
    """Whether the multirun's launcher submits its jobs to SLURM (hydra-submitit-launcher)."""
    target = str((config.hydra.get("launcher") or {}).get("_target_", ""))
    return "submitit" in target and "Slurm" in target


def _sweep_override_texts(config: DictConfig) -> list[str]:
    """A multirun's overrides in the order Hydra's basic sweeper reads them.

    The preset's ``hydra.sweeper.params`` first, then the command line: a later
    override of a key wins.
    """
    params = config.hydra.get("sweeper", {}).get("params") or {}
    texts = [f"{key}={value}" for key, value in params.items()]
    return texts + [str(o) for o in config.hydra.overrides.task]


# A sweep of at most this many jobs has every job validated before it starts (about 0.1 s
# a job); a larger one, a sample that uses every value (see sweep_samples).
CHECK_EVERY_JOB_UP_TO = 64


def sweep_samples(config: DictConfig) -> list[list[str]]:
    """The override lists of the jobs to validate before a sweep starts.

    Every job of a sweep of at most :data:`CHECK_EVERY_JOB_UP_TO` jobs, so that
    values that only conflict together (``bn=local`` with ``norm=group``) are found
    too. A larger sweep: lists that together use every value of every swept key
    at least once (the first takes each sweep's first value; each further one
    changes one swept key to another of its values), which finds a key, preset
    or value that would fail every job with it. With a sweep that cannot be listed
    (an optimising sweeper's interval) there are none: each job checks itself.
    """
    choices = swept_choices(config)
    if choices is None:
        return []
    if math.prod(len(values) for values in choices) <= CHECK_EVERY_JOB_UP_TO:
        return [list(job) for job in itertools.product(*choices)]
    first = [values[0] for values in choices]
    samples = [first]
    for i, values in enumerate(choices):
        samples += [first[:i] + [value] + first[i + 1 :] for value in values[1:]]
    return samples


def swept_choices(config: DictConfig) -> list[list[str]] | None:
    """Each overridden key's ``key=value`` choices, as Hydra's basic sweeper crosses them.

    None for a sweep that cannot be listed (an optimising sweeper's interval).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    texts = _sweep_override_texts(config)
    by_key: dict[str, list[str]] = {}  # as Hydra's basic sweeper: a later override of a key wins
    try:
        for o in OverridesParser.create().parse_overrides(texts):
            key = o.get_key_element()
            by_key[key] = (
                [f"{key}={v}" for v in o.sweep_string_iterator()]
                if o.is_sweep_override() else [f"{key}={o.get_value_element_as_str()}"]
            )  # fmt: skip
    except HydraException:
        return None
    choices = list(by_key.values())
    return None if any(not values for values in choices) else choices


# fedkws's own hydra.sweep.subdir (conf/config.yaml), whose job folders job_folders names.
JOB_SUBDIR = "./${hydra.job.override_dirname}/seed=${seed}"


def job_folders(config: DictConfig, limit: int = 10_000) -> list[tuple[list[str], str]] | None:
    """Each job of a multirun: its overrides and its folder under the sweep, as Hydra names it.

    The swept choices crossed (:func:`swept_choices`); a folder is the job's override
    dirname (the overrides sorted, ``hydra.job.config.override_dirname``'s excluded keys
    left out) and its ``seed=N``. None for another ``hydra.sweep.subdir``, a sweep that
    cannot be listed, or one of more than ``limit`` jobs.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra = OmegaConf.to_container(config.hydra, resolve=False)
    choices = swept_choices(config) if hydra["sweep"]["subdir"] == JOB_SUBDIR else None
    if choices is None or math.prod(len(c) for c in choices) > limit:
        return None
    naming = hydra["job"]["config"]["override_dirname"]
    parser, jobs = OverridesParser.create(), []
    for job in itertools.product(*choices):
        overrides = parser.parse_overrides(list(job))
        kept = sorted(o.input_line for o in overrides
                      if o.key_or_group not in naming["exclude_keys"])  # fmt: skip
        dirname = re.sub("=", naming["kv_sep"], naming["item_sep"].join(kept))
        seed = next((o.value() for o in overrides if o.key_or_group == "seed"), None)
        seed = config.get("seed", 0) if seed is None else seed
        jobs.append((list(job), os.path.normpath(f"./{dirname}/seed={seed}")))
    return jobs


def _refuse_shared_job_folders(config: DictConfig) -> None:
    """Two jobs of one sweep in one folder (they differ only in keys names leave out).

    A sweep over ``experiment`` or ``name`` is not checked here: each job's folder then
    depends on its own presets (seed, name in ``hydra.sweep.dir``); the folder lock
    refuses a job whose folder is in use.
    """
    from fedkws.errors import ConfigError

    swept = {c[0].split("=", 1)[0] for c in swept_choices(config) or [] if len(c) > 1}
    if swept & {"experiment", "name"}:  # each job's own presets, seed, maybe its own sweep dir
        return
    first: dict[str, list[str]] = {}
    for overrides, folder in job_folders(config) or []:
        if folder in first:
            differ = [o for o in overrides if o not in first[folder]]
            raise ConfigError(
                f"the sweep's jobs {' '.join(first[folder])} and {' '.join(overrides)} would "
                f"both run in {folder}: {', '.join(differ)} is left out of job folder names "
                "(hydra.job.config.override_dirname.exclude_keys); sweep it in a command of "
                "its own (its own hydra.sweep.dir)"
            )
        first[folder] = overrides


def _fit_parallel_jobs_to_the_sweep(config: DictConfig) -> None:
    """``hydra.launcher.n_jobs`` no larger than the sweep's jobs.

    A worker that never gets a job keeps Python's own SIGINT handler: a terminal's
    Ctrl-C would end it and break joblib's pool, the running jobs with it.
    """
    from omegaconf import open_dict, read_write

    launcher = config.hydra.get("launcher") or {}
    choices = swept_choices(config)
    if "n_jobs" not in launcher or choices is None:
        return
    jobs = math.prod(len(values) for values in choices)
    if 1 <= jobs < _parallel_jobs(config):
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.launcher.n_jobs = jobs


def refuse_deleted_keys(overrides: list[str]) -> None:
    """``~train.rounds``: fedkws would read its own default for the key; say so instead.

    Deleting a constructor's argument (an entry of ``strategy.kwargs``, a key of
    ``optimizer``: the constructor's default then applies) is allowed.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from fedkws.errors import ConfigError

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return  # Hydra says what does not parse
    for o in parsed:
        key = o.key_or_group
        optimizer_argument = key.startswith("optimizer.") and not key.startswith("optimizer._")
        argument = ".kwargs." in f".{key}" or optimizer_argument
        if o.is_delete() and not argument and not key.startswith("hydra"):
            raise ConfigError(
                f"~{key}: a key of fedkws's config cannot be deleted (the run would use a "
                f"default of its own, not the config's); set it instead: {key}=<value>"
            )


def check_sweep(config: DictConfig, config_name: str) -> None:
    """Compose and validate :func:`sweep_samples`; the first mistake is one ``error:`` line.

    Runs in a callback, where Hydra turns exceptions into warnings: a mistake
    is printed here and the process exits 2, as a job would, before the sweep
    folder or its Ray head exist.
    """
    from hydra import compose
    from hydra.errors import CompactHydraException

    from fedkws.errors import ConfigError, hydra_error_line
    from fedkws.spec import from_config

    for overrides in sweep_samples(config):
        with user_errors():
            try:
                refuse_deleted_keys(overrides)
                from_config(compose(config_name=config_name, overrides=overrides))
            except CompactHydraException as err:  # Hydra's own mistake: reported as it words it
                raise ConfigError(hydra_error_line(err)) from None
            except ConfigError as err:
                raise ConfigError(f"{err} (in the sweep's job {' '.join(overrides)})") from None


def _only_centralised_jobs(config: DictConfig) -> bool:
    """Whether every job of a multirun is centralised (and so never needs Ray).

    Reads the choices that can set a job's strategy (``strategy``, ``strategy.name``
    and ``arm``) from the command line and the preset's ``hydra.sweeper.params`` with
    Hydra's own parser; unless the strategy is swept, the base config's (every fixed
    override applied) counts too. An arm other than ``central``, or a choice it
    cannot list (a ``glob``), counts as federated.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    texts = _sweep_override_texts(config)
    chosen: dict[str, set[str]] = {"strategy": set(), "strategy.name": set(), "arm": set()}
    swept = False
    for override in OverridesParser.create().parse_overrides(texts):
        key = override.key_or_group.lstrip("+~")
        if key not in chosen:
            continue
        try:
            values = override.sweep_string_iterator() if override.is_sweep_override() else None
            chosen[key].update(values or [str(override.value())])
        except HydraException:
            return False
        swept |= values is not None and key != "arm"
    strategies = chosen["strategy"] | chosen["strategy.name"]
    if not swept:
        strategies.add(str(config.get("strategy", {}).get("name")))
    return strategies == {"central"} and chosen["arm"] <= {"central"}


def _parallel_jobs(config: DictConfig) -> int:
    """How many jobs of a multirun its launcher runs at once (``n_jobs``; 1 if it has none)."""
    try:
        n_jobs = int((config.get("hydra", {}).get("launcher") or {}).get("n_jobs") or 1)
    except (TypeError, ValueError):  # not a number: the launcher itself reports it
        return 1
    if n_jobs < 0:  # joblib: -1 is every core, -2 all but one, ...
        return max(1, (os.cpu_count() or 1) + 1 + n_jobs)
    return max(1, n_jobs)


def _actors_per_job(fed: DictConfig, head_cpus: Any, jobs: int) -> int | None:
    """An equal share of the head's actors for each of ``jobs`` simulations at once."""
    try:
        client_cpus = float((fed.get("client_resources") or {}).get("num_cpus") or 1)
        fits = int(float(head_cpus or os.cpu_count() or 1) / client_cpus)
    except (TypeError, ValueError, ZeroDivisionError):  # each job's validation reports it
        return None
    return max(1, fits // jobs)


def _check_parallel_share(fed: DictConfig, jobs: int) -> None:
    """Refuse parallel jobs on a Ray instance whose share per job fedkws cannot work out.

    Flower gives every simulation all the actors the instance holds; jobs that
    build their pools at the same moment could each hold some and wait for the
    rest. The sweep's own head is shared out by CPUs; anything else needs
    ``federation.actors`` from the user.
    """
    from fedkws.errors import ConfigError

    if jobs <= 1 or fed.get("actors") is not None:
        return
    need = "need federation.actors, each job's share of the actors (Flower gives every job all)"
    if fed.get("ray_address"):
        raise ConfigError(
            f"federation.actors=null: {jobs} jobs at once on the Ray instance at "
            f"{fed.get('ray_address')} {need}"
        )
    try:
        gpus = float((fed.get("client_resources") or {}).get("num_gpus") or 0)
    except (TypeError, ValueError):  # each job's validation reports it
        return
    if gpus > 0:
        raise ConfigError(f"federation.actors=null: {jobs} jobs at once with GPU clients {need}")


class SweepRay(Callback):
    """A multirun's jobs share one local Ray head (``federation.sweep_ray``), ended afterwards.

    Started only for sweeps whose base config uses the Ray backend and names no
    ``federation.ray_address`` of its own; jobs attach through ``RAY_ADDRESS``.
    With a launcher that runs jobs in parallel (``hydra/launcher=fedkws_parallel``),
    each job's simulation gets an equal share of the head's CPUs
    (``FEDKWS_ACTORS``, read by ``federation.actors`` unless that is set).
    Jobs that run one after another in this process also hand their Ray actors
    on to the next (:mod:`fedkws.fl.actor_keeper`), on the head or on the
    instance at ``federation.ray_address``.
    """

    def __init__(self) -> None:
        self.head = None
        self.set_actors = False
        self.kept: ExitStack | None = None  # the jobs' actors handed on (actor_keeper.keeping)

    def __getstate__(self) -> dict:
        # A parallel launcher sends the callbacks to its workers; the head stays with the
        # process that started it.
        return {"head": None, "set_actors": False, "kept": None}

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:  # noqa: D102
        from fedkws.fl.ray_head import LocalRayHead

        fed = config.get("federation") or {}
        if fed.get("backend", "ray") != "ray" or not fed.get("sweep_ray", True):
            return
        if OmegaConf.select(config, "hydra.job.name") == "prepare":  # data only: no Ray
            return
        if _only_centralised_jobs(config):
            return  # nothing to simulate
        if _on_slurm(config):
            return  # the jobs run on the cluster's nodes: each starts its own Ray there
        jobs = _parallel_jobs(config)
        with user_errors():
            _check_parallel_share(fed, jobs)
            if jobs == 1:  # one job after another in this process: they hand their actors on
                from fedkws.fl import actor_keeper

                self.kept = ExitStack()
                self.kept.enter_context(actor_keeper.keeping())
            if fed.get("ray_address"):
                return
            cpus = (fed.get("ray_init_args") or {}).get("num_cpus")
            self.head = LocalRayHead(num_cpus=cpus)
            address = self.head.start()
        os.environ["RAY_ADDRESS"] = address
        print(f"Ray head for this sweep at {address} (one Ray per job: federation.sweep_ray=false)")
        actors = _actors_per_job(fed, cpus, jobs) if jobs > 1 else None
        if actors is not None and fed.get("actors") is None:
            os.environ["FEDKWS_ACTORS"] = str(actors)
            self.set_actors = True
            print(f"{jobs} jobs at once: {actors} Ray actor(s) each (federation.actors)")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:  # noqa: D102
        if self.kept is not None:  # the kept actors and Ray connection, before their head
            self.kept.close()
            self.kept = None
        if self.head is not None:
            self.head.stop()
            os.environ.pop("RAY_ADDRESS", None)
            self.head = None
        if self.set_actors:
            os.environ.pop("FEDKWS_ACTORS", None)
            self.set_actors = False


class ParallelStop(Callback):
    """SIGINT or SIGTERM to a parallel sweep's process stops its jobs as Ctrl-C does.

    The jobs of ``hydra/launcher=fedkws_parallel`` run in joblib's worker
    processes, where fedkws's signal handling lives; the sweep's own process
    passes both signals on to them (``kill -INT`` of the sweep alone was ignored
    before), so each job stops after its current step and keeps its last
    complete round.
    """

    # joblib's worker processes (loky) are started with this module on their command line
    WORKERS = "joblib.externals.loky.backend.popen_loky_posix"

    def __init__(self) -> None:
        self.restore: Any = None
        self.warnings: str | None = None

    def __getstate__(self) -> dict:
        return {"restore": None, "warnings": None}  # sent to the workers, where it does nothing

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:  # noqa: D102
        from fedkws import lifecycle

        if _parallel_jobs(config) > 1 and threading.current_thread() is threading.main_thread():
            self.restore = lifecycle.pass_stops_to_children(self.WORKERS)
            # joblib's worker pool is not shut down when a stop ends the sweep; the
            # resource tracker (started after this, with this environment) then frees its
            # semaphores at exit with a "leaked semaphore objects" warning, noise only.
            quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
            self.warnings = os.environ.get("PYTHONWARNINGS")
            os.environ["PYTHONWARNINGS"] = ",".join(w for w in (self.warnings, quiet) if w)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:  # noqa: D102
        if self.restore is not None:
            self.restore()
            self.restore = None
            if self.warnings is None:
                os.environ.pop("PYTHONWARNINGS", None)
            else:
                os.environ["PYTHONWARNINGS"] = self.warnings


# This process's failed sweep jobs (the sequential launcher runs them here); the jobs of
# other launchers are counted from their failed.txt by the sweep report.
_FAILED_HERE: list[str] = []


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job and return the final validation accuracy (for sweepers).

    A single run that fails stops with its ``error:`` line. A job of a sweep that fails
    says so in one line, keeps why in its folder (``failed.txt``) and returns: the other
    jobs go on, the sweep's report lists it as failed, and the command exits with status
    1 at the end (:func:`cli`). An interrupt stops the whole sweep.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    run_dir = _hydra_context(str(cfg.get("name")), "0")[0]
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        _note_a_sweep_run_once()
        with user_errors():
            return _job(cfg, run_dir, in_sweep=False)
    try:
        return _job(cfg, run_dir, in_sweep=True)
    except Exception as err:  # noqa: BLE001 - kept in failed.txt and reported; the sweep goes on
        _job_failed(err, run_dir)
        return None


def _note_a_sweep_run_once() -> None:
    """A sweep preset run without -m (``experiment=main``): say it runs its base config once.

    Not when the command line sets every swept key: that is the run asked for.
    """
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    given = {str(o).split("=", 1)[0].lstrip("+~") for o in hc.overrides.task}
    swept = set(hc.sweeper.get("params") or {}) - given
    if swept:
        preset = hc.runtime.choices.get("experiment")
        what = f"experiment={preset}" if preset else "this config"
        print(f"note: {what} is a sweep ({', '.join(sorted(swept))} swept); "
              "without -m this is one run of its base config (add -m for the sweep)",
              file=sys.stderr)  # fmt: skip


def _start(cfg: DictConfig, run_dir: Path, in_sweep: bool) -> RunSpec | None:
    """The checked spec of :func:`_job`'s run, or None for a job that is not to run.

    Refusals, config mistakes and a stop that came first end a single run with their
    line; in a sweep they are said and the sweep goes on or ends (see each branch).
    """
    from hydra.core.hydra_config import HydraConfig

    from fedkws import lifecycle
    from fedkws.errors import AlreadyComplete, RunRefused, StopReached, write_failure
    from fedkws.run import preflight
    from fedkws.spec import from_config

    try:
        refuse_deleted_keys(list(HydraConfig.get().overrides.task))
        spec = from_config(cfg)
        preflight(spec, run_dir)
    except AlreadyComplete as done:
        if not in_sweep:
            _tidy_refused(run_dir)
            if isinstance(done, StopReached):  # a chunk's command run once more: done
                print(done)
                return None
            raise
        print(f"{done}: skipped (the sweep goes on)")  # resume=true over a whole sweep
        return None
    except Exception as err:
        if not in_sweep:
            _tidy_refused(run_dir)
        elif isinstance(err, RunRefused):
            # Another run's folder (a sweep started again into its own folder, without
            # resume=true, or with another config): left as it was, and the sweep ends here,
            # as its other finished jobs would be refused the same way.
            from hydra.core.hydra_config import HydraConfig

            _restore_prior_multirun(Path(HydraConfig.get().sweep.dir))
            print_error(err)
            sys.exit(2)
        else:  # a sweep's job that could not start: its folder says why, for the report
            _keep_hydra_files(cfg, run_dir)
            write_failure(run_dir, err)
        raise
    except BaseException as err:
        _tidy_refused(run_dir)
        if isinstance(err, KeyboardInterrupt) and in_sweep and lifecycle.in_parallel_sweep_job():
            # Ctrl-C before this job's run began (its worker's own handler): the sweep
            # stops as it does for its running jobs, and this job is not started.
            lifecycle.mark_sweep_stop(128 + int(signal.SIGINT))
            print(f"the sweep is stopping: {run_dir} not started")
            return None
        raise
    return spec


def _job(cfg: DictConfig, run_dir: Path, in_sweep: bool) -> float | None:
    """:func:`main`'s run: checks, the run, its interrupt; failures kept in the run folder.

    The folder is held for the run (:func:`fedkws.fileio.folder_in_use`): a second run
    started into it meanwhile is refused before it writes anything there.
    """
    from fedkws import lifecycle
    from fedkws.errors import RunRefused
    from fedkws.fileio import folder_in_use

    if in_sweep and (code := lifecycle.sweep_stop_code()) is not None:
        _tidy_refused(run_dir)
        print(f"the sweep is stopping (exit {code}): {run_dir} not started")
        return None
    with lifecycle.graceful_interrupts():  # a resume's checks prepare its data: minutes
        try:
            spec = _start(cfg, run_dir, in_sweep)
            if spec is not None:
                lifecycle.raise_if_stopping()  # asked while the data was prepared
        except (lifecycle.Interrupted, KeyboardInterrupt):
            return _stop_interrupted(run_dir)
    if spec is None:
        return None
    names = _hydra_context(spec.name, str(spec.seed))[1]
    run_dir.mkdir(parents=True, exist_ok=True)
    with folder_in_use(run_dir, RunRefused):  # before .hydra/ is written: not another run's
        return _job_run(cfg, spec, run_dir, names)


def _job_run(cfg: DictConfig, spec: RunSpec, run_dir: Path, names) -> float | None:
    """:func:`_job` once its folder is held: the Hydra files, the run, its interrupt."""
    from fedkws import lifecycle
    from fedkws.run import run

    _keep_hydra_files(cfg, run_dir)
    with lifecycle.graceful_interrupts():
        try:
            result = run(spec, run_dir, names)  # a failure's failed.txt: written by run()
        except (lifecycle.Interrupted, KeyboardInterrupt):  # first or second Ctrl-C / SIGTERM
            return _stop_interrupted(run_dir)
        except Exception:
            if lifecycle.signal_received():  # the run failed while it stopped: still a stop
                return _stop_interrupted(run_dir)
            raise
    metrics = result.rounds[-1].metrics if result.rounds else {}
    for key in ("val/eval/acc", "fed/eval/acc_mean"):
        if key in metrics:
            return float(metrics[key])
    return None


def _stop_interrupted(run_dir: Path) -> None:
    """The interrupt's line (what is kept, where) and exit 130 / 143: the sweep ends too.

    A job of a parallel sweep returns instead (:func:`fedkws.lifecycle.note_sweep_stop`).
    """
    from fedkws import lifecycle

    kept = (
        f"completed rounds are kept in {run_dir}"
        if (run_dir / "checkpoint.pt").is_file()
        else f"before its first round ended (nothing to resume in {run_dir})"
    )
    print_error(RuntimeError(f"interrupted{lifecycle.stopped_by()}; {kept}"))
    if lifecycle.note_sweep_stop(lifecycle.exit_code()):
        return None  # a parallel sweep's job: the sweep's process exits once all stopped
    sys.exit(lifecycle.exit_code())


def _job_failed(err: Exception, run_dir: Path) -> None:
    """A sweep's failed job: one line (its error, its folder), counted for the exit status.

    A fault's traceback is in the job's failed.txt, or here when that could not be written.
    """
    import traceback

    from hydra.core.hydra_config import HydraConfig

    from fedkws.errors import FAILED_FILE, is_user_error

    sweep = Path(HydraConfig.get().sweep.dir).absolute()
    job = run_dir.relative_to(sweep) if run_dir.is_relative_to(sweep) else run_dir
    _FAILED_HERE.append(str(job))
    what = (str(err).splitlines() or [""])[0]
    if not is_user_error(err):
        what = f"{type(err).__name__}: {what}"
        if (run_dir / FAILED_FILE).is_file():
            what += f" (traceback in {run_dir / FAILED_FILE})"
        else:
            traceback.print_exception(err)
    print(f"error: {what} (the sweep's job {job} failed; the others go on)", file=sys.stderr)


def cli() -> None:
    """The console command: :func:`main`, with Hydra's own mistakes as one ``error:`` line.

    A sweep with failed jobs exits with status 1 after its report (which lists them).
    """
    from fedkws import lifecycle, report

    try:
        with hydra_mistakes_in_one_line():
            main()
        if (code := lifecycle.take_sweep_stop()) is not None:  # a parallel sweep, stopped
            sys.exit(code)
        failed = sorted({*report.FAILED_JOBS, *_FAILED_HERE})
        if failed:
            print(f"error: {len(failed)} job(s) of the sweep failed: {', '.join(failed)} (why: "
                  "above, and in each job's failed.txt)",
                  file=sys.stderr)  # fmt: skip
            sys.exit(1)
    finally:
        # The process ends here. Python's shutdown then looks for reference cycles among
        # every object left, most of them from the imports (torch, Ray, Flower): about
        # 1 s on 2 cores. Frozen, they are left to the operating system; the run's files
        # are all written and closed by now.
        gc.freeze()


if __name__ == "__main__":
    cli()
