"""Turn a sweep (folders of ``results.json``) into one table, a CSV and two plots.

Runs whose folders differ only in ``seed=N`` form one row (a *cell*). A run
folder that Hydra created (it has ``.hydra/``) but that has no finished
``results.json`` (crashed, killed or still running) is listed in the row's
``missing`` column and below the table, never silently dropped; so is a job
a stopped sweep never started (its ``multirun.yaml`` says which). Rows of
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

Against the centralised reference
---------------------------------
A second table, below the first, reads each other cell against one
centralised cell (column ``reference``): the one whose folder name shares the
most overrides with the cell's (``strategy=...`` left out), then the one with
the cell's ``norm``, then the first by name. A sweep without a centralised
cell has no such table (one line says so; the CSV's columns stay empty). The
table is written without the outer pipes (valid GFM), so that whatever reads
the report's ``|``-lines reads only the main table.

* ``<split>/<mode>/acc vs central`` (``val`` and ``test``): per seed, the
  cell's accuracy minus the reference's in the same mode and split, for the
  seeds both have (``seed`` of the run's config); then one seed: that
  difference, n >= 2: ``mean ± sd [t interval]`` over the seeds as above.
* ``rounds to 90% (<mode>)``: per seed, the first round whose
  ``val/<mode>/acc`` is at least ``0.9 x`` the same seed's centralised
  ``final/val/eval/acc``; the mean over the seeds that reach it, with
  ``(k/n seeds)`` when only k of n do; ``never`` when none does.
* ``partition``: the federated cell's client split (scheme, Dirichlet alpha,
  feature-shift channels).

``wall s`` (main table) is the mean wall time of the finished runs.

Outputs
-------
The Markdown tables (:func:`report`, ``report.md``); the CSV (``report.csv``,
one row per cell: ``cell``, ``seeds``, ``missing`` (the runs without a
finished ``results.json``), ``strategy``, ``bn_sync``, ``norm``,
``partition``, ``rounds``, ``reference``; for every value column
``<column>_mean``, ``_sd``, ``_ci_lo``, ``_ci_hi``, ``_n`` (values as in the
tables, unrounded, ``vs central`` written ``_vs_central``; empty where a
table has ``-``); ``rounds_to_90/<mode>``
(empty when never reached), ``_reached`` and ``_n`` (seeds); ``wall_s``);
``report.png``, one panel per cell: ``val/<mode>/acc`` per round (else
``fed/<mode>/acc_mean``), the mean over seeds with their range (min to max)
shaded; ``report_bars.png``: final test accuracy per cell (groups) and mode
(bars) with the table's 95 % interval; for a sweep over two axes (``arm`` x
``partition``), ``report_grid.png`` (:mod:`fedkws.grid`). With W&B on,
:func:`log_to_wandb`.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback

from fedkws import claims
from fedkws.core.stats import t_interval
from fedkws.errors import FAILED_FILE, ConfigError, read_failure
from fedkws.fileio import write_text
from fedkws.grid import draw_grid
from fedkws.plots import figure
from fedkws.tracking import Result, WandbLogger

_SEED_DIR = re.compile(r"^seed=\d+$")


@dataclass
class Run:
    """One run folder: its result, or None when it has no finished ``results.json``."""

    folder: Path
    result: Result | None
    problem: str = ""  # why it has no result, when that is not simply a missing file

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


def _folders(top: Path) -> Iterator[Path]:
    """``top`` and every folder below it, through links to folders (each real folder once)."""
    seen: set[str] = set()
    for here, subfolders, _ in os.walk(top, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:  # a link back up, or a second link to one folder
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = [d for d in subfolders if d not in ("wandb", ".hydra")]
        yield Path(here)


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run at or under ``paths``: folders with a ``results.json`` or a ``.hydra/``."""
    folders: dict[Path, bool] = {}
    named: dict[str, Path] = {}  # one run given two ways (./a, /abs/a, a link) counts once

    def add(folder: Path, has_result: bool) -> None:
        folder = named.setdefault(os.path.realpath(folder), folder)
        folders[folder] = folders.get(folder, False) or has_result

    for path in map(Path, paths):
        if path.is_file() and path.name == "results.json":
            add(path.parent, True)
        elif path.is_dir():
            for folder in _folders(path):
                if (folder / "results.json").is_file():
                    add(folder, True)
                elif (folder / ".hydra" / "config.yaml").is_file() or any(
                    (folder / name).is_file() for name in (FAILED_FILE, "checkpoint.pt")
                ):  # a run that did not finish (failed, stopped, killed)
                    add(folder, False)
        elif not path.exists():
            raise ConfigError(f"{path}: no such file or folder")
        else:
            raise ConfigError(f"{path} is neither a run folder nor a results.json")
    not_started = set()
    for path in (Path(p) for p in paths if (Path(p) / "multirun.yaml").is_file()):
        top = Path(os.path.realpath(path))
        under = [f for f in folders if Path(os.path.realpath(f)).is_relative_to(top)]
        for folder in _never_started(path, {os.path.realpath(f) for f in under}):
            if os.path.realpath(folder) not in named:
                add(folder, False)
                not_started.add(folder)
    if not folders:
        raise ConfigError(f"no run folder or results.json under {', '.join(map(str, paths))}")
    runs = []
    for folder, has_result in sorted(folders.items()):
        result, problem = None, ""
        if folder in not_started:
            problem = "not started: the sweep stopped before it, or is still running"
        if has_result:
            try:
                result = Result.load(folder / "results.json")
            except (OSError, ValueError, TypeError) as err:  # listed as missing, with why
                problem = f"unreadable results.json: {' '.join(str(err).split())[:120]}"
        runs.append(Run(folder, result, problem))
    return runs


