"""The one place that sets up matplotlib: a headless figure saved atomically and closed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedkws.fileio import atomic_path


@contextmanager
def figure(path: Path | str, figsize: tuple[float, float] = (7, 4.2), **kwargs: Any) -> Iterator:
    """``with figure(path) as (fig, ax): ...`` draws and writes ``path`` as PNG.

    Extra keyword arguments go to ``plt.subplots`` (``ncols=2`` gives an array of axes).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, **kwargs)
    try:
        yield fig, ax
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
