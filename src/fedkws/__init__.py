"""fedkws: federated keyword spotting and the eval-mode BatchNorm collapse."""

__version__ = "0.1.0"
