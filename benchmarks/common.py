"""What every benchmark shares: the :class:`Ratio` it returns, progress lines, configs, machine.

A benchmark is a module ``benchmarks/<name>.py`` with

- ``TITLE``: one line saying what it measures;
- ``run(args) -> list[Ratio]``: measure, print progress to stderr, return the ratios;
- optionally ``add_arguments(parser)``: its own ``--<name>-...`` options;
- ``if __name__ == "__main__": raise SystemExit(common.main_for(__file__))``, so
  ``python benchmarks/<name>.py`` runs it through the runner.

and is listed in ``BENCHMARKS`` of ``benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
_STARTED = time.monotonic()


class BenchmarkError(RuntimeError):
    """A measured command failed or left something behind: one ``error:`` line, no traceback.

    Any other exception in a benchmark is a bug in it and keeps its traceback.
    """


def at_least(minimum: int):
    """An argparse type: a whole number ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


@dataclass(frozen=True)
class Ratio:
    """One measured quantity next to its target.

    Attributes
    ----------
    name
        Short name, unique within its benchmark.
    value
        The measured value (a ratio, or a quantity in ``unit``).
    target
        The target in words, e.g. ``>= 10x``; a figure shown beside the targets
        without one of its own says ``(no target...`` (its verdict prints ``-``).
    met
        Whether ``value`` meets the target.
    details
        How it was measured and what went into it (one or a few sentences).
    unit
        Printed after the value: ``x`` for ratios, ``GB``, ``%``, ``s``.
    """

    name: str
    value: float
    target: str
    met: bool
    details: str = ""
    unit: str = "x"

    @property
    def has_target(self) -> bool:
        """False for a figure shown beside the targets, whose target reads ``(no target...``."""
        return not self.target.startswith("(no target")

    def verdict(self, yes: str = "yes", no: str = "**no**") -> str:
        """``yes`` or ``no`` for a ratio with a target, ``-`` for one without."""
        if not self.has_target:
            return "-"
        return yes if self.met else no

    def formatted(self) -> str:
        """The value with its unit, e.g. ``12.3x`` or ``1.25 GB``."""
        if self.value != self.value:  # NaN: not measured
            return "n/a"
        digits = 3 if abs(self.value) < 10 else 1
        text = f"{self.value:.{digits}f}"
        return f"{text}x" if self.unit == "x" else f"{text} {self.unit}".rstrip()

    def to_json(self) -> dict[str, Any]:
        """Plain fields (for the record kept in RESULTS.md)."""
        return asdict(self)


def progress(name: str, message: str) -> None:
    """One progress line on stderr: ``[  12.3 s] name: message``."""
    print(f"[{time.monotonic() - _STARTED:7.1f} s] {name}: {message}", file=sys.stderr, flush=True)


def compose(overrides: list[str]):
    """The Hydra config ``fedkws-train`` would run with these overrides (not resolved)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fedkws import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def run_spec(overrides: list[str]):
    """The typed :class:`fedkws.spec.RunSpec` of a config (data paths from the repository root)."""
    from fedkws.spec import from_config

    os.chdir(ROOT)  # data_dir defaults to the relative folder `data`
    return from_config(compose(overrides))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _ram_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")


def machine() -> dict[str, str]:
    """CPU model, cores, RAM, GPU (if any) and the versions that matter."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    try:
        flwr = version("flwr")
    except PackageNotFoundError:
        flwr = "not installed"
    info = {
        "cpu": _cpu_model(),
        "cores": str(cores),
        "ram": f"{_ram_gb():.1f} GB",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr,
    }
    return info


def main_for(path: str, argv: list[str] | None = None) -> int:
    """``python benchmarks/<name>.py [options]``: the runner with ``--only <name>``."""
    import run

    args = sys.argv[1:] if argv is None else argv
    return run.main(["--only", Path(path).stem, *args], command=run.command_line(args))
