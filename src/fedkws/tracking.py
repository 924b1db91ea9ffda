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

log = logging.getLogger(__name__)


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
        """Read a ``results.json``."""
        raw = json.loads(Path(path).read_text())
        rounds = [RoundRecord(**r) for r in raw.get("rounds", [])]
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


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


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
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode must be offline, online or disabled, got '{mode}'")
        self.mode = mode
        self.run = None
        if mode == "disabled":
            return
        import wandb

        self.run = wandb.init(
            mode=mode,
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
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )

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

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (call from ``finally``)."""
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


class Recorder:
    """Collects round records; writes ``results.json`` and mirrors to W&B."""

    def __init__(self, run_dir: Path, result: Result, wandb_logger: WandbLogger) -> None:
        self.run_dir = run_dir
        self.result = result
        self.wandb = wandb_logger

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
        """Write the final summary and the plots."""
        self.result.summary = summary
        write_json(self.path, self.result.to_json())
        self.wandb.summary(summary)
        try:
            plot_accuracy(self.result, self.run_dir / "accuracy.png")
        except Exception as err:  # a plot must never cost the results
            log.warning("could not draw accuracy.png: %s", err)


def plot_accuracy(result: Result, path: Path) -> Path:
    """Accuracy per round: one line per evaluation mode, plus training accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in result.rounds for k in r.metrics if k.endswith("/acc")})
    keys += sorted({k for r in result.rounds for k in r.metrics if k.endswith("/acc_mean")})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key in keys:
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
