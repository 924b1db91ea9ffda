"""Turn a sweep (folders of ``results.json``) into one table.

Runs whose folders differ only in ``seed=N`` form one row: the value is the
mean over seeds, with the standard deviation when there are several.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from hydra.experimental.callback import Callback

from fedkws.errors import ConfigError
from fedkws.tracking import Result

_SEED_DIR = re.compile(r"^seed=\d+$")


def find_results(paths: list[Path]) -> list[Path]:
    """Every ``results.json`` at or under ``paths``."""
    found: list[Path] = []
    for path in paths:
        if path.is_file() and path.name == "results.json":
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.rglob("results.json")))
        else:
            raise ConfigError(f"{path} is neither a run folder nor a results.json")
    if not found:
        raise ConfigError(f"no results.json under {', '.join(map(str, paths))}")
    return found


def _cell_name(path: Path, base: Path) -> str:
    folder = path.parent
    parts = folder.relative_to(base).parts if folder.is_relative_to(base) else folder.parts[-2:]
    parts = tuple(p for p in parts if not _SEED_DIR.match(p))
    return "/".join(parts) or folder.name


def _columns(results: list[Result]) -> list[str]:
    keys: set[str] = set()
    for res in results:
        keys.update(
            k for k in res.summary if re.fullmatch(r"(final/(val|fed)|test)/[a-z]+/acc(_mean)?", k)
        )
    order = {"final/val": 0, "final/fed": 1, "test": 2}
    return sorted(keys, key=lambda k: (order[k.rsplit("/", 2)[0]], k))


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def report(paths: list[Path], markdown: Path | None = None, plot: Path | None = None) -> str:
    """A Markdown table of every run under ``paths`` (seeds of one cell merged)."""
    files = find_results([Path(p) for p in paths])
    base = Path(paths[0]) if Path(paths[0]).is_dir() else Path(paths[0]).parent
    cells: dict[str, list[Result]] = defaultdict(list)
    for f in files:
        cells[_cell_name(f, base)].append(Result.load(f))
    columns = _columns([r for rs in cells.values() for r in rs])
    header = (
        ["run", "seeds", "strategy", "bn_sync", "norm", "rounds"]
        + [c.removeprefix("final/") for c in columns]
        + ["wall s"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, runs in sorted(cells.items()):
        s = runs[0].summary
        row = [
            name,
            str(len(runs)),
            str(s.get("strategy", "-")),
            str(s.get("bn_sync", "-")),
            str(s.get("norm", "-")),
            str(s.get("rounds_completed", "-")),
        ]
        for col in columns:
            row.append(_fmt([r.summary[col] for r in runs if r.summary.get(col) is not None]))
        walls = [r.summary["wall_s"] for r in runs if "wall_s" in r.summary]
        row.append(f"{np.mean(walls):.0f}" if walls else "-")
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)
    if markdown is not None:
        markdown.write_text(table + "\n")
    if plot is not None:
        _plot(cells, plot)
    return table


def _plot(cells: dict[str, list[Result]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, runs in sorted(cells.items()):
        res = runs[0]
        key = "val/eval/acc" if res.curve("val/eval/acc")[0] else "fed/eval/acc_mean"
        xs, ys = res.curve(key)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=f"{name} ({key})")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (eval mode)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class SweepReport(Callback):
    """Hydra callback: at the end of a multirun, print and save the sweep's table.

    Writes ``report.md`` and ``report.png`` (eval-mode accuracy per round, one
    line per cell) into the sweep folder.
    """

    def on_multirun_end(self, config, **kwargs) -> None:  # noqa: ANN001
        """Called by Hydra once every job of the sweep has finished."""
        sweep = Path(config.hydra.sweep.dir)
        try:
            table = report([sweep], markdown=sweep / "report.md", plot=sweep / "report.png")
        except ConfigError as err:
            print(f"no report: {err}")
            return
        print(f"\nSweep {sweep}\n{table}")
        print(f"(table: {sweep / 'report.md'}, curves: {sweep / 'report.png'})")
