"""What both recipes share: run folder, setup, round loop, records, checkpoints, test split.

The run folder and resume checks, data and model setup, one round loop, the
recorder, checkpoints and the final test evaluation live here.

A recipe (:mod:`fedkws.recipes.central`, :mod:`fedkws.recipes.federated`)
provides three things: ``train_round(round) -> (metrics, per-client info)``,
``evaluate_round(round) -> metrics`` and ``optimizer_state()``; everything
else about a round (timing, results.json, W&B, checkpoint, console line,
stopping) happens here, once.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from rich.console import Console
from rich.markup import escape
from torch import nn

from fedkws import checkpoint, lifecycle
from fedkws.clients import ClientData, make_clients
from fedkws.core.aggregation import EVAL_MODES, keeps_client_state
from fedkws.core.evaluation import Evaluator
from fedkws.core.loops import device_name
from fedkws.core.models import bn_layers, build_model, count_parameters
from fedkws.core.seeding import seed_model_init
from fedkws.data.cache import CachedDataset
from fedkws.data.pipeline import open_dataset
from fedkws.errors import AlreadyComplete, ConfigError, RunRefused, StopReached
from fedkws.fileio import torch_save, write_text
from fedkws.plots import figure
from fedkws.spec import RunSpec, comparable, may_change
from fedkws.tracking import Recorder, Result, RoundRecord, WandbLogger

console = Console(highlight=False, soft_wrap=True)

Metrics = dict[str, float]
ClientInfo = dict[str, dict[str, float]]


class Recipe(Protocol):
    """What the round loop needs from a recipe."""

    model: nn.Module

    def train_round(self, round_: int) -> tuple[Metrics, ClientInfo]: ...  # noqa: D102

    def evaluate_round(self, round_: int) -> Metrics: ...  # noqa: D102

    def optimizer_state(self) -> dict[str, Any]: ...  # noqa: D102


# --------------------------------------------------------------------------- the run folder


# Where a run's data lies: a resume may move it when the checkpoint has the data's fingerprint.
DATA_PATHS = ("data_dir", "cache_dir", "dataset.root")


def check_folder(
    spec: RunSpec, run_dir: Path, clients_here: bool = True
) -> tuple[checkpoint.Checkpoint, dict] | None:
    """Refuse a start that would overwrite or mix up a run; load the checkpoint to resume.

    Reads only: a refused run changes nothing on disk. ``clients_here``: the clients
    keep their state on this machine (not SuperNodes of a Deployment Engine elsewhere).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunRefused(f"{run_dir} is a file, not a run folder")
    refuse_a_sweeps_folder(run_dir)
    loaded = checkpoint.load(run_dir) if run_dir.is_dir() else None
    if loaded is None:
        if spec.resume and (run_dir / "results.json").is_file():
            raise RunRefused(f"{run_dir} has results.json but no checkpoint.pt to resume from")
        if not spec.resume and (run_dir / "results.json").is_file():
            raise RunRefused(f"{run_dir} already holds a run; choose another folder")
        return None
    ckpt, _ = loaded
    if not spec.resume:
        raise RunRefused(
            f"{run_dir} already holds a checkpoint (round {ckpt.round}); pass resume=true "
            "to continue that run or choose another folder"
        )
    new = spec.comparable()
    changed = _differences(comparable(_with_implied_keys(ckpt.config, new)), new)
    if ckpt.data:  # where the data lies may change: its fingerprint is checked instead
        changed = [key for key in changed if key not in DATA_PATHS]
    if changed:
        also = f", {', '.join(DATA_PATHS)}" if ckpt.data else ""
        raise RunRefused(
            f"resume: the config differs from the checkpoint's in {', '.join(changed[:6])} "
            f"(only {may_change()}{also} may change)"
        )
    if spec.train.rounds < ckpt.round:
        raise RunRefused(
            f"resume: train.rounds={spec.train.rounds} is fewer than the {ckpt.round} rounds "
            "already recorded"
        )
    if spec.train.rounds == ckpt.round and finished(run_dir):
        raise AlreadyComplete(
            f"resume: {run_dir} is already complete ({ckpt.round} rounds and its final "
            "evaluation); raise train.rounds to continue it"
        )
    if clients_here and not spec.strategy.central:
        _check_client_state(spec, ckpt.records, run_dir / "client_state")
    stop = spec.train.stop_after_round
    if stop is not None and ckpt.round >= stop < spec.train.rounds:
        # Nothing to train; going on would rewrite results.json as a stopped run (and lose
        # a finished run's final evaluation, when train.rounds was raised).
        raise StopReached(
            f"resume: {run_dir} already has {ckpt.round} round(s) and "
            f"train.stop_after_round={stop}: nothing to train, left as it is"
        )
    return loaded


