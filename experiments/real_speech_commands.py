"""Size and expected run time of a preset on the real Speech Commands, from what is here.

    .venv/bin/python experiments/real_speech_commands.py outputs/bn_study/multirun/<date>/<time>

The real archives cannot be downloaded on the development machine, so the sizes are
derived from the one real split list kept beside the checkout (v0.02's
``testing_list.txt``, ``FEDKWS_REFERENCE_DIR``) and the published clip counts, and
the times from finished sweeps on the embedded dataset:

- 12-class testing split of v0.02: the ten command words counted in the real list,
  plus ``_silence_`` and ``_unknown_`` at 10 % of that count each (the protocol).
- 12-class training split: 8 x the testing split, because the hash rule sends 80 % of
  the speakers to training and 10 % to testing (an estimate: speakers differ in how
  many clips they recorded).
- v0.01: the v0.02 estimate scaled by the clip counts (64,727 / 105,829); a rough
  estimate only (v0.01 has 30 words, v0.02 35).
- Time of a job: its measured wall time on the embedded dataset scaled by the ratio of
  training rows (per-round training, evaluation and recalibration grow with the data;
  the one-off feature cache build on first use is not included).

After a real download, ``fedkws-prepare dataset=speech_commands_v2`` prints the exact
split sizes.

``--preset NAME`` times another preset from a sweep that holds all its jobs (e.g.
``literature``, whose cells are cells of ``bn_study``): only the jobs whose overrides
take, for every key the preset sweeps, one of the preset's values are counted, and
the elapsed time is their wall time plus the sweep's mean gap between jobs.

    .venv/bin/python experiments/real_speech_commands.py --preset literature \
        outputs/bn_study/multirun/<date>/<time>
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

from fedkws.data.speech_commands import TEN_WORDS

CLIPS = {"v0.01": 64_727, "v0.02": 105_829}  # published clip counts of the two archives
EXTRA = 0.10 + 0.10  # _silence_ and _unknown_, each 10 % of the known-word count
TRAIN_PER_TEST = 80 / 10  # the hash rule's training and testing shares
REFERENCE = Path(
    os.environ.get(
        "FEDKWS_REFERENCE_DIR",
        Path(__file__).resolve().parents[2] / "shared" / "reference" / "speech_commands_v0.02",
    )
)


def split_sizes(testing_list: Path) -> dict[str, dict[str, int]]:
    """Estimated 12-class training and testing rows of v0.02 and v0.01."""
    words = [line.split("/", 1)[0] for line in testing_list.read_text().split()]
    known = sum(word in TEN_WORDS for word in words)
    test = known + 2 * math.ceil(known * EXTRA / 2)
    v2 = {"testing": test, "training": round(test * TRAIN_PER_TEST)}
    scale = CLIPS["v0.01"] / CLIPS["v0.02"]
    return {"v0.02": v2, "v0.01": {k: round(v * scale) for k, v in v2.items()}}


def _embedded_rows(run: Path) -> int | None:
    """Training rows of a run, from the ``total`` line of its data summary."""
    summary = run / "data_summary.txt"
    if not summary.is_file():
        return None
    match = re.search(r"^\s*total\s+(\d+)", summary.read_text(), re.MULTILINE)
    return int(match.group(1)) if match else None


def _values(override) -> set[str]:
    """The values one parsed override stands for (a sweep's, or its single value)."""
    if override.is_sweep_override():
        return set(override.sweep_string_iterator())
    return {override.get_value_element_as_str()}


def preset_sweep(name: str) -> dict[str, set[str]]:
    """The values each key of preset ``name`` sweeps (``hydra.sweeper.params``).

    ``experiment`` is added: the preset itself and the presets its file builds on
    (``literature`` on ``bn_study``), so that another preset's sweep is not read as this one.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fedkws import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params or {}
    if not params:
        raise ValueError(f"experiment={name} sweeps nothing (no hydra.sweeper.params)")
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    out = {o.key_or_group: _values(o) for o in parsed}
    import yaml

    preset_file = Path(CONF_DIR) / "experiment" / f"{name}.yaml"
    bases = yaml.safe_load(preset_file.read_text()).get("defaults") or []
    out["experiment"] = {name} | {b for b in bases if isinstance(b, str) and b != "_self_"}
    return out


def _selected(run: Path, sweep: dict[str, set[str]] | None) -> bool:
    """Whether the job in ``run`` is one of the preset's jobs (every swept key matches)."""
    if sweep is None:
        return True
    overrides = run / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        return False
    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser

    listed = [str(o) for o in yaml.safe_load(overrides.read_text()) or []]
    parsed = OverridesParser.create().parse_overrides(listed)
    given = {o.key_or_group: _values(o) for o in parsed if not o.is_delete()}
    return all(key in given and given[key] <= values for key, values in sweep.items())


def sweep_times(
    sweep: Path, preset: dict[str, set[str]] | None = None
) -> tuple[int, float, int, float]:
    """Jobs, summed wall seconds, the training rows of one run, and the sweep's elapsed time.

    Elapsed: from the first job's ``.hydra`` folder (made when a job starts) to the last
    ``results.json`` written, by modification time. With ``preset`` (:func:`preset_sweep`),
    only its jobs, and elapsed = their wall time + the sweep's mean gap per job x their number.
    """
    walls, rows, started, ended, chosen = [], None, [], [], []
    for path in sorted(sweep.rglob("results.json")):
        summary = json.loads(path.read_text()).get("summary", {})
        if isinstance(summary.get("wall_s"), (int, float)):
            chosen.append(_selected(path.parent, preset))
            walls.append(float(summary["wall_s"]))
            rows = rows or _embedded_rows(path.parent)
            ended.append(path.stat().st_mtime)
            hydra = path.parent / ".hydra"
            started.append(hydra.stat().st_mtime if hydra.is_dir() else ended[-1])
    if not any(chosen) or rows is None:
        which = " of that preset" if preset else ""
        print(f"error: no finished run{which} with a data summary under {sweep}", file=sys.stderr)
        raise SystemExit(2)
    elapsed = max(ended) - min(started)
    if preset is None:
        return len(walls), sum(walls), rows, elapsed
    gap = (elapsed - sum(walls)) / len(walls)
    mine = [w for w, c in zip(walls, chosen, strict=True) if c]
    return len(mine), sum(mine), rows, sum(mine) + gap * len(mine)


def main(argv: list[str] | None = None) -> int:
    """Print the size table, then each sweep's time scaled to the real archives."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", type=Path, nargs="*", help="finished sweep folders")
    parser.add_argument("--testing-list", type=Path, default=REFERENCE / "testing_list.txt")
    parser.add_argument("--preset", help="time only this preset's jobs (see the docstring)")
    args = parser.parse_args(argv)
    if not args.testing_list.is_file():
        print(f"error: no testing list at {args.testing_list} (Speech Commands v0.02's "
              "testing_list.txt: pass --testing-list PATH or set FEDKWS_REFERENCE_DIR)",
              file=sys.stderr)  # fmt: skip
        return 2
    for sweep in args.sweeps:
        if not sweep.is_dir():
            what = "a file, not a sweep's folder" if sweep.exists() else "no such folder"
            print(f"error: {sweep}: {what}", file=sys.stderr)
            return 2
    preset = None
    if args.preset:
        try:
            preset = preset_sweep(args.preset)
        except Exception as err:  # an unknown preset: Hydra's message, on one line
            print(f"error: --preset {args.preset}: {str(err).splitlines()[0]}", file=sys.stderr)
            return 2
    sizes = split_sizes(args.testing_list)
    print("| dataset | 12-class training rows (est.) | 12-class testing rows (est.) |")
    print("|---|---|---|")
    for version, size in sizes.items():
        print(f"| {version} | {size['training']:,} | {size['testing']:,} |")
    for sweep in args.sweeps:
        jobs, wall, rows, elapsed = sweep_times(sweep, preset)
        what = f" ({args.preset}'s jobs, gaps at the sweep's mean)" if preset else ""
        print(f"\n{sweep}{what}: {jobs} jobs in {elapsed / 60:.0f} min ({wall / 60:.0f} min "
              f"inside the jobs' runs) on {rows:,} embedded training rows")  # fmt: skip
        for version, size in sizes.items():
            factor = size["training"] / rows
            print(f"  {version}: x{factor:.1f} -> about {wall * factor / 3600:.1f} h "
                  f"({wall / jobs * factor / 60:.0f} min a job)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
