"""Evaluating the global model in each ``eval_mode`` (shared by central and federated runs)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import nn

from fedkws.core import loops
from fedkws.core.bn import recalibrate
from fedkws.core.models import bn_layers
from fedkws.data.cache import CachedDataset

# moments_of(model, layer) -> [(n, sum, sum of squares) per data holder]
MomentsFn = Callable[[nn.Module, int], list]


class Evaluator:
    """Evaluate a model on one split in every requested mode.

    ``recalibrated`` is ``eval`` after :func:`loops.recalibrate` with the
    holders' moments; for a model without BatchNorm it equals ``eval``.
    """

    def __init__(
        self,
        data: CachedDataset,
        modes: list[str],
        batch_size: int,
        moments_of: MomentsFn | None = None,
    ) -> None:
        self.data, self.modes, self.batch_size = data, list(modes), batch_size
        self.moments_of = moments_of
        # The most recent recalibration, reused for the test split after the last round.
        self.last_recalibrated: nn.Module | None = None

    def recalibrated(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with exact pooled BatchNorm statistics (also kept as last)."""
        if not bn_layers(model) or self.moments_of is None:
            self.last_recalibrated = model
        else:
            self.last_recalibrated = recalibrate(model, self.moments_of)
        return self.last_recalibrated

    def run(
        self,
        model: nn.Module,
        rows: np.ndarray,
        prefix: str,
        recalibrated: nn.Module | None = None,
        modes: list[str] | None = None,
    ) -> tuple[dict[str, float], dict[str, loops.EvalStats]]:
        """Metrics ``<prefix>/<mode>/acc|loss`` and the raw stats per mode.

        ``modes`` defaults to the evaluator's; a ``recalibrated`` model computed
        earlier can be passed in to avoid recomputing it.
        """
        metrics: dict[str, float] = {}
        stats: dict[str, loops.EvalStats] = {}
        for mode in self.modes if modes is None else modes:
            if mode == "recalibrated":
                net = recalibrated if recalibrated is not None else self.recalibrated(model)
                result = loops.evaluate(net, self.data, rows, self.batch_size, "eval")
            else:
                result = loops.evaluate(model, self.data, rows, self.batch_size, mode)
            stats[mode] = result
            metrics[f"{prefix}/{mode}/acc"] = result.acc
            metrics[f"{prefix}/{mode}/loss"] = result.loss
        return metrics, stats