def _never_started(sweep: Path, found: set[str]) -> list[Path]:
    """The job folders a sweep's ``multirun.yaml`` promises and that do not exist.

    A sweep stopped by Ctrl-C or SIGTERM never made its later jobs' folders. They are
    rebuilt as Hydra names them (:func:`fedkws.train.job_folders`), and only when every
    job folder ``found`` (real paths) is one of them: a list that cannot be checked
    against the sweep's own folders is not given.
    """
    from omegaconf import OmegaConf

    from fedkws.train import job_folders

    try:
        jobs = job_folders(OmegaConf.load(sweep / "multirun.yaml"))
    except Exception as err:  # noqa: BLE001 - not a multirun.yaml fedkws can read: said
        why = " ".join(str(err).split())[:120] or type(err).__name__
        print(f"warning: {sweep / 'multirun.yaml'} cannot be read ({why}): the sweep's jobs "
              "that never started are not listed", file=sys.stderr)  # fmt: skip
        return []
    expected = [Path(os.path.normpath(sweep / folder)) for _, folder in jobs or []]
    if not expected or not found <= {os.path.realpath(p) for p in expected}:
        return []
    return [p for p in expected if os.path.realpath(p) not in found]


def _why_missing(run: Run) -> str:
    if failure := read_failure(run.folder):
        return f"failed: {failure}"
    return "no results.json" if run.result is None else "unfinished results.json"


def _cell_name(folder: Path, base: Path) -> str:
    parts = folder.relative_to(base).parts if folder.is_relative_to(base) else folder.parts[-2:]
    kept = tuple(p for p in parts if not _SEED_DIR.match(p))
    if kept:
        return "/".join(kept)
    # Seed folders straight under the sweep (a sweep of seeds only): one cell, the sweep's.
    return (base.resolve().name or str(base)) if parts else folder.name


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


Values = list[tuple[float, tuple[float, float] | None]]


def _stats(
    values: Values, signed: bool = False
) -> tuple[float, float | None, tuple[float, float] | None] | None:
    """``(mean, sd, 95 % interval)`` of one cell's values (rule: module docstring).

    One value: the value, no sd, and its run's own interval (None if it has none).
    """
    if not values:
        return None
    xs = [v for v, _ in values]
    if len(xs) == 1:
        return xs[0], None, values[0][1]
    lo, hi = t_interval(xs)
    bound = 1.0  # an accuracy lies in [0, 1], a difference of two in [-1, 1]
    interval = (max(lo, -bound if signed else 0.0), min(hi, bound))
    return float(np.mean(xs)), float(np.std(xs, ddof=1)), interval


def _fmt(values: Values, signed: bool = False) -> str:
    """One cell: value or ``mean ± sd``, then the 95 % interval (rule: module docstring)."""
    stats = _stats(values, signed)
    if stats is None:
        return "-"
    mean, sd, interval = stats
    num = "{:+.3f}" if signed else "{:.3f}"
    text = num.format(mean) if sd is None else f"{num.format(mean)} ± {sd:.3f}"
    if interval is None:
        return text
    return f"{text} [{num.format(interval[0])}, {num.format(interval[1])}]"


def _configured_strategy(folder: Path) -> str | None:
    """The strategy a run folder's kept configuration (``.hydra/config.yaml``) names."""
    import yaml

    try:
        config = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())
        return str(config["strategy"]["name"])
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        return None


