"""``run(cfg) -> Result``: one training run, centralised or federated, with or without Hydra.

Everything config-shaped is unpacked here into plain arguments; the model,
the clients, the server and the data layer never see the config object.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from fedkws import checkpoint
from fedkws.clients import ClientData, make_clients, save_clients
from fedkws.data import partition as part
from fedkws.data.cache import CachedDataset
from fedkws.data.pipeline import load_dataset
from fedkws.errors import ConfigError
from fedkws.fl import engine
from fedkws.fl.evaluation import GlobalEvaluator, check_eval_modes
from fedkws.fl.server_app import Federation, FederationPlan, RoundCallback, make_server_app
from fedkws.fl.state import BN_SYNC_MODES, KeyPlan, ServerOptimizer, key_plan
from fedkws.models import build_model, count_parameters
from fedkws.tracking import Recorder, Result, RoundRecord, WandbLogger

log = logging.getLogger(__name__)
console = Console(highlight=False, soft_wrap=True)

STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "central")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def model_spec(cfg: DictConfig, num_classes: int) -> dict[str, Any]:
    """Plain keyword arguments of :func:`fedkws.models.build_model`."""
    spec = {k: v for k, v in _plain(cfg.model).items() if k != "name"}
    spec.update(name=cfg.model.name, num_classes=num_classes, norm=cfg.norm.kind)
    spec["groups"] = int(cfg.norm.groups)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}


def _validate(cfg: DictConfig) -> None:
    if cfg.strategy.name not in STRATEGIES:
        raise ConfigError(f"Unknown strategy '{cfg.strategy.name}'. Valid: {', '.join(STRATEGIES)}")
    if cfg.bn.sync not in BN_SYNC_MODES:
        raise ConfigError(f"Unknown bn.sync '{cfg.bn.sync}'. Valid: {', '.join(BN_SYNC_MODES)}")
    try:
        check_eval_modes(list(cfg.bn.eval_modes), cfg.bn.sync)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if int(cfg.train.rounds) < 1:
        raise ConfigError(f"train.rounds must be at least 1, got {cfg.train.rounds}")


def _hydra_names(cfg: DictConfig, run_dir: Path) -> tuple[str, str]:
    """W&B group (the sweep) and run name (the override dirname)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        name = hc.job.override_dirname or cfg.name
        if hc.mode == RunMode.MULTIRUN:
            return f"{cfg.name}/{Path(hc.sweep.dir).name}", f"{name}/seed={cfg.seed}"
        return cfg.name, name
    except ValueError:  # not launched by Hydra
        return cfg.name, run_dir.name


def _format_round(round_: int, rounds: int, metrics: dict[str, float], seconds: float) -> str:
    parts = [f"[bold]round {round_:>3}/{rounds}[/bold]"]
    if "train/acc" in metrics:
        parts.append(f"train acc {metrics['train/acc']:.3f}")
    for key in sorted(metrics):
        if key.startswith(("val/", "fed/")) and key.endswith(("/acc", "/acc_mean")):
            label = key.replace("/acc_mean", " (mean over clients)").replace("/acc", "")
            parts.append(f"{label} {metrics[key]:.3f}")
    parts.append(f"{seconds:.1f} s")
    return " | ".join(parts)