def refuse_other_data(
    ckpt: checkpoint.Checkpoint,
    identity: str,
    what: str,
    advice: str = "put that data back, or start the run again in a new folder",
) -> None:
    """Refuse to go on from ``ckpt`` with data other than its rounds trained on.

    Checkpoints written before the data was recorded are let through.
    """
    if ckpt.data and ckpt.data != identity:
        raise RunRefused(
            f"{what}: the dataset is not the one its {ckpt.round} round(s) trained on (clips, "
            f"labels or splits changed since, or another dataset at that path); {advice}"
        )


def refuse_a_sweeps_folder(folder: Path) -> None:
    """A sweep's own folder (its ``multirun.yaml``) is no place for a single run's files."""
    if (folder / "multirun.yaml").is_file():
        raise RunRefused(
            f"{folder} is a sweep's folder (it holds multirun.yaml): a run there would mix "
            "with the sweep's jobs and its report; give the run a folder of its own"
        )


def _check_client_state(spec: RunSpec, records: list[dict[str, Any]], state_dir: Path) -> None:
    """Refuse a resume whose clients' own state (client_state/) is missing or unreadable.

    Under FedBN/SiloBN every client that trained keeps its own BatchNorm after each of
    its rounds (``client<pid>/fedbn_round<r>.pt``), under ``strategy=cyclic`` its own
    keys, optimiser state and place in its epochs (``cyclic_round<r>.pt``). The
    checkpoint's records say which clients trained in which round, so the file of each
    one's last round must be there and readable: without it the client would go on
    from its initial state, or fail every round.
    """
    import torch

    from fedkws.fl.client_app import CYCLIC_STATE, FEDBN_STATE, client_state_file

    kinds = (
        {FEDBN_STATE: f"BatchNorm (bn.sync={spec.bn.sync})"}
        if keeps_client_state(spec.bn.sync)
        else {}
    )
    if spec.strategy.cyclic:
        kinds[CYCLIC_STATE] = "keys, optimiser state and place in its epochs (strategy=cyclic)"
    last: dict[int, int] = {}
    for record in records:
        for pid, info in (record.get("clients") or {}).items():
            if not (isinstance(info, dict) and info.get("failed")):  # a failure wrote nothing
                last[int(pid)] = int(record["round"])
    for name, what in kinds.items():
        paths = [client_state_file(state_dir, pid, r, name) for pid, r in sorted(last.items())]
        missing = [str(p.relative_to(state_dir)) for p in paths if not p.is_file()]
        if missing:
            raise RunRefused(
                f"resume: {state_dir} lacks {', '.join(missing[:4])}"
                f"{' and more' if len(missing) > 4 else ''}: each is a client's own {what} "
                "after its last round, and without it the client would go on from its "
                "initial one; put client_state/ back, or start the run again in a new folder"
            )
        for path in paths:
            try:
                torch.load(path, weights_only=True, map_location="cpu")
            except Exception as err:  # noqa: BLE001 - any unreadable file, named
                raise RunRefused(
                    f"resume: {path} cannot be read ({checkpoint.why_unreadable(path, err)}): "
                    f"it is a client's own {what} after its last round; put an intact copy "
                    "back, or start the run again in a new folder"
                ) from None


def finished(run_dir: Path) -> bool:
    """Whether the folder's results.json records a complete run with its final evaluation."""
    try:
        summary = Result.load(run_dir / "results.json").summary
    except (OSError, ValueError):  # no file, or not a results.json (Result.load says which)
        return False
    return bool(summary.get("complete"))


# Config keys added after checkpoints were first written, with the value a checkpoint
# without them ran with: such a run resumes unless the key is set to something else.
# Only a key the new config has is implied (bn.freeze_stats: FixBN runs alone have it).
IMPLIED_KEYS: dict[tuple[str, ...], Any] = {
    ("model", "channels_last"): False,
    ("bn", "freeze_stats"): "exact",
    ("augment", "domain"): "wave",
}


