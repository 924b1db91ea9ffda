"""Prepare the data of a config without training: generate/download, cache, summarise.

.venv/bin/fedkws-prepare                       # embedded synthetic dataset
.venv/bin/fedkws-prepare partition=dirichlet partition.alpha=0.1
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from fedkws import CONF_DIR, lifecycle
from fedkws.clients import make_clients
from fedkws.data import partition as part
from fedkws.errors import hydra_mistakes_in_one_line, print_error, user_errors
from fedkws.fileio import write_text
from fedkws.recipes.common import check_data_folders, load_data
from fedkws.spec import RunSpec, from_config

log = logging.getLogger(__name__)


def split_sizes(data) -> list[str]:
    """``<split> N speakers/M examples`` per split, as the protocol uses them.

    Examples include silence and unknown; silence slices have no speaker.
    """
    names = np.asarray(data.speaker_names)
    lines = []
    for split in ("training", "validation", "testing"):
        rows = data.split_indices(split)
        speakers = {str(s) for s in names[data.speakers[rows]]} - {"_silence_"}
        lines.append(f"{split} {len(speakers)} speakers/{len(rows)} examples")
    return lines


def prepare_data(spec: RunSpec | DictConfig, out_dir: Path, stoppable: bool = False) -> str:
    """Build the cache and the client partition of ``spec``; return the printed report.

    ``stoppable`` (the command): a stop asked during generation or caching
    (:mod:`fedkws.lifecycle`) ends it there.
    """
    if not isinstance(spec, RunSpec):
        spec = from_config(spec)
    check_data_folders(spec)
    data = load_data(spec)
    if stoppable:
        lifecycle.raise_if_stopping()
    clients = make_clients(data, spec.partition, seed=spec.seed)
    png = part.plot(
        [c.train for c in clients], data.labels, data.label_names, out_dir / "partition.png",
        client_names=[c.name for c in clients],
    )  # fmt: skip
    text = "\n".join(
        [
            data.summary(),
            *split_sizes(data),
            f"  cache build: waveforms {data.manifest['waves_seconds']} s, features "
            + ", ".join(f"{v['seconds']} s" for v in data.manifest["features"].values()),
            "",
            f"partition '{spec.partition.scheme}' of the training split (local train rows):",
            part.summary([c.train for c in clients], data.labels, data.label_names),
            f"label distribution plot: {png}",
        ]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "data_summary.txt", text + "\n")
    return text


def _refuse_a_run_folder(out_dir: Path) -> None:
    """A training run's or a sweep's folder keeps its own partition plot and data summary."""
    from fedkws.errors import RunRefused
    from fedkws.recipes.common import refuse_a_sweeps_folder

    refuse_a_sweeps_folder(out_dir)
    if any((out_dir / name).is_file() for name in ("results.json", "checkpoint.pt")):
        raise RunRefused(
            f"{out_dir} holds a training run: fedkws-prepare would replace its partition.png "
            "and data_summary.txt with this call's; choose another folder"
        )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    """Entry point of ``fedkws-prepare``."""
    from hydra.core.hydra_config import HydraConfig

    from fedkws.train import _tidy_refused, refuse_deleted_keys

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    with user_errors(), lifecycle.graceful_interrupts():
        try:
            _refuse_a_run_folder(out_dir)
            refuse_deleted_keys(list(HydraConfig.get().overrides.task))
            print(prepare_data(from_config(cfg), out_dir, stoppable=True))
        except BaseException as err:
            _tidy_refused(out_dir)  # the folder Hydra made for this failed call, if still empty
            if isinstance(err, (lifecycle.Interrupted, KeyboardInterrupt)):
                # First Ctrl-C / SIGTERM: after the step at hand; second: at once. Whatever
                # was finished (the dataset, cache files) is kept and reused next time.
                print_error(RuntimeError(f"interrupted{lifecycle.stopped_by()}"))
                sys.exit(lifecycle.exit_code())
            raise


def cli() -> None:
    """The console command: :func:`main`, with Hydra's own mistakes as one ``error:`` line."""
    with hydra_mistakes_in_one_line():
        main()


if __name__ == "__main__":
    cli()
