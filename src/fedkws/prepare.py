"""Prepare the data of a config without training: generate/download, cache, summarise.

.venv/bin/fedkws-prepare                       # embedded synthetic dataset
.venv/bin/fedkws-prepare partition=dirichlet partition.alpha=0.1
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fedkws import CONF_DIR
from fedkws.clients import make_clients
from fedkws.data import partition as part
from fedkws.data.pipeline import load_dataset
from fedkws.errors import user_errors

log = logging.getLogger(__name__)


def prepare_data(cfg: DictConfig, out_dir: Path) -> str:
    """Build the cache and the client partition of ``cfg``; return the printed report."""
    data = load_dataset(cfg.dataset, cfg.features, cfg.cache_dir, progress=cfg.progress)
    clients = make_clients(data, cfg.partition, seed=int(cfg.seed))
    png = part.plot(
        [c.train for c in clients], data.labels, data.label_names, out_dir / "partition.png"
    )
    text = "\n".join(
        [
            data.summary(),
            f"  cache build: waveforms {data.manifest['waves_seconds']} s, features "
            + ", ".join(f"{v['seconds']} s" for v in data.manifest["features"].values()),
            "",
            f"partition '{cfg.partition.scheme}' of the training split (local train rows):",
            part.summary([c.train for c in clients], data.labels, data.label_names),
            f"label distribution plot: {png}",
        ]
    )
    (out_dir / "data_summary.txt").write_text(text + "\n")
    return text


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    """Entry point of ``fedkws-prepare``."""
    from hydra.core.hydra_config import HydraConfig

    with user_errors():
        print(prepare_data(cfg, Path(HydraConfig.get().runtime.output_dir)))


if __name__ == "__main__":
    main()