def _with_implied_keys(config: dict, new: dict) -> dict:
    out = copy.deepcopy(config)
    for path, value in IMPLIED_KEYS.items():
        node, there = out, new
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
            there = there.get(key) if isinstance(there, dict) else None
        if isinstance(node, dict) and isinstance(there, dict) and path[-1] in there:
            node.setdefault(path[-1], value)
    return out


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def check_writable(path: Path, what: str) -> None:
    """Refuse a folder that cannot be created or written (before anything is written)."""
    import os

    from fedkws.fileio import why_not_a_folder

    if why := why_not_a_folder(path):
        raise ConfigError(f"{what}={str(path)!r}: {why}")
    probe = path
    while not probe.exists():
        probe = probe.parent

    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}={str(path)!r}: {probe} is not writable")
    if probe != path:  # root passes os.access everywhere: try it (/proc, a read-only mount)
        import tempfile

        try:
            os.rmdir(tempfile.mkdtemp(prefix=".fedkws-probe-", dir=probe))
        except OSError as err:
            raise ConfigError(
                f"{what}={str(path)!r}: no folder can be made in {probe} ({err.strerror or err})"
            ) from None


def check_data_folders(spec: RunSpec) -> None:
    """Refuse a cache folder, or a dataset root still to be made, that cannot be written.

    An existing root is only read (the real dataset may lie on a read-only mount); a
    missing one that is neither generated nor downloaded is the data layer's to name.
    """
    check_writable(Path(spec.cache_dir), "cache_dir")
    root = Path(spec.dataset.data.root)
    made_here = spec.dataset.generate is not None or spec.dataset.download is not None
    if made_here and not root.exists():  # with a lock file beside it
        check_writable(root, "dataset.root")


# --------------------------------------------------------------------------- setup


@dataclass
class Setup:
    """Data, clients and the initial model (on the run's device): what both recipes start from."""

    data: CachedDataset
    clients: list[ClientData]
    val_rows: np.ndarray
    test_rows: np.ndarray
    model: nn.Module


def load_data(spec: RunSpec) -> CachedDataset:
    """Generate or download the dataset if needed; build or reuse the feature cache."""
    ds = spec.dataset
    generate = None if ds.generate is None else dict(ds.generate)
    download = None if ds.download is None else dict(ds.download)
    return open_dataset(ds.data, spec.features, spec.cache_dir, generate, download, spec.progress)


def data_ready(spec: RunSpec) -> bool:
    """Whether :func:`load_data` will generate no synthetic dataset (it forks workers).

    A process that starts Ray in a background thread first (see
    :meth:`fedkws.recipes.federated.FederatedRecipe.setup`) must not fork meanwhile.
    """
    from fedkws.data.pipeline import needs_generating

    ds = spec.dataset
    return not needs_generating(ds.data.root, None if ds.generate is None else dict(ds.generate))


def setup(spec: RunSpec, run_dir: Path) -> Setup:
    """Load the data, partition it, build the initial model; write the data summary."""
    data = load_data(spec)
    val_rows, test_rows = data.split_indices("validation"), data.split_indices("testing")
    for split, rows in (("validation", val_rows), ("test", test_rows)):
        if len(rows) == 0:
            raise ConfigError(f"the {split} split of {data.manifest['root']} has no examples")
    clients = make_clients(data, spec.partition, seed=spec.seed)
    if spec.partition.channels:
        data = channel_variant(data, clients, spec)
    seed_model_init(spec.seed)
    model = build_model(**spec.model.build_args(data.num_classes)).to(spec.device)
    write_text(run_dir / "data_summary.txt", data.summary() + "\n")
    train = sum(len(c.train) for c in clients)
    empty = sum(1 for c in clients if len(c.train) == 0)  # an extreme label skew leaves some
    without = f"; {empty} clients have none" if empty else ""
    console.print(
        f"data: {len(data.labels)} examples ({len(data.split_indices('training'))} training, "
        f"{len(val_rows)} validation, {len(test_rows)} test), {data.num_classes} classes, "
        f"{len(clients)} clients ({train} local training rows{without}); "
        f"{data.manifest['audio_report']}"
    )
    return Setup(data, clients, val_rows, test_rows, model)


