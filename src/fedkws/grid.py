"""A sweep over two axes as a grid: one coloured square per cell, its mean over seeds.

The study presets sweep ``arm`` (norm and BatchNorm handling) against
``partition`` (kind of clients) with several seeds: the report's grid draws the
first axis as rows and the second as columns, one panel per metric:

* ``test/eval/acc``: the global model on the shared test split, eval mode;
* ``test/recalibrated/acc``: the same model with exact pooled statistics;
* ``final/fed/eval/acc_mean``: each client's model (its own BatchNorm under
  FedBN and SiloBN) on its local test split, the mean over clients.

Each square's colour is the mean (0 to 1, viridis); its text the mean and,
below it, ``± h``: the half-width of the 95 % t interval over seeds (one seed:
no ``±``). A cell without the metric (FedBN has no global model; a centralised
run has no clients) is left blank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedkws import plots

PANELS = (
    ("test/eval/acc", "global model, eval mode (test)"),
    ("test/recalibrated/acc", "global model, exact statistics (test)"),
    ("final/fed/eval/acc_mean", "per client, own test split (mean)"),
)


def grid_data(table: Any) -> tuple[tuple[str, str], list[str], list[str], dict] | None:
    """``(axes, row labels, column labels, cell by (row, column))``, else None.

    The axes are the two keys whose values differ between the cells (in the names'
    order); a key with one value in every cell (a constant override such as
    ``train.rounds=3``) is not an axis. None unless exactly two keys vary.
    """
    from fedkws.report import cell_overrides

    cells = [c for c in table.cells if c.results]
    parsed = [cell_overrides(c.name) for c in cells]
    if not cells or any(p is None or list(p) != list(parsed[0]) for p in parsed):
        return None
    varying = [key for key in parsed[0] if len({p[key] for p in parsed}) > 1]
    if len(varying) != 2:
        return None
    row_key, col_key = varying
    by_pair = {(p[row_key], p[col_key]): c for p, c in zip(parsed, cells, strict=True)}
    rows = list(dict.fromkeys(p[row_key] for p in parsed))
    cols = list(dict.fromkeys(p[col_key] for p in parsed))
    return (row_key, col_key), rows, cols, by_pair


def _cell_stats(cell: Any, key: str) -> tuple[float, float | None] | None:
    """Mean and 95 % t half-width over the cell's seeds of ``key`` (None: no value).

    The half-width of the t interval itself, not of the table's interval clipped to
    [0, 1] (which would understate it near 0 or 1).
    """
    from fedkws.core.stats import t_interval
    from fedkws.report import _number

    values = [v for r in cell.results if (v := _number(r.summary.get(key))) is not None]
    if not values:
        return None
    if len(values) == 1:
        return values[0], None
    lo, hi = t_interval(values)
    return float(np.mean(values)), (hi - lo) / 2


def draw_grid(table: Any, path: Path) -> bool:
    """Write the grid PNG; False (nothing written) when the sweep is not two-axis."""
    found = grid_data(table)
    if found is None:
        return False
    (row_key, col_key), rows, cols, by_pair = found
    panels = [p for p in PANELS if any(_cell_stats(c, p[0]) for c in table.cells)]
    if not panels:
        return False
    size = (1.2 + 1.35 * len(cols) * len(panels), 0.9 + 0.55 * len(rows))
    with plots.figure(path, figsize=size, ncols=len(panels), squeeze=False) as (_fig, axes):
        for ax, (key, title) in zip(axes[0], panels, strict=True):
            grid = np.full((len(rows), len(cols)), np.nan)
            for i, r in enumerate(rows):
                for j, c in enumerate(cols):
                    cell = by_pair.get((r, c))
                    st = _cell_stats(cell, key) if cell else None
                    if st is None:
                        continue
                    grid[i, j] = st[0]
                    text = f"{st[0]:.2f}" + ("" if st[1] is None else f"\n±{st[1]:.2f}")
                    colour = "white" if st[0] < 0.6 else "black"  # readable on viridis
                    ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
            ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(cols)), cols, fontsize=7)
            ax.set_yticks(range(len(rows)), rows, fontsize=7)
            ax.set_xlabel(col_key)
            ax.set_title(title, fontsize=8)
        axes[0][0].set_ylabel(row_key)
    return True
