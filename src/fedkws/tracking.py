"""Run records: ``results.json`` (the source of truth), W&B mirror, plots.

``results.json`` is rewritten after every round, so an interrupted run still
has every finished round on disk. W&B receives the same numbers and is only
ever touched from the driver process (Flower's ServerApp thread), never from
the Ray actors.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedkws.errors import ConfigError
from fedkws.fileio import write_json
from fedkws.plots import figure

__all__ = [
    "LOGGER_MODES",
    "Recorder",
    "Result",
    "RoundRecord",
    "WandbLogger",
    "accuracy_keys",
    "draw_accuracy",
    "plot_accuracy",
    "write_json",
]

log = logging.getLogger(__name__)

LOGGER_MODES: tuple[str, ...] = ("offline", "online", "disabled")


@dataclass
class RoundRecord:
    """Everything measured in one round (or one evaluation point of a central run)."""

    round: int
    metrics: dict[str, float]
    seconds: float
    clients: dict[str, dict[str, float]] = field(default_factory=dict)  # per-client numbers


@dataclass
class Result:
    """The content of ``results.json``."""

    config: dict[str, Any]
    rounds: list[RoundRecord] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (non-finite numbers written as null)."""
        return _finite(asdict(self))

    @classmethod
    def load(cls, path: Path | str) -> Result:
        """Read a ``results.json``; ``ValueError`` if it is not one (not JSON, not its shape)."""
        raw = json.loads(Path(path).read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"not a fedkws results.json (a JSON {_json_kind(raw)})")
        for key, kind in (("config", dict), ("summary", dict), ("rounds", list)):
            if key in raw and not isinstance(raw[key], kind):
                raise ValueError(
                    f"not a fedkws results.json (its {key} is a JSON {_json_kind(raw[key])}, "
                    f"not {'an object' if kind is dict else 'an array'})"
                )
        rounds = []
        for r in raw.get("rounds", []):
            try:
                record = RoundRecord(**r)
                if not isinstance(record.metrics, dict) or not isinstance(record.clients, dict):
                    raise TypeError
                rounds.append(record)
            except TypeError:  # a round that is not a fedkws round record
                raise ValueError(
                    "not a fedkws results.json (a round that is not {round, metrics, seconds, "
                    f"clients}}: {json.dumps(r)[:60]})"
                ) from None
        return cls(config=raw.get("config", {}), rounds=rounds, summary=raw.get("summary", {}))

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        """Rounds and values of one metric (rounds where it was not logged are skipped)."""
        xs, ys = [], []
        for rec in self.rounds:
            value = rec.metrics.get(key)
            if value is not None:
                xs.append(rec.round)
                ys.append(value)
        return xs, ys