def channel_variant(data: CachedDataset, clients: list, spec: RunSpec) -> CachedDataset:
    """The dataset as the feature-shift clients hear it (see :mod:`fedkws.data.channel`)."""
    from fedkws.data import channel
    from fedkws.data.cache import open_current
    from fedkws.progress import progress_bar

    held = [np.concatenate([c.train, c.test]) for c in clients]
    assigned = channel.assignment(len(data.labels), data.speakers, held, spec.partition.channels)
    with progress_bar("recording channels", len(data.labels), spec.progress) as advance:
        fkey = channel.build_variant(data.path, spec.features, assigned, advance)
    console.print(f"feature shift: {spec.partition.channels} recording channels ({fkey})")
    return open_current(str(data.path), fkey)


# --------------------------------------------------------------------------- the run


def devices(spec: RunSpec) -> dict[str, str]:
    """Where the run computes: the driver's device and its name, and the clients' device."""
    out = {"device": spec.device, "name": device_name(spec.device)}
    if not spec.strategy.central:
        out["clients"] = spec.client_device
    return out


def describe_devices(spec: RunSpec) -> str:
    """The console line that says where the run computes."""
    d = devices(spec)
    line = f"device: {d['device']} ({d['name']})"
    if "clients" in d:
        line += f"; clients: {d['clients']}"
        if spec.federation.backend == "ray" and d["clients"] != "cpu":
            line += f" (Ray, {spec.federation.num_gpus:g} GPU each)"
    if spec.train.amp != "none" or spec.train.deterministic:
        line += f"; amp={spec.train.amp}, deterministic={spec.train.deterministic}"
    return line


# Where a run's time goes (summary["phases_s"]); what is in none of them (the console, the
# last results.json and W&B) is the difference to summary["wall_s"].
PHASES = (
    "setup",  # data, partition, model, W&B
    "clients_start",  # federated: Ray, actors, discovery of the clients
    "rounds",  # training and evaluation of every round (the rounds' "seconds")
    "record",  # after each round: results.json, checkpoint, W&B, console line
    "final_queries",  # what the final evaluation needs from the clients (exact statistics;
    # FedBN/SiloBN: each client's model on the test split)
    "clients_stop",  # federated: actors and Ray ended (the final evaluation starts with it)
    "final_evaluation",  # the driver's validation and test in every final mode, plots;
    # federated: what is left of it once the clients have stopped
)