def _is_reference(results: list[Result]) -> bool:
    return any(r.summary.get("strategy") == "central" for r in results)


def _number(raw: object) -> float | None:
    if isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw):
        return float(raw)
    return None


def _seed(result: Result) -> object:
    return result.config.get("seed", result.summary.get("seed"))


@dataclass
class Cell:
    """The runs of one row (they differ only in ``seed=N``) and its centralised reference."""

    name: str
    runs: list[Run]
    reference: Cell | None = None

    @property
    def results(self) -> list[Result]:
        """The finished runs' results."""
        return [r.result for r in self.runs if r.complete]

    @property
    def lost(self) -> list[Run]:
        """The runs without a finished ``results.json``."""
        return [r for r in self.runs if not r.complete]

    @property
    def central(self) -> bool:
        """Whether this is a centralised (reference) cell.

        Read from the finished runs, or, when none finished (every job failed), from
        the configuration the runs kept: such a cell is not a federated row to compare.
        """
        if self.results:
            return _is_reference(self.results)
        return any(_configured_strategy(r.folder) == "central" for r in self.runs)

    def pairs(self) -> list[tuple[Result, Result]]:
        """Each finished run with its reference's finished run of the same seed."""
        if self.reference is None:
            return []
        ref = {_seed(r): r for r in self.reference.results}
        return [(r, ref[_seed(r)]) for r in self.results if _seed(r) in ref]


def _tokens(name: str) -> set[str]:
    """The overrides of a cell name, its strategy left out."""
    parts = (t for part in name.split("/") for t in _items(part))
    return {t for t in parts if not t.startswith("strategy=")}


def _items(name: str) -> list[str]:
    r"""A cell name's ``key=value`` items: Hydra's override dirname split at its commas.

    A comma inside brackets, braces or quotes, or escaped (``\,``), belongs to its
    value (``model.channels=[4,4],seed=0`` is two items).
    """
    items, depth, quote, start, escaped = [], 0, "", 0, False
    for i, ch in enumerate(name):
        if escaped:  # Hydra's `\,`: a comma of the value
            escaped = False
        elif ch == "\\":
            escaped = True
        elif quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(name[start:i])
            start = i + 1
    return [*items, name[start:]]


def cell_overrides(name: str) -> dict[str, str] | None:
    """A cell name as ``{key: value}`` (see :func:`_items`), or None if it is not one."""
    pairs = [item.split("=", 1) for item in _items(name)]
    if any(len(pair) != 2 or not pair[0] for pair in pairs):
        return None
    return dict(pairs)


def _pick_reference(cell: Cell, centrals: list[Cell]) -> Cell | None:
    """The centralised cell ``cell`` is read against (rule: module docstring)."""
    if cell.central or not cell.results or not centrals:
        return None
    mine, norm = _tokens(cell.name), cell.results[0].summary.get("norm")
    return max(  # max keeps the first (by name) of equals
        centrals,
        key=lambda c: (len(_tokens(c.name) & mine), c.results[0].summary.get("norm") == norm),
    )


def _vs_central(cell: Cell, key: str) -> Values:
    """Per paired seed: the cell's ``key`` minus its centralised reference's."""
    out: Values = []
    for res, ref in cell.pairs():
        a, b = _number(res.summary.get(key)), _number(ref.summary.get(key))
        if a is not None and b is not None:
            out.append((a - b, None))
    return out


REACH = 0.9  # rounds to reach REACH x the centralised final val/eval accuracy
_CENTRAL_ACC = "final/val/eval/acc"


def _rounds_to_reach(cell: Cell, mode: str) -> list[int | None]:
    """Per paired seed: the first round with ``val/<mode>/acc >= REACH x`` the target, or None.

    The target is the same seed's centralised ``final/val/eval/acc``.
    """
    out: list[int | None] = []
    for res, ref in cell.pairs():
        target = _number(ref.summary.get(_CENTRAL_ACC))
        xs, ys = res.curve(f"val/{mode}/acc")
        if target is None or not xs:
            continue
        hit = (x for x, y in zip(xs, ys, strict=True) if y >= REACH * target - 1e-12)
        out.append(next(hit, None))
    return out


def _fmt_rounds(rounds: list[int | None]) -> str:
    reached = [r for r in rounds if r is not None]
    if not rounds:
        return "-"
    if not reached:
        return "never"
    text = f"{np.mean(reached):.1f}"
    return text if len(reached) == len(rounds) else f"{text} ({len(reached)}/{len(rounds)} seeds)"