def _json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words (null, array, object, ...)."""
    kinds = {type(None): "null", bool: "boolean", dict: "object", list: "array", str: "string"}
    return kinds.get(type(value), "number")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


class WandbLogger:
    """The one W&B adapter: resolved config in, ``offline`` by default, finish() always.

    Parameters
    ----------
    mode
        ``offline`` (no account, no network; upload later with ``wandb sync``),
        ``online`` or ``disabled``.
    group, name
        The sweep and the override dirname of this job, so multirun jobs are
        separate runs grouped together.
    init_timeout
        Seconds an ``online`` run may take to reach the server (W&B's default
        when None). If it cannot start (server unreachable, no credentials),
        one warning is logged and the run continues in ``offline`` mode.
    """

    def __init__(
        self,
        mode: str,
        project: str,
        config: dict[str, Any],
        run_dir: Path,
        group: str | None = None,
        name: str | None = None,
        entity: str | None = None,
        tags: list[str] | None = None,
        run_id: str | None = None,
        init_timeout: float | None = None,
    ) -> None:
        if mode not in LOGGER_MODES:
            raise ConfigError(f"logger.mode must be one of {', '.join(LOGGER_MODES)}, got {mode!r}")
        self.mode = mode
        self.run = None
        if mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
            # W&B's own switch wins over the config, as in wandb.init; importing W&B only to
            # get a run that records nothing takes over a second.
            self.mode = "disabled"
            return
        import wandb

        kwargs: dict[str, Any] = dict(
            project=project,
            entity=entity,
            group=group,
            name=name,
            tags=list(tags or []),
            config=config,
            dir=str(run_dir),
            id=run_id,
            resume="allow" if run_id else None,
            reinit="finish_previous",
        )
        quiet: dict[str, Any] = dict(console="off", silent=True, x_disable_stats=True)
        if mode == "offline":
            self.run = wandb.init(mode="offline", settings=wandb.Settings(**quiet), **kwargs)
            return
        timeout = {} if init_timeout is None else {"init_timeout": float(init_timeout)}
        try:
            self.run = wandb.init(
                mode="online", settings=wandb.Settings(**quiet, **timeout), **kwargs
            )
        except (wandb.errors.Error, TimeoutError, OSError) as err:
            # No server, no network or no credentials: the numbers still go to an
            # offline run (and results.json), and training goes on.
            reason = next((line for line in str(err).splitlines() if line.strip()), "")
            log.warning(
                "W&B online run could not start (%s: %s); logging offline instead "
                "(upload later with `wandb sync`)",
                type(err).__name__,
                reason.strip(),
            )
            self.mode = "offline"
            self.run = wandb.init(mode="offline", settings=wandb.Settings(**quiet), **kwargs)

    @property
    def run_id(self) -> str | None:
        """The W&B run id (kept in the checkpoint so a resumed run continues it)."""
        return None if self.run is None else self.run.id

    @property
    def run_path(self) -> str | None:
        """Folder of the local W&B run files."""
        return None if self.run is None else str(Path(self.run.dir).parent)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log one round."""
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        """Set final scalar values on the run summary."""
        if self.run is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.run.summary[key] = value

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Log ``rows`` under ``columns`` as one ``wandb.Table`` (e.g. a sweep's report)."""
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (call from ``finally``)."""
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


class Recorder:
    """Collects round records; writes ``results.json`` and mirrors to W&B."""

    def __init__(
        self, run_dir: Path, result: Result, wandb_logger: WandbLogger, plots: bool = True
    ) -> None:
        self.run_dir = run_dir
        self.result = result
        self.wandb = wandb_logger
        self.plots = plots

    @property
    def path(self) -> Path:
        """Location of ``results.json``."""
        return self.run_dir / "results.json"

    def log_round(self, record: RoundRecord) -> None:
        """Append one round and persist it."""
        self.result.rounds = [r for r in self.result.rounds if r.round < record.round]
        self.result.rounds.append(record)
        write_json(self.path, self.result.to_json())
        self.wandb.log({**record.metrics, "time/round_s": record.seconds}, step=record.round)

    def finish(self, summary: dict[str, Any]) -> None:
        """Write the final summary and (unless switched off) the accuracy plot."""
        self.result.summary = summary
        write_json(self.path, self.result.to_json())
        self.wandb.summary(summary)
        if not self.plots:
            return
        try:
            plot_accuracy(self.result, self.run_dir / "accuracy.png")
        except Exception as err:  # a plot must never cost the results
            log.warning("could not draw accuracy.png: %s", err)


def accuracy_keys(result: Result) -> list[str]:
    """The metrics drawn by :func:`plot_accuracy`: every ``*/acc`` and ``*/acc_mean``."""
    keys = sorted({k for r in result.rounds for k in r.metrics if k.endswith("/acc")})
    keys += sorted({k for r in result.rounds for k in r.metrics if k.endswith("/acc_mean")})
    return keys


def draw_accuracy(ax: Any, result: Result) -> Any:
    """Draw accuracy per round onto ``ax`` and return it.

    One line per evaluation mode (``val/<mode>/acc``, ``fed/<mode>/acc_mean``
    with a +-1 std band), the training accuracy dashed, and the chance level
    when the number of classes is known. Each line is labelled with its metric
    name, so the legend lists exactly what was drawn.
    """
    for key in accuracy_keys(result):
        xs, ys = result.curve(key)
        style = "--" if key.startswith("train/") else "-"
        ax.plot(xs, ys, style, marker="o", markersize=3, label=key)
        if key.endswith("/acc_mean"):
            _, sd = result.curve(key[: -len("_mean")] + "_std")
            if len(sd) == len(ys):
                lo = [m - s for m, s in zip(ys, sd, strict=True)]
                hi = [m + s for m, s in zip(ys, sd, strict=True)]
                ax.fill_between(xs, lo, hi, alpha=0.2)
    num_classes = result.summary.get("num_classes") or result.config.get("num_classes")
    if num_classes:
        ax.axhline(1.0 / num_classes, color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(result.summary.get("title", "accuracy per round"))
    ax.legend(fontsize=8)
    return ax


def plot_accuracy(result: Result, path: Path | str) -> Path:
    """Write ``path`` (PNG): the accuracy curves of :func:`draw_accuracy`."""
    with figure(path) as (_fig, ax):
        draw_accuracy(ax, result)
    return Path(path)
