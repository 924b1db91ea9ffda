"""The one place that sets up matplotlib: a headless figure saved atomically and closed.

Every axes made by :func:`figure` shows *every* label in its legend. Matplotlib
leaves out labels starting with ``_`` when ``ax.legend()`` collects them
itself, which would drop class names such as ``_silence_`` and ``_unknown_``;
here only matplotlib's own placeholders (``_nolegend_``, ``_child3``, ...) are
left out (:func:`legend`). Tick labels are never filtered.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedkws.fileio import atomic_path

__all__ = ["figure", "legend", "legend_entries"]

# Labels matplotlib gives artists nobody named (or marks as never shown).
_PLACEHOLDER = re.compile(r"_nolegend_|_(child|container|line|patch|collection|image)\d+")
_PROJECTION = "fedkws"


def legend_entries(ax: Any) -> tuple[list[Any], list[str]]:
    """Handles and labels of ``ax`` in drawing order, labels starting with ``_`` included."""
    from matplotlib.collections import Collection
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    drawn = [a for a in ax.get_children() if isinstance(a, Line2D | Patch | Collection)]
    handles = [
        a
        for a in [*drawn, *ax.containers]
        if a.get_label() and not _PLACEHOLDER.fullmatch(a.get_label())
    ]
    return handles, [str(h.get_label()) for h in handles]


def legend(ax: Any, *args: Any, **kwargs: Any) -> Any:
    """``ax.legend(...)`` that shows labels starting with ``_`` (e.g. ``_silence_``).

    Without handles and labels it takes every labelled artist of ``ax``
    (:func:`legend_entries`); with ``(handles, labels)`` those. Each entry is
    created under a name matplotlib keeps and then given its own text.
    """
    from matplotlib.axes import Axes

    if not args and "handles" not in kwargs and "labels" not in kwargs:
        handles, labels = legend_entries(ax)
    elif len(args) == 2 and "handles" not in kwargs and "labels" not in kwargs:
        handles, labels = list(args[0]), [str(label) for label in args[1]]
    else:
        return Axes.legend(ax, *args, **kwargs)
    if not handles:
        return Axes.legend(ax, **kwargs)  # matplotlib's own "no artists" warning
    shown = [f" {label}" if label.startswith("_") else label for label in labels]
    leg = Axes.legend(ax, handles, shown, **kwargs)
    for text, label in zip(leg.get_texts(), labels, strict=False):
        text.set_text(label)
    return leg


def _projection() -> str:
    """Register (once) the axes class of :func:`figure`: its ``legend`` is :func:`legend`."""
    from matplotlib import projections
    from matplotlib.axes import Axes

    if _PROJECTION not in projections.get_projection_names():

        class _Axes(Axes):
            name = _PROJECTION

            def legend(self, *args: Any, **kwargs: Any) -> Any:
                return legend(self, *args, **kwargs)

        projections.register_projection(_Axes)
    return _PROJECTION


@contextmanager
def figure(path: Path | str, figsize: tuple[float, float] = (7, 4.2), **kwargs: Any) -> Iterator:
    """``with figure(path) as (fig, ax): ...`` draws and writes ``path`` as PNG.

    Extra keyword arguments go to ``plt.subplots`` (``ncols=2`` gives an array of axes).
    Its axes keep labels starting with ``_`` in their legends (module docstring).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subplot_kw = {"projection": _projection(), **kwargs.pop("subplot_kw", {})}
    fig, ax = plt.subplots(figsize=figsize, subplot_kw=subplot_kw, **kwargs)
    try:
        yield fig, ax
        with warnings.catch_warnings():  # long cell names: the layout is as tight as it gets
            warnings.filterwarnings("ignore", message="Tight layout not applied")
            fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