@dataclass(frozen=True)
class _Stat:
    """A column of per-seed values shown as ``mean ± sd [interval]``."""

    key: str  # the summary key
    vs_central: bool = False  # the per-seed difference to the centralised reference

    @property
    def name(self) -> str:
        base = self.key.removeprefix("final/")
        return f"{base} vs central" if self.vs_central else base

    @property
    def signed(self) -> bool:
        return self.vs_central or bool(_DIFF.fullmatch(self.key))

    def values(self, cell: Cell) -> Values:
        return _vs_central(cell, self.key) if self.vs_central else _values(cell.results, self.key)


_CENTRAL = re.compile(r"(final/val|test)/[a-z_]+/acc")  # compared with the centralised run
_VAL_CURVE = re.compile(r"val/([a-z_]+)/acc")
# The bars' values: the global model's test accuracy per mode, and under FedBN/SiloBN
# (no global model) the mean of each client's own model on the shared test split.
_TEST_ACC = re.compile(r"test/(?:(fedbn)/)?([a-z_]+)/acc(?:_mean)?")


def _bar_label(key: str) -> str:
    fedbn, mode = _TEST_ACC.fullmatch(key).groups()
    return f"{mode} (each client's model, mean)" if fedbn else mode


_MODE_ORDER = ("eval", "train", "recalibrated")
_SETTINGS = ("strategy", "bn_sync", "norm", "partition", "rounds", "reference")


def _mode_key(mode: str) -> tuple[int, str]:
    return (_MODE_ORDER.index(mode) if mode in _MODE_ORDER else len(_MODE_ORDER), mode)


def _partition(result: Result) -> str | None:
    part = result.config.get("partition")
    if result.summary.get("strategy") == "central" or not isinstance(part, dict):
        return None
    text = str(part.get("scheme", "-"))
    if part.get("scheme") == "dirichlet" and "alpha" in part:
        text += f" alpha={part['alpha']}"
    if part.get("channels"):
        text += f" channels={part['channels']}"
    return text


