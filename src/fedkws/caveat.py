"""How much the 2020 workaround (train-mode evaluation) depends on the evaluation batch.

``fedkws caveat <run folder>`` loads a finished run's final global model and
evaluates its validation split in ``train`` mode (every BatchNorm normalises
with the statistics of the evaluation batch itself) for several batch sizes,
once in a seeded shuffled order (batches that mix the classes) and once in
class-sorted order (batches of one or two classes, as an unshuffled test
loader over class folders gives). Eval mode with the model's running
statistics is the reference row. Writes ``caveat.md``, ``caveat.csv`` and
``caveat.png`` into the run folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedkws.errors import ConfigError
from fedkws.fileio import write_text
from fedkws.plots import figure

BATCH_SIZES = (1, 8, 64, 512)


def _class_sorted(data, rows: np.ndarray) -> np.ndarray:
    # Stable sort by label: within a class, the stored order.
    rows = np.sort(rows)
    return rows[np.argsort(data.labels[rows], kind="stable")]


def _accuracy(model, data, rows: np.ndarray, batch: int, mode: str, order: str, seed: int) -> float:
    from fedkws.core import loops

    if order == "shuffled":
        return loops.evaluate(model, data, rows, batch, mode, order_seed=seed).acc
    ordered = _class_sorted(data, rows)
    return loops.evaluate(model, data, ordered, batch, mode, order_seed=None, keep_order=True).acc


def _load(run_dir: Path):
    from fedkws import checkpoint
    from fedkws.core.models import build_model
    from fedkws.recipes.common import load_data, refuse_other_data
    from fedkws.spec import from_config
    from fedkws.tracking import Result

    if not run_dir.exists():
        raise ConfigError(f"{run_dir}: no such folder")
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file; give the run's folder")
    results = run_dir / "results.json"
    loaded = checkpoint.load(run_dir) if results.is_file() else None
    if loaded is None:
        raise ConfigError(f"{run_dir}: not a finished fedkws run (results.json, checkpoint.pt)")
    ckpt, _ = loaded
    try:
        config = dict(Result.load(results).config)
    except (ValueError, OSError) as err:  # not JSON (a JSONDecodeError is a ValueError)
        raise ConfigError(f"cannot read {results}: {err}") from err
    config.pop("num_classes", None)
    _from_where_it_ran(config, run_dir)
    spec = from_config(config, stored=True)
    if spec.bn.sync == "local" and not spec.strategy.central:
        raise ConfigError(
            f"{run_dir} ran FedBN (bn.sync=local): its global model's BatchNorm never left "
            "the clients (initial weights and statistics), so neither mode means anything here"
        )
    data = load_data(spec)
    refuse_other_data(ckpt, data.identity(), f"caveat of {run_dir}", "put that data back")
    if spec.partition.channels:  # validated on what the feature-shift clients hear
        from fedkws.clients import make_clients
        from fedkws.recipes.common import channel_variant

        data = channel_variant(data, make_clients(data, spec.partition, seed=spec.seed), spec)
    model = build_model(**spec.model.build_args(data.num_classes))
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(
            f"{run_dir}: checkpoint.pt does not fit the model results.json describes ({first})"
        ) from None
    return spec, data, model.eval(), ckpt.round


def _from_where_it_ran(config: dict, run_dir: Path) -> None:
    """Relative data paths of ``config`` made absolute from the folder the run started in.

    A run started as ``fedkws-train data_dir=data`` read ``data`` of its own working
    folder (Hydra's ``runtime.cwd`` in ``.hydra/hydra.yaml``), not the caveat's: from
    elsewhere the dataset would be generated (or downloaded) again there.
    """
    import yaml

    try:
        hydra = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
        started = Path(str(hydra["runtime"]["cwd"]))
    except Exception:  # noqa: BLE001 - no such file, or not Hydra's: paths as they are
        return
    if not started.is_dir():  # a run folder copied from elsewhere: paths as they are
        return
    places = [(config, "data_dir"), (config, "cache_dir"), (config.get("dataset") or {}, "root")]
    for node, key in places:
        value = node.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            node[key] = str(started / value)


def _write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(path)``; an OSError as one line naming ``path`` (not its temp file)."""
    try:
        write(path)
    except OSError as err:  # e.g. a folder named caveat.md, a read-only run folder
        raise ConfigError(f"cannot write {path}: {err.strerror or err}") from err


def _plot(path: Path, table: dict, batch_sizes: tuple[int, ...], num_classes: int) -> None:
    with figure(path, figsize=(6, 4)) as (_, ax):
        for name, values in table.items():
            ax.plot(list(batch_sizes), [values[b] for b in batch_sizes], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("evaluation batch size")
        ax.set_ylabel("validation accuracy")
        ax.axhline(1 / num_classes, color="grey", linestyle=":", label="chance")
        ax.legend()


def caveat(run_dir: Path, batch_sizes: tuple[int, ...] = BATCH_SIZES) -> str:
    """Evaluate, write the files, return the Markdown table."""
    run_dir = Path(run_dir)
    spec, data, model, round_ = _load(run_dir)
    rows = data.split_indices("validation")
    running = "eval (running statistics)"
    if spec.bn.sync == "silo" and not spec.strategy.central:
        running = "eval (initial running statistics: SiloBN keeps them on the clients)"
    arms = {running: ("eval", "shuffled"),
            "train mode, shuffled": ("train", "shuffled"),
            "train mode, class-sorted": ("train", "class-sorted")}  # fmt: skip
    table = {
        name: {b: _accuracy(model, data, rows, b, mode, order, spec.seed) for b in batch_sizes}
        for name, (mode, order) in arms.items()
    }
    header = "| validation accuracy | " + " | ".join(f"batch {b}" for b in batch_sizes) + " |"
    unfinished = (
        f", the model of round {round_} of {spec.train.rounds}: the run is not finished"
        if round_ < spec.train.rounds
        else ""
    )
    lines = [f"{run_dir} (bn_sync={spec.bn.sync}, {len(rows)} examples{unfinished})", "", header,
             "|---|" + "---|" * len(batch_sizes)]  # fmt: skip
    for name, values in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[b]:.3f}" for b in batch_sizes) + " |")
    text = "\n".join(lines) + "\n"
    csv = ["mode,order,batch_size,accuracy"]
    csv += [f"{arms[name][0]},{arms[name][1]},{b},{v:.6f}"
            for name, values in table.items() for b, v in values.items()]  # fmt: skip
    _write(run_dir / "caveat.md", lambda p: write_text(p, text))
    _write(run_dir / "caveat.csv", lambda p: write_text(p, "\n".join(csv) + "\n"))
    _write(run_dir / "caveat.png", lambda p: _plot(p, table, batch_sizes, data.num_classes))
    return text
