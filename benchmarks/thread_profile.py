"""Run a console entry point with cProfile in every Python thread; save the merged profile.

    .venv/bin/python benchmarks/thread_profile.py OUT.json fedkws.train:main [args...]

cProfile only sees the thread that enabled it, and a Flower simulation does its
work in threads (the ServerApp, the simulation engine's message pump and
workers), so ``Thread.run`` is wrapped to profile each thread on its own. At
exit the profiles of the main thread and of every thread that finished are
written to ``OUT.json`` as ``{thread name: [[function, calls, own s, cumulative
s], ...]}`` (largest cumulative first), ``function`` as ``file:line(name)``.
"""

from __future__ import annotations

import cProfile
import importlib
import json
import pstats
import sys
import threading
from pathlib import Path

_DONE: list[tuple[str, cProfile.Profile]] = []
_run = threading.Thread.run


def _profiled_run(self: threading.Thread) -> None:
    profile = cProfile.Profile()
    profile.enable()
    try:
        _run(self)
    finally:
        profile.disable()
        _DONE.append((self.name, profile))


def _group(name: str) -> str:
    # Thread names end in a counter ("Thread-12 (worker)", "ThreadPoolExecutor-0_1").
    base = name.split(" (")[-1].rstrip(")") if " (" in name else name
    return base.rstrip("0123456789_-") or name


def main() -> None:
    """Entry point: profile ``module:function`` with the remaining arguments."""
    out, target, *args = sys.argv[1:]
    module, func = target.split(":")
    threading.Thread.run = _profiled_run
    main_profile = cProfile.Profile()
    sys.argv = [target, *args]
    main_profile.enable()
    try:
        getattr(importlib.import_module(module), func)()
    finally:
        main_profile.disable()
        merged: dict[str, pstats.Stats] = {}
        for name, profile in [("MainThread", main_profile), *_DONE]:
            group = _group(name)
            if group in merged:
                merged[group].add(profile)
            else:
                merged[group] = pstats.Stats(profile)
        result = {}
        for group, stats in merged.items():
            rows = [
                [f"{f}:{ln}({fn})", nc, round(tt, 4), round(ct, 4)]
                for (f, ln, fn), (_, nc, tt, ct, _) in stats.stats.items()
            ]
            result[group] = sorted(rows, key=lambda r: -r[3])[:80]
        Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