@dataclass
class SweepTable:
    """A sweep read into cells; renders the Markdown table, the CSV and the plots' data."""

    base: Path
    cells: list[Cell]  # centralised cells first, then by name
    stats: list[_Stat]
    modes: list[str]  # modes with a ``val/<mode>/acc`` curve: the rounds-to-90 % columns

    @classmethod
    def build(cls, paths: list[Path], columns: list[str] | None = None) -> SweepTable:
        """Every run under ``paths``, grouped into cells.

        ``columns``: keep only the value columns whose name matches one of these
        shell patterns (``test/*/acc`` keeps ``test/eval/acc`` and its ``vs central``).
        """
        runs = find_runs([Path(p) for p in paths])
        bases = [Path(p) if Path(p).is_dir() else Path(p).parent for p in paths]
        base = bases[0]
        groups: dict[str, list[Run]] = defaultdict(list)
        for run in runs:  # a cell is named from the given folder its run lies in
            own = next((b for b in bases if run.folder.is_relative_to(b)), base)
            groups[_cell_name(run.folder, own)].append(run)
        cells = sorted(
            (Cell(n, rs) for n, rs in groups.items()), key=lambda c: (not c.central, c.name)
        )
        centrals = [c for c in cells if c.central]
        for cell in cells:
            cell.reference = _pick_reference(cell, centrals)
        results = [r for c in cells for r in c.results]
        keys = _columns(results)
        stats = [_Stat(k) for k in keys] + [_Stat(k, True) for k in keys if _CENTRAL.fullmatch(k)]
        if columns:
            stats = _select(stats, columns)
        found = (_VAL_CURVE.fullmatch(k) for r in results for rec in r.rounds for k in rec.metrics)
        modes = sorted({m.group(1) for m in found if m}, key=_mode_key)
        return cls(base, cells, stats, modes)

    def missing(self, cell: Cell) -> str:
        """The cell's runs without a finished ``results.json``, by seed folder."""
        return ", ".join(_label(r.folder, self.base) for r in cell.lost)

    def settings(self, cell: Cell) -> list[object]:
        """strategy, bn_sync, norm, partition, rounds, reference (None: unknown)."""
        if not cell.results:
            return [None] * len(_SETTINGS)
        res = cell.results[0]
        out = [res.summary.get(k) for k in ("strategy", "bn_sync", "norm")]
        out += [_partition(res), res.summary.get("rounds_completed")]
        return out + [cell.reference.name if cell.reference else None]

    def header(self) -> list[str]:
        """The main table's columns: settings, then each recorded value over seeds."""
        own = [s.name for s in self.stats if not s.vs_central]
        return ["run", "seeds", "missing", "strategy", "bn_sync", "norm", "rounds", *own, "wall s"]

    def rows(self) -> list[list[str]]:
        """The main table's rows, one per cell."""
        own = [s for s in self.stats if not s.vs_central]
        rows = []
        for cell in self.cells:
            strategy, bn_sync, norm, _, rounds, _ = self.settings(cell)
            row = [cell.name, str(len(cell.results)), self.missing(cell) or "-"]
            row += ["-" if v is None else str(v) for v in (strategy, bn_sync, norm, rounds)]
            if not cell.results:
                rows.append(row + ["missing"] * len(own) + ["-"])
                continue
            row += [_fmt(s.values(cell), s.signed) for s in own]
            wall = _mean_wall(cell)
            rows.append(row + ["-" if wall is None else f"{wall:.0f}"])
        return rows

    def comparison_header(self) -> list[str]:
        """The second table's columns: each cell against its centralised reference."""
        rounds = [f"rounds to {REACH:.0%} ({m})" for m in self.modes]
        vs = [s.name for s in self.stats if s.vs_central]
        return ["run", "partition", "reference", *vs, *rounds]

    def comparison_rows(self) -> list[list[str]]:
        """The second table's rows: every cell but the centralised ones."""
        vs = [s for s in self.stats if s.vs_central]
        rows = []
        for cell in (c for c in self.cells if not c.central):
            *_, partition, _, reference = self.settings(cell)
            row = [cell.name, str(partition or "-"), str(reference or "-")]
            if not cell.results:
                rows.append(row + ["missing"] * (len(vs) + len(self.modes)))
                continue
            row += [_fmt(s.values(cell), s.signed) for s in vs]
            rows.append(row + [_fmt_rounds(_rounds_to_reach(cell, m)) for m in self.modes])
        return rows

    def combined(self) -> tuple[list[str], list[list[str]]]:
        """Both tables as one (for W&B): the main columns, then the comparison's."""
        extra = self.comparison_header()[1:]
        by_name = {row[0]: row[1:] for row in self.comparison_rows()}
        rows = [row + by_name.get(row[0], ["-"] * len(extra)) for row in self.rows()]
        return self.header() + extra, rows

    def markdown(self) -> str:
        """The tables, how to read them, and the list of runs that did not finish."""
        header = self.header()
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows()]
        text = "\n".join(lines) + "\n\n" + _LEGEND
        if not any(c.central for c in self.cells):
            text += "\n\nno centralised cell in this sweep: no comparison with a reference."
        elif comparison := self.comparison_rows():
            # without the outer pipes (valid GFM): the report's '|'-lines stay the main table
            header = self.comparison_header()
            lines = [" | ".join(header), "|".join(["---"] * len(header))]
            lines += [" | ".join(row) for row in comparison]
            text += "\n\nagainst the centralised reference:\n\n" + "\n".join(lines)
            text += "\n\n" + _LEGEND_CENTRAL
        if not_done := self.not_done():
            text += f"\n\nmissing ({len(not_done)} run(s) without a finished results.json):\n"
            text += "\n".join(f"- {item}" for item in not_done)
        return text

    def not_done(self) -> list[str]:
        """Each run without a finished ``results.json``, with why (failed, running, ...)."""
        return [
            f"{_relative(r.folder, self.base)} ({r.problem or _why_missing(r)})"
            for cell in self.cells
            for r in cell.lost
        ]

    def csv_header(self) -> list[str]:
        """The CSV's columns (module docstring)."""
        head = ["cell", "seeds", "missing", *_SETTINGS]
        for s in self.stats:
            head += [
                f"{s.name.replace(' ', '_')}_{p}" for p in ("mean", "sd", "ci_lo", "ci_hi", "n")
            ]
        for m in self.modes:
            head += [f"rounds_to_90/{m}", f"rounds_to_90/{m}_reached", f"rounds_to_90/{m}_n"]
        return head + ["wall_s"]

    def csv_rows(self) -> list[list[object]]:
        """The CSV's rows, one per cell, numbers unrounded (None: empty)."""
        rows = []
        for cell in self.cells:
            row = [cell.name, len(cell.results), self.missing(cell), *self.settings(cell)]
            for s in self.stats:
                st = _stats(s.values(cell), s.signed)
                mean, sd, ci = st if st is not None else (None, None, None)
                row += [mean, sd, *(ci or (None, None)), len(s.values(cell))]
            for m in self.modes:
                rounds = _rounds_to_reach(cell, m)
                reached = [r for r in rounds if r is not None]
                if not rounds:  # no reference, or no curve paired with one
                    row += [None, None, None]
                    continue
                row += [float(np.mean(reached)) if reached else None, len(reached), len(rounds)]
            rows.append(row + [_mean_wall(cell)])
        return rows

    def csv(self) -> str:
        """The CSV text."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.csv_header())
        writer.writerows([["" if v is None else v for v in row] for row in self.csv_rows()])
        return buf.getvalue()


def _select(stats: list[_Stat], patterns: list[str]) -> list[_Stat]:
    """The columns matching a pattern (a column's ``vs central`` twin follows it)."""
    kept = [s for s in stats if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]
    kept += [
        s for s in stats
        if s.vs_central and s not in kept and any(t.key == s.key for t in kept)
    ]  # fmt: skip
    idle = [p for p in patterns if not any(fnmatch.fnmatchcase(s.name, p) for s in stats)]
    if idle:  # a typo beside a pattern that matches would drop its columns unsaid
        available = ", ".join(s.name for s in stats if not s.vs_central) or "none"
        raise ConfigError(
            f"--columns {','.join(idle)} matches no column of this sweep; columns: {available}"
        )
    return [s for s in stats if s in kept]


def _mean_wall(cell: Cell) -> float | None:
    walls = [w for r in cell.results if (w := _number(r.summary.get("wall_s"))) is not None]
    return float(np.mean(walls)) if walls else None


_LEGEND = (
    "cells: one seed: value [its run's 95 % speaker-bootstrap interval]; "
    "n >= 2 seeds: mean ± sd [95 % t interval of the mean over seeds]"
)
_LEGEND_CENTRAL = (
    "'vs central': per seed, the cell minus its reference (a centralised cell) of the same "
    "seed, then as above ('-': no reference or nothing to pair); "
    f"'rounds to {REACH:.0%}': first round whose val/<mode>/acc reaches {REACH} x the "
    "reference's final val/eval/acc of the same seed, mean over the seeds that reach it "
    "('never': none does)"
)


def report(
    paths: list[Path],
    markdown: Path | None = None,
    plot: Path | None = None,
    csv_file: Path | None = None,
    bars: Path | None = None,
    log_table: Callable[[SweepTable], None] | None = None,
    columns: list[str] | None = None,
) -> str:
    """A Markdown table of every run under ``paths`` (seeds of one cell merged).

    ``markdown`` also writes it there, with the CSV beside it (``csv_file``,
    default: the same name ending in ``.csv``); ``plot`` draws the curves there,
    with the bar chart beside it (``bars``, default: ``<plot stem>_bars.png``) and, for a
    sweep over two axes, the grid of means (``<plot stem>_grid.png``, :mod:`fedkws.grid`).
    ``log_table`` is handed the table once everything is written (e.g. to W&B).
    ``columns``: only the value columns matching these patterns (:meth:`SweepTable.build`).
    """
    if markdown is not None and csv_file is None:
        csv_file = Path(markdown).with_suffix(".csv")
    if plot is not None and bars is None:
        bars = Path(plot).with_name(f"{Path(plot).stem}_bars.png")
    grid = None if plot is None else Path(plot).with_name(f"{Path(plot).stem}_grid.png")
    _check_targets([("--markdown", markdown), ("--markdown's CSV", csv_file), ("--plot", plot),
                    ("--plot's bar chart", bars), ("--plot's grid", grid)], plot)  # fmt: skip
    table = SweepTable.build([Path(p) for p in paths], columns)
    if not any(cell.results for cell in table.cells):  # a table of "missing" tells nothing
        lost = table.not_done()
        shown = "; ".join(lost[:3]) + (f"; and {len(lost) - 3} more" if len(lost) > 3 else "")
        raise ConfigError(f"no run under {', '.join(map(str, paths))} has finished: {shown}")
    text = table.markdown()
    if found := claims.verdicts(table.cells):
        text += "\n\n" + claims.markdown(found)
    outputs = [
        (markdown, lambda p: write_text(p, text + "\n")),
        (csv_file, lambda p: write_text(p, table.csv())),
        (plot, lambda p: _curves(table, p)),
        (bars, lambda p: _bars(table, p)),
        (grid, lambda p: draw_grid(table, p)),  # two-axis sweeps only
    ]
    for target, write in outputs:
        if target is not None:
            try:
                write(Path(target))
            except OSError as err:  # e.g. --markdown into a folder that does not exist
                raise ConfigError(f"cannot write {target}: {err.strerror or err}") from err
    if log_table is not None:
        log_table(table)
    return text


# A run's own records: a report never writes over them (a mistyped --markdown would
# replace a run's results with its table), nor anything else into a run folder.
RUN_RECORDS = ("results.json", "checkpoint.pt")


def _is_run_folder(folder: Path) -> bool:
    return (folder / "results.json").is_file() or (folder / ".hydra" / "config.yaml").is_file()


def _check_targets(targets: list[tuple[str, Path | None]], plot: Path | None) -> None:
    """Refuse outputs that would replace a run's files or each other, or a PNG misnamed."""
    if plot is not None and Path(plot).suffix.lower() != ".png":
        raise ConfigError(f"--plot {plot}: the plot is a PNG file; give a name ending in .png")
    seen: dict[Path, str] = {}
    for what, target in targets:
        if target is None:
            continue
        target = Path(target)
        where = Path(os.path.abspath(target))  # a/../t.png is t.png
        if where in seen:
            hint = (
                "the markdown's CSV is named after it: give --markdown a name ending in .md"
                if what == "--markdown's CSV"
                else f"give {what} another name"
            )
            raise ConfigError(f"{what} {target}: the same file as {seen[where]}; {hint}")
        seen[where] = what
        if target.name in RUN_RECORDS or ".hydra" in where.parts or _is_run_folder(where.parent):
            raise ConfigError(
                f"{what} {target}: that is inside a run's folder, whose files are the run's; "
                "write the report elsewhere"
            )


def _curve_keys(results: list[Result]) -> list[str]:
    """``val/<mode>/acc`` of every mode drawn, else ``fed/<mode>/acc_mean``."""
    keys = {k for r in results for rec in r.rounds for k in rec.metrics}
    for pattern in (_VAL_CURVE, re.compile(r"fed/([a-z_]+)/acc_mean")):
        found = {m.group(1): m.group(0) for k in keys if (m := pattern.fullmatch(k))}
        if found:
            return [found[mode] for mode in sorted(found, key=_mode_key)]
    return []


def draw_cell_curves(ax: Any, cell: Cell) -> Any:
    """One cell's accuracy per round, one line per eval mode.

    The line is the mean over the cell's seeds, the shaded band their range
    (min to max) at each round.
    """
    from matplotlib.ticker import MaxNLocator

    results = cell.results
    keys = _curve_keys(results)
    for key in keys:
        by_round: dict[int, list[float]] = defaultdict(list)
        for res in results:
            for x, y in zip(*res.curve(key), strict=True):
                by_round[x].append(y)
        xs = sorted(by_round)
        (line,) = ax.plot(xs, [np.mean(by_round[x]) for x in xs], marker="o", ms=3, label=key)
        if len(results) > 1:
            lo, hi = [min(by_round[x]) for x in xs], [max(by_round[x]) for x in xs]
            ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
    ax.set_title(f"{cell.name} ({len(results)} seed{'s' * (len(results) != 1)})", fontsize=8)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize=7)
    else:
        text = "no finished run" if not results else "no accuracy curve"
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    return ax


