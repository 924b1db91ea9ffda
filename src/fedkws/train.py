"""Hydra entry point: ``fedkws-train [overrides]``; see ``conf/config.yaml``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fedkws import CONF_DIR
from fedkws.errors import user_errors


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job and return the final validation accuracy (for sweepers)."""
    from fedkws.run import run

    with user_errors():
        result = run(cfg)
    metrics = result.rounds[-1].metrics if result.rounds else {}
    for key in ("val/eval/acc", "fed/eval/acc_mean"):
        if key in metrics:
            return float(metrics[key])
    return None


if __name__ == "__main__":
    main()