def run(cfg: DictConfig, run_dir: Path | str | None = None) -> Result:
    """Train one configuration; write results.json, plots, checkpoints; return the Result.

    Parameters
    ----------
    cfg
        A composed fedkws config (``conf/config.yaml`` plus overrides).
    run_dir
        Where the run's files go. Default: Hydra's output dir of this job.
    """
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _validate(cfg)
    seed = int(cfg.seed)
    central = cfg.strategy.name == "central"
    # Nothing crosses a wire in the centralised baseline: bn_sync does not apply.
    bn_sync = "central" if central else cfg.bn.sync
    progress = bool(cfg.progress)

    data = load_dataset(cfg.dataset, cfg.features, cfg.cache_dir, progress=progress)
    clients = make_clients(data, cfg.partition, seed=seed)
    clients_file = save_clients(clients, run_dir / "clients.npz")
    part.plot([c.train for c in clients], data.labels, data.label_names, run_dir / "partition.png")
    val_rows = data.split_indices("validation")
    test_rows = data.split_indices("testing")
    (run_dir / "data_summary.txt").write_text(data.summary() + "\n")
    console.print(
        f"data: {len(data.labels)} examples ({len(data.split_indices('training'))} training, "
        f"{len(val_rows)} validation, {len(test_rows)} test), {data.num_classes} classes, "
        f"{len(clients)} clients; {data.manifest['audio_report']}"
    )

    spec = model_spec(cfg, data.num_classes)
    torch.manual_seed(engine.stream_seed(seed, 0x1E17))
    try:
        model = build_model(**spec)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model: {err}") from err
    threads = max(1, int(cfg.federation.client_resources.num_cpus))
    task: dict[str, Any] = {
        "cache": {"entry": str(data.path), "feature_key": data.feature_key},
        "clients_file": str(clients_file),
        "state_dir": str(run_dir / "client_state"),
        "model": spec,
        "optimizer": _plain(cfg.optimizer),
        "augment": _plain(cfg.augment),
        "features": _plain(cfg.features),
        "bn_sync": cfg.bn.sync,
        "local_epochs": int(cfg.train.local_epochs),
        "batch_size": int(cfg.train.batch_size),
        "eval_batch_size": int(cfg.train.eval_batch_size),
        "eval_modes": list(cfg.bn.eval_modes),
        "prox_mu": float(cfg.strategy.prox_mu),
        "seed": seed,
        "threads": threads,
    }
    plan = key_plan(model, cfg.bn.sync)
    server_opt = ServerOptimizer(
        "fedavg" if central else cfg.strategy.name,
        lr=float(cfg.strategy.server_lr),
        momentum=float(cfg.strategy.server_momentum),
        beta_1=float(cfg.strategy.beta_1),
        beta_2=float(cfg.strategy.beta_2),
        tau=float(cfg.strategy.tau),
    )

    ckpt = None
    if cfg.resume:
        ckpt = checkpoint.load(run_dir)
        if ckpt is None:
            log.warning("resume=true but %s has no checkpoint: starting from round 1", run_dir)
    elif (run_dir / checkpoint.FILENAME).exists():
        raise ConfigError(
            f"{run_dir} already holds a checkpoint; pass resume=true to continue that run "
            "or choose another folder"
        )
    start_round = 1
    result = Result(config=_plain(cfg))
    result.config["num_classes"] = data.num_classes
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
        if not central:
            server_opt.load_state_dict(ckpt.server_optimizer)
        start_round = ckpt.round + 1
        result.rounds = [RoundRecord(**r) for r in ckpt.records]
        console.print(f"resuming {run_dir} after round {ckpt.round}")

    group, name = _hydra_names(cfg, run_dir)
    wandb = WandbLogger(
        mode=cfg.logger.mode,
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        tags=list(cfg.logger.tags or []),
        config=result.config,
        run_dir=run_dir,
        group=group,
        name=name,
        run_id=(ckpt.extra.get("wandb_id") if ckpt else None),
    )
    recorder = Recorder(run_dir, result, wandb)
    rounds = int(cfg.train.rounds)
    stop_after = cfg.train.get("stop_after_round")
    clock = {"t": time.perf_counter()}

    def on_round(round_: int, metrics: dict, client_info: dict, net, opt) -> None:
        seconds = time.perf_counter() - clock["t"]
        clock["t"] = time.perf_counter()
        recorder.log_round(RoundRecord(round_, metrics, seconds, client_info))
        opt_state = opt.state_dict()
        checkpoint.save(
            run_dir,
            checkpoint.Checkpoint(
                round=round_,
                model=net.state_dict(),
                server_optimizer=opt_state,
                records=[r.__dict__ for r in recorder.result.rounds],
                extra={"wandb_id": wandb.run_id or ""},
            ),
        )
        if progress:
            console.print(_format_round(round_, rounds, metrics, seconds))

    started = time.perf_counter()
    label = "centralised" if central else f"{cfg.strategy.name}, {len(clients)} clients"
    console.print(
        f"[bold]{cfg.name}[/bold]: {spec['name']} ({count_parameters(model):,} parameters, "
        f"norm={spec['norm']}), {label}, bn_sync={bn_sync}, {rounds} rounds -> {run_dir}"
    )
    exit_code = 1
    try:
        if central:
            train_rows = np.sort(np.concatenate([c.train for c in clients]))
            evaluator = GlobalEvaluator(
                data,
                list(cfg.bn.eval_modes),
                int(cfg.train.eval_batch_size),
                moments_of=lambda net, layer: [
                    engine.bn_input_moments(
                        net, data, train_rows, layer, int(cfg.train.eval_batch_size)
                    )
                ],
            )
            from fedkws.central import train_central

            opt_state = ckpt.server_optimizer if ckpt else None
            train_central(
                model,
                data,
                train_rows,
                val_rows,
                task,
                evaluator,
                rounds,
                start_round,
                on_round,
                optimizer_state=opt_state,
                stop_after_round=stop_after,
            )
            # The last round's evaluation already recalibrated the final model.
            recalibrated = evaluator.last_recalibrated
            if recalibrated is None and "recalibrated" in cfg.bn.eval_modes:
                recalibrated = evaluator.recalibrated(model)
        else:
            federation = _federate(
                cfg,
                task,
                model,
                plan,
                server_opt,
                data,
                val_rows,
                clients,
                start_round,
                rounds,
                stop_after,
                on_round,
            )
            evaluator = federation.evaluator
            recalibrated = evaluator.last_recalibrated
        if recalibrated is not None and recalibrated is not model:
            stats = {k: v for k, v in recalibrated.state_dict().items() if "running_" in k}
            torch.save(stats, run_dir / "recalibrated_bn.pt")
        last_round = result.rounds[-1].round if result.rounds else 0
        summary: dict[str, Any] = {
            "title": f"{cfg.name}: {spec['name']}/{spec['norm']}, {label}, bn_sync={bn_sync}",
            "strategy": cfg.strategy.name,
            "bn_sync": bn_sync,
            "norm": spec["norm"],
            "model": spec["name"],
            "num_parameters": count_parameters(model),
            "num_clients": len(clients),
            "client_names": [c.name for c in clients],
            "num_classes": data.num_classes,
            "label_names": list(data.label_names),
            "eval_batch_size": int(cfg.train.eval_batch_size),
            "rounds_completed": last_round,
            "complete": last_round >= rounds,
            "wall_s": time.perf_counter() - started,
            "wandb_dir": wandb.run_path,
        }
        if result.rounds:
            summary.update(
                {
                    f"final/{k}": v
                    for k, v in result.rounds[-1].metrics.items()
                    if "/acc" in k or "/loss" in k
                }
            )
        if last_round >= rounds and bn_sync != "local":
            summary.update(_test(evaluator, model, test_rows, recalibrated, run_dir, data))
        recorder.finish(summary)
        exit_code = 0
    finally:
        wandb.finish(exit_code)
    return result


