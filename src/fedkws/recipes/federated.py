"""The federated recipe: the round loop of :mod:`fedkws.recipes.common` driving Flower clients.

Per round: sample clients (:func:`fedkws.core.sampling.sample_clients`), send
them the global model's shared entries, aggregate their replies in
partition-id order (:func:`fedkws.core.aggregation.aggregate`: the parameters
through the configured Flower strategy, :mod:`fedkws.fl.strategy`; BatchNorm
statistics by fedkws's own example-weighted average), evaluate. A
client that fails is recorded (results.json ``failures``, console) and left
out of that round; the run stops only when fewer than
``strategy.min_train_clients`` replied. A client without training examples
is never sampled.

``strategy=cyclic`` replaces the aggregation: the model visits the sampled
clients in turn and the round's model is what the last visit handed on
(:meth:`FederatedRecipe._train_round_cyclic`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedkws.checkpoint import Checkpoint
from fedkws.clients import save_clients
from fedkws.core.aggregation import aggregate, keeps_client_state, key_plan
from fedkws.core.evaluation import Evaluator
from fedkws.core.models import bn_layers, bn_state_keys
from fedkws.core.sampling import sample_clients
from fedkws.data import partition as part
from fedkws.errors import ConfigError, FederationError
from fedkws.recipes import common
from fedkws.spec import RunSpec
from fedkws.tracking import Result

log = logging.getLogger(__name__)


class FederatedRecipe:
    """setup / train / finish of a federated run."""

    def __init__(self, spec: RunSpec, run: common.Run, grid: Any = None) -> None:
        self.spec, self.run = spec, run
        self.grid = grid  # a Flower Grid to serve (under `flwr run`) instead of simulating
        self.clients_api = None  # FlowerClients while the simulation runs
        self.final: common.Background | None = None  # the final evaluation, once started

    # -- setup -------------------------------------------------------------------------------

    def setup(self, run_dir: Path) -> None:
        """Data, clients, model, key plan, server rule, the clients' task, evaluator."""
        spec = self.spec
        self._start_clients_early()
        self.parts = common.setup(spec, run_dir)
        self.model = self.parts.model
        own_bn = keeps_client_state(spec.bn.sync)
        if own_bn and not bn_layers(self.model):
            raise ConfigError(
                f"bn.sync='{spec.bn.sync}': model {spec.model.name} has no BatchNorm layer"
            )
        if own_bn and "recalibrated" in spec.bn.eval_modes:
            log.warning(
                f"bn.eval_modes 'recalibrated' does not apply to bn.sync={spec.bn.sync}: skipped"
            )
        if own_bn and spec.partition.local_test_fraction == 0:
            log.warning(
                f"partition.local_test_fraction=0: bn.sync={spec.bn.sync} is evaluated on each "
                "client's local test split, so no round has an accuracy (the shared test split "
                "is still evaluated at the end)"
            )
        if spec.bn.sync == "fixbn" and spec.bn.freeze_after >= spec.train.rounds:
            log.warning(
                f"bn.freeze_after={spec.bn.freeze_after} >= train.rounds={spec.train.rounds}: "
                "FixBN freezes no round of this run's training (a full-state run until then)"
            )
        clients = self.parts.clients
        self.eligible = [c.pid for c in clients if len(c.train) > 0]
        if len(self.eligible) < spec.strategy.min_train_clients:
            raise ConfigError(
                f"strategy.min_train_clients={spec.strategy.min_train_clients}: only "
                f"{len(self.eligible)} clients have training examples"
            )
        clients_file = save_clients(clients, run_dir / "clients.npz")
        if spec.plots:
            part.plot([c.train for c in clients], self.parts.data.labels,
                      self.parts.data.label_names, run_dir / "partition.png",
                      client_names=[c.name for c in clients])  # fmt: skip
        self.keys = key_plan(self.model, spec.bn.sync)
        self.bn_keys = bn_state_keys(self.model)
        from fedkws.fl.strategy import FlowerServerRule

        self.server_rule = FlowerServerRule.from_spec(
            spec.strategy.class_name, dict(spec.strategy.kwargs)
        )
        self.task = _client_task(spec, self.parts.data, clients_file, run_dir / "client_state")
        self.evaluator = Evaluator(
            self.parts.data, list(spec.bn.eval_modes), spec.train.eval_batch_size,
            order_seed=spec.seed, moments_of=self._moments, device=spec.device,
        )  # fmt: skip
        self.recalibrated_round = 0  # the round whose model the last recalibration is of
        self.shared_test: common.Metrics = {}  # FedBN/SiloBN: personalised models on the test split
        self.completed_round = 0
        self.failures: list[dict] = []
        self.actors_reused = 0  # Ray actors taken over from a sweep's previous job

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from a checkpoint (model, strategy state, the failures so far)."""
        self.model.load_state_dict(ckpt.model)
        self.server_rule.load_state_dict(ckpt.optimizer)
        self.failures = list(ckpt.failures)

    def optimizer_state(self) -> dict[str, Any]:
        """The strategy's server state (moments, momentum; checkpointed every round)."""
        return self.server_rule.state_dict()

    # -- one round ---------------------------------------------------------------------------

    def _shared_state(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()  # on the driver's device; CPU tensors cross the wire
        return {k: state[k].detach().cpu() for k in self.keys.shared}

    def train_round(self, round_: int) -> tuple[common.Metrics, common.ClientInfo]:
        """Train the sampled clients and aggregate what came back."""
        s = self.spec.strategy
        pids = sample_clients(self.spec.seed, round_, self.eligible, s.fraction_train,
                              s.min_train_clients)  # fmt: skip
        failed_before = len(self.clients_api.failures)
        frozen = self.spec.bn.sync == "fixbn" and round_ > self.spec.bn.freeze_after
        if s.cyclic:
            replies, handed_on = self._train_round_cyclic(round_, pids, frozen)
        else:
            replies = self.clients_api.train(round_, pids, self._shared_state(), frozen)
        failures = self.clients_api.failures[failed_before:]
        self._report_failures(failures)
        if len(replies) < s.min_train_clients:
            raise FederationError(
                f"round {round_}: {len(replies)} of {len(pids)} clients replied, fewer than "
                f"strategy.min_train_clients={s.min_train_clients}"
                + (f"; {failures[0].describe()}" if failures else "")
            )
        leaked = set().union(*(r.state.keys() for r in replies)) - set(self.keys.shared)
        if leaked:
            raise FederationError(f"clients sent keys that must stay local: {sorted(leaked)[:5]}")
        states, counts = [r.state for r in replies], [r.num_examples for r in replies]
        update = functools.partial(
            self.server_rule.update, round_, node_ids=[r.pid for r in replies],
            metrics=[{k: r.metrics[k] for k in ("train_loss", "train_acc")} for r in replies],
        )  # fmt: skip
        # Aggregated on the CPU, where the replies are; loading copies to the model's device.
        current = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if s.cyclic:  # no averaging: the shared keys the last visit handed on
            new_state = {**current, **handed_on}
        else:
            new_state = aggregate(current, states, counts, self.keys, update)
        if frozen:  # FixBN: the frozen statistics stay exactly as they were
            new_state.update({k: current[k] for k in (*self.keys.stats, *self.keys.counters)})
        self.model.load_state_dict(new_state)
        if self.spec.bn.sync == "fixbn" and round_ == self.spec.bn.freeze_after:
            self._freeze_statistics(round_)
        if round_ in self.server_rule.skipped_rounds:
            common.console.print(
                f"[yellow]warning:[/yellow] round {round_}: {self.spec.strategy.class_name} "
                "returned no model (too few replies for it?): the global model is kept"
            )
        self.completed_round = round_
        metrics = _train_metrics(replies, len(pids))
        info = self._client_info(replies)
        if failures:
            metrics["clients_failed"] = float(len(failures))
            info.update({str(f.pid): {"failed": 1.0} for f in failures})
        return metrics, info

    def _train_round_cyclic(
        self, round_: int, pids: list[int], bn_frozen: bool
    ) -> tuple[list, dict]:
        """strategy=cyclic: the model visits ``pids`` in turn; each trains it and hands it on.

        ``visit=epoch``: one visit is a client's local epochs. ``visit=batch``: one
        batch; the clients take turns (in partition-id order) until each has gone
        through its epochs, a client that has finished being skipped. Only the
        shared keys travel (``bn.sync``); the ones a client keeps are its own. Returns
        one reply per client that trained (its visits summed) and the shared keys the
        last visit handed on. A client that fails is left out for the rest of the round.
        """
        handed_on = self._shared_state()
        visits: dict[int, list] = {}
        active = list(pids)
        while active:
            for pid in list(active):
                replies = self.clients_api.train(round_, [pid], handed_on, bn_frozen)
                if not replies or replies[0].metrics["batches_left"] == 0:
                    active.remove(pid)
                if replies:
                    handed_on = replies[0].state
                    visits.setdefault(pid, []).append(replies[0])
        return [_merge_visits(v) for _, v in sorted(visits.items())], handed_on

    def _freeze_statistics(self, round_: int) -> None:
        """FixBN: the statistics frozen from now on (``bn.freeze_stats``).

        ``exact``: the exact pooled statistics of the clients' data, installed in the
        model (one query per BatchNorm layer). ``aggregated``: the running statistics
        the round's aggregation left in it, as Zhong et al. (no extra communication).
        """
        what = "the aggregated running statistics"
        if self.spec.bn.freeze_stats == "exact":
            pooled = self.evaluator.recalibrated(self.model)
            self.recalibrated_round = round_
            state = self.model.state_dict()
            state.update({k: v for k, v in pooled.state_dict().items() if k in self.keys.stats})
            self.model.load_state_dict(state)
            what = "the exact pooled statistics of the clients' data"
        common.console.print(f"FixBN: BatchNorm statistics frozen after round {round_} ({what})")

    def _report_failures(self, failures) -> None:
        """Print each failed reply and keep it for results.json (``summary.failures``)."""
        for failure in failures:
            common.console.print(f"[yellow]warning:[/yellow] {failure.describe()}")
            self.failures.append(dict(failure.__dict__))

    def _client_info(self, replies) -> common.ClientInfo:
        info = {}
        for reply in replies:
            entry = {k: v for k, v in reply.metrics.items() if k != "pid"}
            # What actually crossed the wire, so FedBN's promise can be checked from outside.
            entry["keys_received"] = float(len(reply.state))
            entry["bn_keys_received"] = float(len(self.bn_keys.intersection(reply.state)))
            info[str(reply.pid)] = entry
        return info

    def _moments(self, model: torch.nn.Module, layer: int) -> list:
        return self.clients_api.moments(self.completed_round, dict(model.state_dict()), layer)

    def evaluate_round(self, round_: int) -> common.Metrics:
        """Server-side validation in every mode, plus federated evaluation when asked."""
        metrics: common.Metrics = {}
        local = keeps_client_state(self.spec.bn.sync)
        if not local:
            modes = list(self.spec.bn.eval_modes)
            recal = None
            if "recalibrated" in modes:
                every = self.spec.bn.recalibrate_every
                if self.recalibrated_round == round_:  # FixBN's freeze just computed it
                    recal = self.evaluator.last_recalibrated
                elif round_ % every == 0 or round_ == self.spec.train.rounds:
                    start = time.perf_counter()
                    recal = self.evaluator.recalibrated(self.model)
                    if bn_layers(self.model):  # a model without BatchNorm has nothing to do
                        metrics["time/recalibration_s"] = time.perf_counter() - start
                    self.recalibrated_round = round_
                else:
                    modes.remove("recalibrated")
            val = self.evaluator.run(self.model, self.parts.val_rows, "val", recal, modes)[0]
            metrics.update(val)
        if local or self.spec.federation.federated_eval:
            metrics.update(self._federated_evaluate(round_))
        return metrics

    def _federated_evaluate(self, round_: int, split: str = "local") -> common.Metrics:
        """Mean and spread over clients of the accuracy on their local test splits.

        With ``split="testing"``: of each client's model on the shared test split.

        Clients without local test rows are left out, never counted as 0.
        """
        modes = tuple(m for m in self.spec.bn.eval_modes if m != "recalibrated")
        failed_before = len(self.clients_api.failures)
        replies = self.clients_api.evaluate(round_, self._shared_state(), modes, split)
        self._report_failures(self.clients_api.failures[failed_before:])
        replies = [r for r in replies if r["num-examples"] > 0]
        prefix = "fed" if split == "local" else "test/fedbn"
        out: common.Metrics = {}
        if not replies:
            return out
        # On the shared split each client's model counts by its training examples (a
        # population-weighted personalised accuracy); local test splits count equally.
        train_sizes = {c.pid: len(c.train) for c in self.parts.clients}
        weights = np.array(
            [train_sizes[int(r["pid"])] if split != "local" else 1.0 for r in replies], float
        )
        for mode in modes:
            for what in ("acc", "loss"):
                values = np.array([r[f"{mode}_{what}"] for r in replies])
                mean = float(np.average(values, weights=weights))
                out[f"{prefix}/{mode}/{what}_mean"] = mean
                spread = np.average((values - mean) ** 2, weights=weights)
                out[f"{prefix}/{mode}/{what}_std"] = float(np.sqrt(spread))
            if mode == modes[0]:
                for r in replies:
                    out[f"{prefix}/{mode}/acc_client{int(r['pid'])}"] = r[f"{mode}_acc"]
        return out

    def _start_clients_early(self) -> None:
        """Start Ray and the clients' actors in the background while the data are read.

        Only for a run that starts its own simulation on Ray (see
        :func:`fedkws.fl.simulation.start_early`).
        """
        if self.grid is not None or self.spec.federation.backend != "ray":
            return
        from fedkws.fl import actor_keeper, simulation

        # A sweep's jobs hand their actors on instead; generating the dataset forks.
        if not actor_keeper.active() and common.data_ready(self.spec):
            simulation.start_early(**self._simulation_resources())

    def _simulation_resources(self) -> dict[str, Any]:
        """The simulation's Ray instance and what its clients' actors hold."""
        fed = self.spec.federation
        return {
            "client_resources": {"num_cpus": fed.num_cpus, "num_gpus": fed.num_gpus},
            "ray_init_args": dict(fed.ray_init_args),
            "ray_address": fed.ray_address,
            "actors": fed.actors,
        }

    def _final_queries_due(self) -> bool:
        """Whether the run is complete and its final evaluation still needs the clients.

        The final model's exact statistics (unless the last round's evaluation
        computed them), or (FedBN, SiloBN) each client's model on the shared test split.
        True for a resumed run whose rounds were all done before its final evaluation
        was (stopped during it, or its results.json lost).
        """
        if not self._complete():
            return False
        if keeps_client_state(self.spec.bn.sync):
            return not self.shared_test
        return (
            "recalibrated" in common.final_modes(self.spec, self.model)
            and self.recalibrated_round != self.spec.train.rounds
        )

    def _while_clients_are_up(self) -> None:
        """What the final evaluation needs from the clients (:meth:`_final_queries_due`)."""
        if not self._final_queries_due():
            return
        if keeps_client_state(self.spec.bn.sync):
            self.shared_test = self._federated_evaluate(self.spec.train.rounds, "testing")
        else:
            self.evaluator.recalibrated(self.model)
            self.recalibrated_round = self.spec.train.rounds

    # -- train / finish ----------------------------------------------------------------------

    def train(self) -> None:
        """Start the clients (Ray, or in process) and run the rounds of this invocation.

        With no rounds left, the clients start only for the final evaluation's queries.
        """
        if self.run.start_round > self.run.last_round and not self._final_queries_due():
            from fedkws.fl import simulation

            simulation.end_early()  # no clients needed: Ray is not kept up meanwhile
            return
        from fedkws.fl import actor_keeper
        from fedkws.fl.server_app import FlowerClients, node_count
        from fedkws.fl.simulation import simulate

        fed = self.spec.federation
        phases, served, started = self.run.phases, [], time.perf_counter()

        def serve(grid) -> None:
            self.clients_api = FlowerClients(
                grid, len(self.parts.clients), self.task, supernodes=fed.supernodes
            )
            self.clients_api.discover()
            phases["clients_start"] = time.perf_counter() - started  # Ray, actors, discovery
            self.actors_reused = actor_keeper.reused_actors() if fed.backend == "ray" else 0
            try:
                common.run_rounds(self, self.run)
                with self.run.timed("final_queries"):
                    self._while_clients_are_up()
                if self._final_evaluation_applies():
                    # It needs nothing more from the clients: it runs while they stop
                    # (ending the actors or handing them on, and Ray).
                    self.final = common.Background(
                        "fedkws-final-evaluation", self._final_evaluation, self.run.run_dir
                    )
            finally:
                self.clients_api = None
                served.append(time.perf_counter())

        if self.grid is not None:
            serve(self.grid)
            return
        try:
            simulate(
                serve,
                num_supernodes=node_count(len(self.parts.clients), fed.supernodes),
                backend=fed.backend,
                actor_settings={"device": self.task.device,
                                "deterministic": self.task.deterministic},
                **self._simulation_resources(),
            )  # fmt: skip
        except BaseException:
            if self.final is not None:  # the run fails: its files are not written behind it
                self.final.wait()
            raise
        if served:
            phases["clients_stop"] = time.perf_counter() - served[0]  # actors and Ray ended

    def finish(self, run_dir: Path) -> Result:
        """Summary and, for a complete run, the test split; returns the Result."""
        spec = self.spec
        title = (
            f"{spec.name}: {spec.model.name}/{spec.model.norm}, {spec.strategy.name}, "
            f"{len(self.parts.clients)} clients, bn_sync={spec.bn.sync}"
        )
        summary = common.summary(self.run, self.parts, title, spec.bn.sync)
        summary["failures"] = self.failures
        # Ray actors taken over from the sweep's previous job (fedkws.fl.actor_keeper)
        summary["ray_actors_reused"] = self.actors_reused
        if self.final is not None:  # started as the clients stopped
            with self.run.timed("final_evaluation"):
                summary.update(self.final.result())
        elif self._final_evaluation_applies():  # e.g. a resumed run whose rounds were all done
            with self.run.timed("final_evaluation"):
                summary.update(self._final_evaluation(run_dir))
        summary.update(self.shared_test)
        return self.run.finish(summary)

    def _final_evaluation_applies(self) -> bool:
        """Whether the run is complete and its final model is the driver's to evaluate.

        FedBN and SiloBN have no global BatchNorm: their final numbers are the clients'
        (``shared_test``).
        """
        return self._complete() and not keeps_client_state(self.spec.bn.sync)

    def _complete(self) -> bool:
        """Whether every round of ``train.rounds`` is recorded (this invocation's or before)."""
        rounds = self.run.result.rounds
        return bool(rounds) and rounds[-1].round >= self.spec.train.rounds

    def _final_evaluation(self, run_dir: Path) -> dict[str, Any]:
        """Validation and test of the final model in every final mode (intervals, plots)."""
        if self.recalibrated_round != self.spec.train.rounds:
            self.evaluator.last_recalibrated = None  # not of the final model: skip
        modes = common.final_modes(self.spec, self.model)
        return common.final_evaluation(
            self.evaluator, self.model, self.parts, run_dir, modes, self.spec.plots
        )


def _train_metrics(replies, sampled: int) -> common.Metrics:
    counts = [r.num_examples for r in replies]
    total = max(sum(counts), 1)
    return {
        "train/loss": sum(r.metrics["train_loss"] * n for r, n in zip(replies, counts, strict=True))
        / total,
        "train/acc": sum(r.metrics["train_acc"] * n for r, n in zip(replies, counts, strict=True))
        / total,
        "clients": float(sampled),
    }


def _merge_visits(visits: list) -> Any:
    """One client's visits of a cyclic round as one reply: sums, and means over examples seen."""
    seen = [v.metrics["seen"] for v in visits]
    total = max(sum(seen), 1.0)
    metrics = dict(visits[-1].metrics)
    for key in ("train_loss", "train_acc"):
        metrics[key] = sum(v.metrics[key] * n for v, n in zip(visits, seen, strict=True)) / total
    for key in ("seen", "batches", "seconds"):
        metrics[key] = float(sum(v.metrics[key] for v in visits))
    metrics["visits"] = float(len(visits))
    metrics["bn_digest_in"] = visits[0].metrics["bn_digest_in"]
    state: dict[str, torch.Tensor] = {}
    for visit in visits:  # every key it sent (checked for leaks), as its last visit left them
        state.update(visit.state)
    return dataclasses.replace(visits[-1], metrics=metrics, state=state)


def _client_task(spec: RunSpec, data, clients_file: Path, state_dir: Path):
    from fedkws.fl.messages import ClientTask

    return ClientTask(
        cache_entry=str(data.path),
        feature_key=data.feature_key,
        clients_file=str(clients_file),
        state_dir=str(state_dir),
        model=spec.model.build_args(data.num_classes),
        optimizer_target=spec.optimizer.target,
        optimizer_kwargs=dict(spec.optimizer.kwargs),
        augment=spec.augment,
        features=spec.features,
        bn_sync=spec.bn.sync,
        local_epochs=spec.train.local_epochs,
        batch_size=spec.train.batch_size,
        eval_batch_size=spec.train.eval_batch_size,
        eval_modes=spec.bn.eval_modes,
        prox_mu=spec.strategy.prox_mu,
        seed=spec.seed,
        threads=max(1, int(spec.federation.num_cpus)),
        device=spec.client_device,
        amp=spec.train.amp,
        deterministic=spec.train.deterministic,
        visit=spec.strategy.visit if spec.strategy.cyclic else "",
    )
