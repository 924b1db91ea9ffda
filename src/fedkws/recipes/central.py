"""The centralised baseline recipe: the same data, model and optimiser, no federation.

The training rows are the union of the clients' local training rows, so the
baseline sees exactly the examples the federation sees. One "round" is
``train.local_epochs`` epochs, so its curve lines up with the federated ones.
Its own optimiser (not a server optimiser) is what the checkpoint keeps.
Everything runs on the run's ``device``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedkws import lifecycle
from fedkws.checkpoint import Checkpoint
from fedkws.core import loops, seeding
from fedkws.core.bn import ActivationCache, bn_input_moments
from fedkws.core.evaluation import Evaluator
from fedkws.core.models import bn_layers
from fedkws.recipes import common
from fedkws.spec import RunSpec
from fedkws.tracking import Result


class CentralRecipe:
    """setup / train / finish of the centralised baseline."""

    def __init__(self, spec: RunSpec, run: common.Run) -> None:
        self.spec, self.run = spec, run

    def setup(self, run_dir: Path) -> None:
        """Data, model, optimiser and evaluator; restore a checkpoint when resuming."""
        spec = self.spec
        self.parts = common.setup(spec, run_dir)
        self.model = self.parts.model
        self.data = data = self.parts.data
        self.train_rows = np.sort(np.concatenate([c.train for c in self.parts.clients]))
        self.optimizer = loops.make_optimizer(
            self.model.parameters(), spec.optimizer.target, dict(spec.optimizer.kwargs)
        )
        self.augmenter, self.extractor = loops.training_augmentation(
            spec.augment, spec.features, data
        )
        batch = spec.train.eval_batch_size
        self.evaluator = Evaluator(
            data,
            list(spec.bn.eval_modes),
            batch,
            order_seed=spec.seed,
            moments_of=self._moments,
            device=spec.device,
        )
        self.activations = ActivationCache()  # segment inputs between the layer queries

    def _moments(self, net: torch.nn.Module, layer: int) -> list:
        moments = bn_input_moments(
            net, self.data, self.train_rows, layer, self.spec.train.eval_batch_size,
            self.activations, device=self.spec.device,
        )  # fmt: skip
        if layer == len(bn_layers(net)) - 1:
            self.activations.clear()
        return [moments]

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from a checkpoint (model and the training optimiser's state).

        The checkpoint's CPU tensors are copied to the model's and the optimiser's device.
        """
        self.model.load_state_dict(ckpt.model)
        if ckpt.optimizer:
            self.optimizer.load_state_dict(ckpt.optimizer)

    def optimizer_state(self) -> dict[str, Any]:
        """The training optimiser's state (checkpointed every round)."""
        return self.optimizer.state_dict()

    def train_round(self, round_: int) -> tuple[common.Metrics, common.ClientInfo]:
        """``local_epochs`` epochs over the union of the clients' data."""
        stats = loops.train_epochs(
            self.model,
            self.parts.data,
            self.train_rows,
            epochs=self.spec.train.local_epochs,
            batch_size=self.spec.train.batch_size,
            optimizer=self.optimizer,
            generator=seeding.central_training_generator(self.spec.seed, round_),
            augmenter=self.augmenter,
            extractor=self.extractor,
            should_stop=lifecycle.raise_if_stopping,
            device=self.spec.device,
            amp=self.spec.train.amp,
        )
        return {"train/loss": stats.loss, "train/acc": stats.acc}, {}

    def evaluate_round(self, round_: int) -> common.Metrics:
        """Validation in every mode (``recalibrated`` every ``bn.recalibrate_every`` rounds)."""
        modes = list(self.spec.bn.eval_modes)
        every, rounds = self.spec.bn.recalibrate_every, self.spec.train.rounds
        if "recalibrated" in modes and round_ % every and round_ != rounds:
            modes.remove("recalibrated")
        return self.evaluator.run(self.model, self.parts.val_rows, "val", modes=modes)[0]

    def train(self) -> None:
        """Every round of this invocation."""
        common.run_rounds(self, self.run)

    def finish(self, run_dir: Path) -> Result:
        """Summary and, for a complete run, the test split; returns the Result."""
        title = f"{self.spec.name}: {self.spec.model.name}/{self.spec.model.norm}, centralised"
        summary = common.summary(self.run, self.parts, title, "central")
        if summary["complete"]:
            modes = common.final_modes(self.spec, self.model)
            with self.run.timed("final_evaluation"):
                if "recalibrated" in modes and self.evaluator.last_recalibrated is None:
                    self.evaluator.recalibrated(self.model)
                summary.update(
                    common.final_evaluation(
                        self.evaluator, self.model, self.parts, run_dir, modes, self.spec.plots
                    )
                )
        return self.run.finish(summary)