def _curves(table: SweepTable, path: Path) -> None:
    """``report.png``: one panel per cell (:func:`draw_cell_curves`)."""
    ncols = max(1, math.ceil(math.sqrt(len(table.cells))))
    nrows = max(1, math.ceil(len(table.cells) / ncols))
    size = (4.2 * ncols, 3.2 * nrows)
    with figure(path, figsize=size, nrows=nrows, ncols=ncols, squeeze=False) as (_fig, axes):
        for ax, cell in zip(axes.flat, table.cells, strict=False):
            draw_cell_curves(ax, cell)
        for ax in axes.flat[len(table.cells) :]:
            ax.set_axis_off()


def draw_bars(ax: Any, table: SweepTable) -> Any:
    """Final test accuracy: one group of bars per cell, one bar per eval mode.

    Each bar is the cell's value as in the table (mean over seeds), its error
    bar the table's 95 % interval; a cell without the value has an empty slot.
    """
    stats = [s for s in table.stats if not s.vs_central and _TEST_ACC.fullmatch(s.key)]
    stats.sort(key=lambda s: (_TEST_ACC.fullmatch(s.key).group(1) is not None,
                              _mode_key(_TEST_ACC.fullmatch(s.key).group(2))))  # fmt: skip
    x = np.arange(len(table.cells))
    width = 0.8 / max(len(stats), 1)
    for i, stat in enumerate(stats):
        heights, below, above = [], [], []
        for cell in table.cells:
            st = _stats(stat.values(cell))
            mean = st[0] if st else np.nan
            lo, hi = st[2] if st and st[2] else (np.nan, np.nan)
            heights.append(mean)
            below.append(mean - lo)
            above.append(hi - mean)
        offset = (i - (len(stats) - 1) / 2) * width
        label = _bar_label(stat.key)
        # No interval anywhere (one seed per cell): no error bars, rather than all-NaN ones.
        yerr = [below, above] if np.isfinite(below).any() else None
        ax.bar(x + offset, heights, width, yerr=yerr, capsize=2, label=label)
    for xi, cell in zip(x, table.cells, strict=True):
        if not cell.results:
            ax.text(xi, 0.02, "missing", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [c.name for c in table.cells], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("final test accuracy per cell and eval mode (95 % interval)")
    if stats:
        ax.legend(title="eval mode", fontsize=7)
    return ax


def _bars(table: SweepTable, path: Path) -> None:
    """``report_bars.png``: :func:`draw_bars`."""
    modes = sum(1 for s in table.stats if not s.vs_central and _TEST_ACC.fullmatch(s.key))
    width = min(40.0, max(6.0, 0.25 * len(table.cells) * max(modes, 1) + 3))
    with figure(path, figsize=(width, 5.0)) as (_fig, ax):
        draw_bars(ax, table)


def log_to_wandb(config: Any, sweep: Path, table: SweepTable) -> None:
    """The table as ``wandb.Table``s in a summary run ``report`` of the sweep's W&B group.

    The group is the one every job of the sweep logged to (``<name>/<sweep
    folder name>``); ``report`` holds the Markdown tables' cells (the main
    columns, then the comparison's), ``report_values`` the CSV's numbers.
    Nothing when ``logger.mode`` is ``disabled``; a W&B failure is printed,
    never raised.
    """
    log = config.get("logger")
    mode = str(log.get("mode", "disabled")) if log is not None else "disabled"
    if mode == "disabled":
        return
    try:
        logger = WandbLogger(
            mode=mode,
            project=str(log.get("project", "fedkws")),
            entity=log.get("entity"),
            tags=[str(t) for t in (log.get("tags") or [])],
            config={"sweep": str(sweep), "cells": len(table.cells)},
            run_dir=sweep,
            group=f"{config.get('name')}/{sweep.name}",
            name="report",
            init_timeout=log.get("init_timeout"),
        )
        try:
            logger.table("report", *table.combined())
            logger.table("report_values", table.csv_header(), table.csv_rows())
        finally:
            logger.finish()
    except Exception as err:  # the report is written already; W&B must not cost it
        print(f"report not logged to W&B: {type(err).__name__}: {err}")


# The failed jobs of the sweep this process ran (set by SweepReport): fedkws-train then
# exits with status 1 after the report.
FAILED_JOBS: list[str] = []


def failed_jobs(sweep: Path) -> list[str]:
    """The jobs under ``sweep`` that failed (a ``failed.txt``) and did not finish since."""
    try:
        runs = find_runs([sweep])
    except (ConfigError, OSError):
        return []
    return [_relative(r.folder, sweep) for r in runs
            if not r.complete and read_failure(r.folder) is not None]  # fmt: skip


class SweepReport(Callback):
    """Hydra callback: at the end of a multirun, print and save the sweep's report.

    Writes ``report.md``, ``report.csv``, ``report.png`` (accuracy per round,
    one panel per cell), ``report_bars.png`` (final test accuracy per cell and
    mode) and, over two axes, ``report_grid.png`` into the sweep folder, and logs the
    table to W&B unless ``logger.mode=disabled`` (:func:`log_to_wandb`).
    """

    def on_multirun_end(self, config, **kwargs) -> None:  # noqa: ANN001
        """Called by Hydra once every job of the sweep has finished."""
        from fedkws import lifecycle

        if lifecycle.sweep_stop_code() is not None:  # stopped, as a sequential sweep: no report
            return
        if (config.hydra.get("job") or {}).get("name") == "prepare":  # fedkws-prepare -m
            return
        sweep = Path(config.hydra.sweep.dir)
        FAILED_JOBS[:] = failed_jobs(sweep)
        try:
            table = report(
                [sweep],
                markdown=sweep / "report.md",
                plot=sweep / "report.png",
                log_table=lambda t: log_to_wandb(config, sweep, t),
            )
        except ConfigError as err:
            print(f"no report: {err}")
            return
        print(f"\nSweep {sweep}\n{table}")
        grid = ", grid of means report_grid.png" if (sweep / "report_grid.png").is_file() else ""
        print(f"(in {sweep}: table report.md and report.csv, curves report.png, bars "
              f"report_bars.png{grid})")  # fmt: skip