class Background:
    """``fn(*args)`` in a daemon thread; :meth:`result` waits for it, then returns or raises.

    ``fn`` should end at its next step once :func:`fedkws.lifecycle.raise_if_aborting`
    raises (a second Ctrl-C), as evaluation does: the process then exits only after it.
    """

    def __init__(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None

        def target() -> None:
            try:
                self._value = fn(*args)
            except BaseException as err:  # raised again by result(), in the waiting thread
                self._error = err

        self._thread = threading.Thread(target=target, name=name, daemon=True)
        self._thread.start()

    def result(self) -> Any:
        """What ``fn`` returned (after waiting for it); what it raised is raised here."""
        try:
            self._thread.join()
        except KeyboardInterrupt:  # a second Ctrl-C: the work ends at its next step
            self.wait()
            raise
        if self._error is not None:
            raise self._error
        return self._value

    def wait(self, timeout: float = 60.0) -> None:
        """Wait for ``fn`` to end, whatever it returns or raises (a run that failed)."""
        self._thread.join(timeout)


class Run:
    """One run's records: results.json, W&B, checkpoints and the console."""

    def __init__(self, spec: RunSpec, run_dir: Path, wandb_names: tuple[str, str]):
        self.spec, self.run_dir = spec, run_dir
        self.result = Result(config=dict(spec.resolved))
        self.resumed: checkpoint.Checkpoint | None = None
        self.data_identity = ""  # of the data the rounds train on (open())
        self.wandb_names = wandb_names
        self.recorder: Recorder | None = None
        self.started = time.perf_counter()
        # Seconds of this invocation outside the rounds, by phase (summary["phases_s"]).
        self.phases: dict[str, float] = {}

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the time spent in this block to ``phases[phase]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - start

    def phase_times(self) -> dict[str, float]:
        """Where this invocation's time went so far, every phase of :data:`PHASES` (0 if none).

        A resumed run's phases are those of its last invocation, as is ``wall_s``.
        """
        rounds = sum(r.seconds for r in self.result.rounds if r.round >= self.start_round)
        return {p: rounds if p == "rounds" else self.phases.get(p, 0.0) for p in PHASES}

    def open(self, loaded: tuple[checkpoint.Checkpoint, dict] | None, data: CachedDataset) -> None:
        """Start recording (restoring a checkpoint's records and RNG states if resuming).

        The checkpoints it writes record the data's
        :meth:`~fedkws.data.cache.CachedDataset.identity` (see :func:`refuse_other_data`).
        """
        self.result.config["num_classes"] = data.num_classes
        self.result.config["device_resolved"] = devices(self.spec)
        self.data_identity = data.identity()
        wandb_id = None
        if loaded is not None:
            self.resumed, rng = loaded
            checkpoint.restore_rng(rng)
            self.result.rounds = [RoundRecord(**r) for r in self.resumed.records]
            wandb_id = self.resumed.wandb_id or None
            where = escape(str(self.run_dir))  # folder names hold brackets: not markup
            console.print(f"resuming {where} after round {self.resumed.round}")
        log = self.spec.logger
        wandb = WandbLogger(
            mode=log.mode,
            project=log.project,
            entity=log.entity,
            tags=list(log.tags),
            config=self.result.config,
            run_dir=self.run_dir,
            group=self.wandb_names[0],
            name=self.wandb_names[1],
            run_id=wandb_id,
            init_timeout=log.init_timeout,
        )
        self.recorder = Recorder(self.run_dir, self.result, wandb, plots=self.spec.plots)

    @property
    def start_round(self) -> int:
        """The first round this invocation trains."""
        return 1 if self.resumed is None else self.resumed.round + 1

    @property
    def last_round(self) -> int:
        """The last round this invocation trains (``train.stop_after_round`` may cut it short)."""
        stop = self.spec.train.stop_after_round
        return self.spec.train.rounds if stop is None else min(self.spec.train.rounds, stop)

    def record(self, recipe: Recipe, round_: int, metrics: Metrics, clients: ClientInfo, s: float):
        """Persist one complete round: results.json, W&B, checkpoint, console line."""
        assert self.recorder is not None
        self.recorder.log_round(RoundRecord(round_, metrics, s, clients))
        checkpoint.save(
            self.run_dir,
            checkpoint.Checkpoint(
                round=round_,
                model=recipe.model.state_dict(),
                optimizer_kind=self.label_kind,
                optimizer=recipe.optimizer_state(),
                failures=list(getattr(recipe, "failures", [])),
                records=[r.__dict__ for r in self.result.rounds],
                config=self.spec.comparable(),
                wandb_id=self.recorder.wandb.run_id or "",
                data=self.data_identity,
            ),
        )
        if self.resumed is not None and round_ == self.resumed.round + 1:
            remove_final_files(self.run_dir, self.spec.plots)
        if self.spec.progress:
            console.print(format_round(round_, self.spec.train.rounds, metrics, s))

    @property
    def label_kind(self) -> str:
        """``central`` or ``server``: whose optimiser the checkpoint holds."""
        return "central" if self.spec.strategy.central else "server"

    def finish(self, summary: dict[str, Any]) -> Result:
        """Write the final summary (with where the time went) and return the Result."""
        assert self.recorder is not None
        summary["wall_s"] = time.perf_counter() - self.started  # the final evaluation included
        summary["phases_s"] = self.phase_times()
        self.recorder.finish(summary)
        return self.result

    def close(self, ok: bool) -> None:
        """Finish W&B (always; from ``finally``)."""
        if self.recorder is not None:
            self.recorder.wandb.finish(0 if ok else 1)


def run_rounds(recipe: Recipe, run: Run) -> None:
    """The round loop of every recipe: train, evaluate, record; stop on request."""
    for round_ in range(run.start_round, run.last_round + 1):
        lifecycle.raise_if_stopping()
        start = time.perf_counter()
        metrics, clients = recipe.train_round(round_)
        metrics["time/train_s"] = time.perf_counter() - start
        eval_start = time.perf_counter()
        metrics.update(recipe.evaluate_round(round_))
        metrics["time/eval_s"] = time.perf_counter() - eval_start
        seconds = time.perf_counter() - start
        with run.timed("record"):
            run.record(recipe, round_, metrics, clients, seconds)


def format_final(summary: dict[str, Any]) -> str:
    """The closing lines of a run: every final accuracy with its 95 % interval."""
    lines = []
    for prefix, label in (("final/val", "validation"), ("test", "test")):
        parts = []
        for key in sorted(summary):
            if key.startswith(prefix + "/") and key.endswith("/acc") and "/diff/" not in key:
                mode = key[len(prefix) + 1 : -len("/acc")]
                interval = summary.get(key + "_ci95")
                name = f"train(batch {summary['eval_batch_size']})" if mode == "train" else mode
                around = "" if not interval else f" \\[{interval[0]:.3f}, {interval[1]:.3f}]"
                parts.append(f"{name} {summary[key]:.3f}{around}")  # \\[: no rich markup
        if parts:
            lines.append(f"{label} accuracy (95 % interval): " + " | ".join(parts))
    if lines:
        return "\n".join(lines)
    # FedBN / SiloBN: no global model; each client's own, the mean over clients.
    for prefix, label in (("final/fed", "validation"), ("test/fedbn", "test")):
        parts = [f"{key[len(prefix) + 1 : -len('/acc_mean')]} {summary[key]:.3f}"
                 for key in sorted(summary)
                 if key.startswith(prefix + "/") and key.endswith("/acc_mean")]  # fmt: skip
        if parts:
            lines.append(f"{label} accuracy (each client's model, mean): " + " | ".join(parts))
    return "\n".join(lines)


def format_round(round_: int, rounds: int, metrics: Metrics, seconds: float) -> str:
    """The console line of one round."""
    parts = [f"[bold]round {round_:>3}/{rounds}[/bold]"]
    if "train/acc" in metrics:
        parts.append(f"train acc {metrics['train/acc']:.3f}")
    for key in sorted(metrics):
        if key.startswith(("val/", "fed/")) and key.endswith(("/acc", "/acc_mean")):
            label = key.replace("/acc_mean", " (mean over clients)").replace("/acc", "")
            parts.append(f"{label} {metrics[key]:.3f}")
    parts.append(f"{seconds:.1f} s")
    return " | ".join(parts)


# --------------------------------------------------------------------------- finishing


def summary(run: Run, setup_: Setup, title: str, bn_sync: str) -> dict[str, Any]:
    """The final summary fields every run has."""
    spec, result = run.spec, run.result
    last_round = result.rounds[-1].round if result.rounds else 0
    out: dict[str, Any] = {
        "title": title,
        "strategy": spec.strategy.name,
        "bn_sync": bn_sync,
        "norm": spec.model.norm,
        "model": spec.model.name,
        "num_parameters": count_parameters(setup_.model),
        "num_clients": len(setup_.clients),
        "client_names": [c.name for c in setup_.clients],
        "num_classes": setup_.data.num_classes,
        "label_names": list(setup_.data.label_names),
        "eval_batch_size": spec.train.eval_batch_size,
        "device": spec.device,
        "device_name": device_name(spec.device),
        "rounds_completed": last_round,
        "complete": last_round >= spec.train.rounds,
        "wall_s": time.perf_counter() - run.started,
        "wandb_dir": run.recorder.wandb.run_path if run.recorder else None,
    }
    if result.rounds:
        last = result.rounds[-1].metrics
        out.update({f"final/{k}": v for k, v in last.items() if "/acc" in k or "/loss" in k})
    return out


def final_modes(spec: RunSpec, model: nn.Module) -> list[str]:
    """The modes of the final evaluation.

    The configured ones, plus the fresh-statistics references of every
    BatchNorm arm (``recalibrated``; for ``bn.sync=full`` also
    ``fresh_average``, see :class:`~fedkws.core.evaluation.Evaluator`).
    """
    modes = list(spec.bn.eval_modes)
    if not bn_layers(model) or (keeps_client_state(spec.bn.sync) and not spec.strategy.central):
        return [m for m in modes if m != "recalibrated"]
    if "recalibrated" not in modes:
        modes.append("recalibrated")
    if spec.bn.sync == "full" and not spec.strategy.central:
        modes.append("fresh_average")
    return modes


def final_evaluation(
    evaluator: Evaluator,
    model: nn.Module,
    setup_: Setup,
    run_dir: Path,
    modes: list[str],
    plots: bool = True,
) -> dict[str, Any]:
    """Validation and test in every final mode, with speaker-clustered 95 % intervals.

    Also the test split's per-class accuracy and confusion matrices (plotted if ``plots``).

    The recalibrated modes use the evaluator's last recalibration (of the final
    model); without one they are skipped.
    """
    recal = evaluator.last_recalibrated
    if recal is None:
        modes = [m for m in modes if m not in ("recalibrated", "fresh_average")]
    out: dict[str, Any] = {}
    speakers = bootstrap_clusters(setup_.data)
    for prefix, rows in (("final/val", setup_.val_rows), ("test", setup_.test_rows)):
        metrics, stats = evaluator.run(model, rows, prefix, recal, modes)
        out.update(metrics)
        out.update(intervals(stats, speakers, prefix, evaluator.order_seed))
    names = setup_.data.label_names
    for mode, st in stats.items():
        out[f"test/{mode}/per_class_acc"] = {
            name: (None if np.isnan(a) else float(a))
            for name, a in zip(names, st.per_class_acc(), strict=True)
        }
        out[f"test/{mode}/confusion"] = st.confusion.tolist()
        if plots:
            plot_confusion(st.confusion, names, mode, run_dir / f"confusion_{mode}.png")
    if recal is not None and recal is not model:
        stats_only = {k: v.cpu() for k, v in recal.state_dict().items() if "running_" in k}
        torch_save(run_dir / "recalibrated_bn.pt", stats_only)
    return out


# What a complete run's final evaluation (and fedkws caveat) wrote of its final model.
FINAL_FILES = (*(f"confusion_{mode}.png" for mode in (*EVAL_MODES, "fresh_average")),
               "recalibrated_bn.pt", "caveat.md", "caveat.csv", "caveat.png")  # fmt: skip


def remove_final_files(run_dir: Path, plots: bool) -> None:
    """Remove what describes the model before a resumed run's new rounds, saying so.

    Called once the first new round is checkpointed: a finished run extended with more
    rounds (``train.rounds`` raised) would otherwise keep its old confusion matrices,
    exact statistics and caveat beside the new model (until its new final evaluation,
    which writes no caveat); one stopped before that keeps them with its model. With
    ``plots`` off, ``accuracy.png`` too: it would not be drawn again.
    """
    names = FINAL_FILES if plots else (*FINAL_FILES, "accuracy.png")  # else redrawn
    stale = [run_dir / name for name in names if (run_dir / name).is_file()]
    for path in stale:
        path.unlink()
    if stale:
        they = "it describes" if len(stale) == 1 else "they describe"
        console.print(
            f"removed the earlier final model's {', '.join(p.name for p in stale)}: {they} "
            "the model before these rounds"
        )


def bootstrap_clusters(data: CachedDataset) -> np.ndarray:
    """The resampling unit of every example: its speaker; each silence slice on its own.

    Silence examples are independent random slices of background noise, not
    utterances of one speaker, so they must not form one cluster.
    """
    codes = np.asarray(data.speakers).copy()
    silent = np.asarray(data.speaker_names)[codes] == "_silence_"
    codes[silent] = len(data.speaker_names) + np.arange(int(silent.sum()))
    return codes


def intervals(stats: dict, speakers: np.ndarray, prefix: str, seed: int) -> dict[str, Any]:
    """Speaker-clustered bootstrap 95 % intervals of each mode's accuracy.

    And paired intervals of the differences between modes (same model, same examples).
    """
    from fedkws.core.stats import cluster_bootstrap_ci, paired_difference_ci

    out: dict[str, Any] = {}
    for mode, st in stats.items():
        lo, hi = cluster_bootstrap_ci(st.correct, speakers[st.rows], seed=seed)
        out[f"{prefix}/{mode}/acc_ci95"] = [lo, hi]
    modes = list(stats)
    for i, a in enumerate(modes):
        for b in modes[i + 1 :]:
            sa, sb = stats[a], stats[b]
            assert np.array_equal(sa.rows, sb.rows)  # paired: the same examples in one order
            diff, lo, hi = paired_difference_ci(
                sa.correct, sb.correct, speakers[sa.rows], seed=seed
            )
            out[f"{prefix}/diff/{a}-{b}"] = {"diff": diff, "ci95": [lo, hi]}
    return out


def plot_confusion(confusion: np.ndarray, labels, mode: str, path: Path) -> None:
    """Row-normalised confusion matrix of one evaluation mode."""
    with figure(path, figsize=(6, 5.2)) as (_, ax):
        norm = confusion / confusion.sum(1, keepdims=True).clip(min=1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ticks = range(len(labels))
        ax.set_xticks(ticks, labels, rotation=60, fontsize=7)
        ax.set_yticks(ticks, labels, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        acc = np.trace(confusion) / max(confusion.sum(), 1)
        ax.set_title(f"test confusion, {mode} mode (acc {acc:.3f})")