def _federate(
    cfg: DictConfig,
    task: dict[str, Any],
    model: torch.nn.Module,
    plan: KeyPlan,
    server_opt: ServerOptimizer,
    data: CachedDataset,
    val_rows: np.ndarray,
    clients: list[ClientData],
    start_round: int,
    rounds: int,
    stop_after: int | None,
    on_round: RoundCallback,
) -> Federation:
    """Run the Flower simulation; return the Federation (model, evaluator, last recalibration)."""
    from fedkws.fl.simulation import simulate

    fed_plan = FederationPlan(
        task=task,
        num_clients=len(clients),
        rounds=rounds,
        start_round=start_round,
        fraction_train=float(cfg.strategy.fraction_train),
        min_train_clients=int(cfg.strategy.min_train_clients),
        eval_modes=list(cfg.bn.eval_modes),
        recalibrate_every=max(1, int(cfg.bn.recalibrate_every)),
        federated_eval=bool(cfg.federation.federated_eval),
        seed=int(cfg.seed),
        stop_after_round=stop_after,
    )
    federation = Federation(fed_plan, model, plan, server_opt, data, val_rows, on_round)
    if start_round <= rounds and (stop_after is None or start_round <= stop_after):
        simulate(
            make_server_app(federation),
            num_clients=len(clients),
            client_resources=_plain(cfg.federation.client_resources),
            ray_init_args=_plain(cfg.federation.ray_init_args),
        )
    return federation


def _test(evaluator, model, test_rows, recalibrated, run_dir, data) -> dict[str, Any]:
    """Final test-split metrics, per-class accuracy and confusion matrices."""
    # Federated recalibration needs the clients, which are gone after the simulation: the
    # test split uses the last round's recalibrated model, or skips the mode if there is none.
    modes = [m for m in evaluator.modes if m != "recalibrated" or recalibrated is not None]
    metrics, stats = evaluator.run(model, test_rows, "test", recalibrated, modes)
    out: dict[str, Any] = dict(metrics)
    for mode, st in stats.items():
        out[f"test/{mode}/per_class_acc"] = {
            name: (None if np.isnan(a) else float(a))
            for name, a in zip(data.label_names, st.per_class_acc(), strict=True)
        }
        out[f"test/{mode}/confusion"] = st.confusion.tolist()
        _plot_confusion(st.confusion, data.label_names, mode, run_dir / f"confusion_{mode}.png")
    return out


def _plot_confusion(confusion: np.ndarray, labels, mode: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5.2))
    norm = confusion / confusion.sum(1, keepdims=True).clip(min=1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels, rotation=60, fontsize=7)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(confusion) / max(confusion.sum(), 1)
    ax.set_title(f"test confusion, {mode} mode (acc {acc:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
