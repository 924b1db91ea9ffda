"""Turn a sweep (folders of ``results.json``) into one table.

Runs whose folders differ only in ``seed=N`` form one row (a *cell*). A run
folder that Hydra created (it has ``.hydra/``) but that has no finished
``results.json`` (crashed, killed or still running) is listed in the row's
``missing`` column and below the table, never silently dropped. Rows of
centralised runs (``strategy: central``) come first: they are the reference
the federated rows are read against; the other rows follow in name order.

What a cell shows
-----------------
Accuracy columns are the summary keys ``final/val/<mode>/acc``,
``final/fed/<mode>/acc_mean`` and ``test/<mode>/acc`` (shown without
``final/``). Paired-difference columns are the keys
``<prefix>/diff/<modeA>-<modeB>`` (``<prefix>`` one of ``final/val``,
``final/fed``, ``test``), each a ``{"diff": d, "ci95": [lo, hi]}``.

* **one finished seed**: the run's value, then ``[lo, hi]`` = the run's own
  95 % interval: ``<key>_ci95`` for an accuracy (a bootstrap over test
  *speakers*, :func:`fedkws.core.stats.cluster_bootstrap_ci`), the ``ci95`` of
  a difference (:func:`fedkws.core.stats.paired_difference_ci`). No interval is
  shown when the run did not record one.
* **n >= 2 finished seeds**: ``mean ± sd`` (sample standard deviation over
  the seeds), then ``[lo, hi]`` = ``mean ± t_{0.975, n-1} * sd / sqrt(n)``, the
  t interval of the mean over seeds (:func:`fedkws.core.stats.t_interval`),
  clipped to the possible range ([0, 1] for an accuracy, [-1, 1] for a
  difference). The per-seed bootstrap bounds are *not* averaged: averaging
  bounds is not an interval of anything. The seeds' spread contains
  everything that changes with the seed (initialisation, data order, client
  sampling, partition); the test set is the same for all seeds, so its speaker-sampling uncertainty
  is what each run's own ``_ci95`` measures (read it from a single-seed row or
  the run's ``results.json``).

Differences are printed with a sign (``+0.012``). ``-`` marks a value no
finished run of the row recorded; ``missing`` marks a row none of whose runs
finished.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hydra.experimental.callback import Callback

from fedkws.core.stats import t_interval
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


_ACC = re.compile(r"(final/(val|fed)|test(/fedbn)?)/[a-z_]+/acc(_mean)?")
_DIFF = re.compile(r"(final/(val|fed)|test)/diff/[a-z_]+-[a-z_]+")
_PREFIXES = {"final/val": 0, "final/fed": 1, "test": 2, "test/fedbn": 3}


def _columns(results: list[Result]) -> list[str]:
    """Accuracy then difference keys, grouped by ``final/val``, ``final/fed``, ``test``."""
    keys: set[str] = set()
    for res in results:
        keys.update(k for k in res.summary if _ACC.fullmatch(k) or _DIFF.fullmatch(k))

    def order(key: str) -> tuple[int, int, str]:
        prefix = key.split("/diff/")[0] if _DIFF.fullmatch(key) else key.rsplit("/", 2)[0]
        return (_PREFIXES[prefix], int(bool(_DIFF.fullmatch(key))), key)

    return sorted(keys, key=order)


def _bounds(raw: object) -> tuple[float, float] | None:
    """``[lo, hi]`` as floats, or None when absent or not finite (written as null)."""
    if (
        isinstance(raw, list | tuple)
        and len(raw) == 2
        and all(isinstance(b, int | float) and np.isfinite(b) for b in raw)
    ):
        return float(raw[0]), float(raw[1])
    return None


def _values(results: list[Result], key: str) -> list[tuple[float, tuple[float, float] | None]]:
    """Each run's value of ``key`` with its own 95 % interval (runs without it skipped)."""
    out = []
    for res in results:
        raw = res.summary.get(key)
        if _DIFF.fullmatch(key):
            if isinstance(raw, dict) and isinstance(raw.get("diff"), int | float):
                out.append((float(raw["diff"]), _bounds(raw.get("ci95"))))
        elif isinstance(raw, int | float) and not isinstance(raw, bool):
            out.append((float(raw), _bounds(res.summary.get(f"{key}_ci95"))))
    return out


def _fmt(values: list[tuple[float, tuple[float, float] | None]], signed: bool = False) -> str:
    """One cell: value or ``mean ± sd``, then the 95 % interval (rule: module docstring)."""
    if not values:
        return "-"
    num = "{:+.3f}" if signed else "{:.3f}"
    xs = [v for v, _ in values]
    if len(xs) == 1:
        text, interval = num.format(xs[0]), values[0][1]
    else:
        text = f"{num.format(np.mean(xs))} ± {np.std(xs, ddof=1):.3f}"
        lo, hi = t_interval(xs)
        bound = 1.0  # an accuracy lies in [0, 1], a difference of two in [-1, 1]
        interval = (max(lo, -bound if signed else 0.0), min(hi, bound))
    if interval is None:
        return text
    return f"{text} [{num.format(interval[0])}, {num.format(interval[1])}]"


def _is_reference(results: list[Result]) -> bool:
    return any(r.summary.get("strategy") == "central" for r in results)


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
    # The centralised reference row(s) first, then the rest by name.
    for name, cell_runs in sorted(
        cells.items(), key=lambda c: (not _is_reference(done[c[0]]), c[0])
    ):
        results = done[name]
        lost = [r for r in cell_runs if not r.complete]
        not_done += [
            f"{_relative(r.folder, base)} "
            f"({'no results.json' if r.result is None else 'unfinished results.json'})"
            for r in lost
        ]
        missing = ", ".join(_label(r.folder, base) for r in lost) or "-"
        lines.append("| " + " | ".join(_row(name, results, missing, columns)) + " |")
    table = "\n".join(lines)
    table += (
        "\n\ncells: one seed: value [its run's 95 % speaker-bootstrap interval]; "
        "n >= 2 seeds: mean ± sd [95 % t interval of the mean over seeds]"
    )
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


def _row(name: str, results: list[Result], missing: str, columns: list[str]) -> list[str]:
    """One cell's row: its settings, then each column over its seeds."""
    if not results:
        return [name, "0", missing, "-", "-", "-", "-"] + ["missing"] * len(columns) + ["-"]
    s = results[0].summary
    row = [name, str(len(results)), missing]
    row += [str(s.get(k, "-")) for k in ("strategy", "bn_sync", "norm", "rounds_completed")]
    for col in columns:
        row.append(_fmt(_values(results, col), signed=bool(_DIFF.fullmatch(col))))
    walls = [r.summary["wall_s"] for r in results if "wall_s" in r.summary]
    row.append(f"{np.mean(walls):.0f}" if walls else "-")
    return row


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
