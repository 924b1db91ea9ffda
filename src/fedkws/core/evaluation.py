"""Evaluating a model in each ``eval_mode`` (shared by the centralised and federated recipes)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fedkws.core import loops
from fedkws.core.bn import averaged_twin, recalibrate
from fedkws.core.models import bn_layers
from fedkws.data.cache import CachedDataset

# moments_of(model, layer) -> [(n, sum, sum of squares) per data holder]
MomentsFn = Callable[[nn.Module, int], list]

# The model variants an evaluation mode runs: the model itself in eval or train mode, or
# one of the recalibrated copies in eval mode.
_VARIANT = {"eval": ("model", "eval"), "train": ("model", "train"),
            "recalibrated": ("pooled", "eval"), "fresh_average": ("averaged", "eval")}  # fmt: skip


class Evaluator:
    """Evaluate a model on one split in every requested mode.

    ``recalibrated`` is ``eval`` after :func:`fedkws.core.bn.recalibrate` with
    the holders' moments (exact pooled statistics of the union); for a model
    without BatchNorm it equals ``eval``. ``fresh_average`` (final evaluation
    only) is ``eval`` with the example-weighted average of each holder's own
    statistics from the same pass: the same means, the within-holder variance
    only. Stored (``eval``) vs ``fresh_average`` measures staleness;
    ``fresh_average`` vs ``recalibrated`` the spread between holders.

    Every evaluation uses the order of :func:`fedkws.core.loops.evaluation_order`
    for ``order_seed``, and runs on ``device`` (where the evaluated models are).
    """

    def __init__(
        self,
        data: CachedDataset,
        modes: list[str],
        batch_size: int,
        order_seed: int,
        moments_of: MomentsFn | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.data, self.modes, self.batch_size = data, list(modes), batch_size
        self.device = device
        self.order_seed, self.moments_of = order_seed, moments_of
        # The most recent recalibration (pooled, and the holders' average), reused for the
        # test split after the last round.
        self.last_recalibrated: nn.Module | None = None
        self.last_averaged: nn.Module | None = None

    def recalibrated(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with exact pooled BatchNorm statistics (also kept as last)."""
        if not bn_layers(model) or self.moments_of is None:
            self.last_recalibrated = self.last_averaged = model
        else:
            recorded: list[list] = []
            self.last_recalibrated = recalibrate(model, self.moments_of, record=recorded)
            self.last_averaged = averaged_twin(model, recorded)
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
        earlier can be passed in to avoid recomputing it. ``fresh_average`` uses
        the last recalibration's averaged copy.
        """
        metrics: dict[str, float] = {}
        stats: dict[str, loops.EvalStats] = {}
        for mode in self.modes if modes is None else modes:
            variant, norm_mode = _VARIANT[mode]
            if variant == "pooled":
                net = recalibrated if recalibrated is not None else self.recalibrated(model)
            elif variant == "averaged":
                net = self.last_averaged
            else:
                net = model
            result = loops.evaluate(
                net, self.data, rows, self.batch_size, norm_mode,
                order_seed=self.order_seed, device=self.device,
            )  # fmt: skip
            stats[mode] = result
            metrics[f"{prefix}/{mode}/acc"] = result.acc
            metrics[f"{prefix}/{mode}/loss"] = result.loss
        return metrics, stats
