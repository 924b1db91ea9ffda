"""fedkws: federated keyword spotting and the eval-mode BatchNorm collapse."""

from pathlib import Path

__version__ = "0.1.0"

# Hydra configs live at the top of the repository (the package is installed editable).
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
