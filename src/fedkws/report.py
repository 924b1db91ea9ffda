"""Turn a sweep (folders of ``results.json``) into one table.

Runs whose folders differ only in ``seed=N`` form one row: the value is the
mean over seeds, with the sample standard deviation (``mean ± std``) when there
are several. A run folder that Hydra created (it has ``.hydra/``) but that has
no finished ``results.json`` (crashed, killed or still running) is listed in
the row's ``missing`` column and below the table, never silently dropped.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hydra.experimental.callback import Callback

from fedkws.errors import ConfigError
from fedkws.fileio import write_text
from fedkws.plots import figure
from fedkws.tracking import Result

_SEED_DIR = re.compile(r"^seed=\d+$")


@dataclass
class Run:
    """One run folder: its result, or None when it has no finished ``results.json``."""

    folder: Path
    result: Result | None

    @property
    def complete(self) -> bool:
        """Whether the run finished (its summary says so)."""
        return self.result is not None and bool(self.result.summary.get("complete"))


def find_results(paths: list[Path]) -> list[Path]:
    """Every ``results.json`` at or under ``paths``."""
    found = [run.folder / "results.json" for run in find_runs(paths) if run.result is not None]
    if not found:
        raise ConfigError(f"no results.json under {', '.join(map(str, paths))}")
    return found


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run at or under ``paths``: folders with a ``results.json`` or a ``.hydra/``."""
    folders: dict[Path, bool] = {}
    for path in map(Path, paths):
        if path.is_file() and path.name == "results.json":
            folders[path.parent] = True
        elif path.is_dir():
            for f in path.rglob("results.json"):
                folders[f.parent] = True
            for h in path.rglob(".hydra"):
                if h.is_dir() and (h / "config.yaml").is_file():
                    folders.setdefault(h.parent, False)
        else:
            raise ConfigError(f"{path} is neither a run folder nor a results.json")
    if not folders:
        raise ConfigError(f"no run folder or results.json under {', '.join(map(str, paths))}")
    runs = []
    for folder, has_result in sorted(folders.items()):
        result = None
        if has_result:
            try:
                result = Result.load(folder / "results.json")
            except (OSError, ValueError, TypeError) as err:  # unreadable: report, don't crash
                raise ConfigError(f"cannot read {folder / 'results.json'}: {err}") from err
        runs.append(Run(folder, result))
    return runs


def _cell_name(folder: Path, base: Path) -> str:
    parts = folder.relative_to(base).parts if folder.is_relative_to(base) else folder.parts[-2:]
    parts = tuple(p for p in parts if not _SEED_DIR.match(p))
    return "/".join(parts) or folder.name


def _relative(folder: Path, base: Path) -> str:
    if folder != base and folder.is_relative_to(base):
        return str(folder.relative_to(base))
    return str(folder)


def _label(folder: Path, base: Path) -> str:
    """How a run is named inside its row (its seed folder, else its path)."""
    return folder.name if _SEED_DIR.match(folder.name) else _relative(folder, base)


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
    runs = find_runs([Path(p) for p in paths])
    base = Path(paths[0]) if Path(paths[0]).is_dir() else Path(paths[0]).parent
    cells: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        cells[_cell_name(run.folder, base)].append(run)
    done = {name: [r.result for r in rs if r.complete] for name, rs in cells.items()}
    columns = _columns([res for rs in done.values() for res in rs])
    header = (
        ["run", "seeds", "missing", "strategy", "bn_sync", "norm", "rounds"]
        + [c.removeprefix("final/") for c in columns]
        + ["wall s"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    not_done: list[str] = []
    for name, cell_runs in sorted(cells.items()):
        results = done[name]
        lost = [r for r in cell_runs if not r.complete]
        not_done += [
            f"{_relative(r.folder, base)} "
            f"({'no results.json' if r.result is None else 'unfinished results.json'})"
            for r in lost
        ]
        missing = ", ".join(_label(r.folder, base) for r in lost) or "-"
        if not results:
            row = [name, "0", missing, "-", "-", "-", "-"] + ["missing"] * len(columns) + ["-"]
            lines.append("| " + " | ".join(row) + " |")
            continue
        s = results[0].summary
        row = [
            name,
            str(len(results)),
            missing,
            str(s.get("strategy", "-")),
            str(s.get("bn_sync", "-")),
            str(s.get("norm", "-")),
            str(s.get("rounds_completed", "-")),
        ]
        for col in columns:
            row.append(_fmt([r.summary[col] for r in results if r.summary.get(col) is not None]))
        walls = [r.summary["wall_s"] for r in results if "wall_s" in r.summary]
        row.append(f"{np.mean(walls):.0f}" if walls else "-")
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)
    if not_done:
        table += f"\n\nmissing ({len(not_done)} run(s) without a finished results.json):\n"
        table += "\n".join(f"- {item}" for item in not_done)
    outputs = [(markdown, lambda p: write_text(p, table + "\n")), (plot, lambda p: _plot(done, p))]
    for target, write in outputs:
        if target is not None:
            try:
                write(Path(target))
            except OSError as err:  # e.g. --markdown into a folder that does not exist
                raise ConfigError(f"cannot write {target}: {err.strerror or err}") from err
    return table


def _plot(cells: dict[str, list[Result]], path: Path) -> None:
    with figure(path, figsize=(8, 4.5)) as (_fig, ax):
        for name, results in sorted(cells.items()):
            if not results:
                continue
            res = results[0]
            key = "val/eval/acc" if res.curve("val/eval/acc")[0] else "fed/eval/acc_mean"
            xs, ys = res.curve(key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=f"{name} ({key})")
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy (eval mode)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)


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
