"""Run the benchmark suite: every ratio next to its target, then ``benchmarks/RESULTS.md``.

    .venv/bin/python benchmarks/run.py                    # every registered benchmark
    .venv/bin/python benchmarks/run.py --only pipeline    # one (repeat --only for more)
    .venv/bin/python benchmarks/pipeline.py               # the same as --only pipeline
    make bench

Each benchmark prints progress on stderr while it runs, then one line per
ratio on stdout: name, measured value, target, met / NOT MET. RESULTS.md
keeps one section per benchmark; a run replaces the sections of the
benchmarks it ran and keeps the others. Every number in it is written here.

To add a benchmark: write ``benchmarks/<name>.py`` (see ``common.py`` for what
it exposes) and add its name to :data:`BENCHMARKS`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import re
import shlex
import sys
import traceback
from pathlib import Path
from types import ModuleType

import common
from common import Ratio

# Registered benchmarks, in the order they run and appear in RESULTS.md.
BENCHMARKS: tuple[str, ...] = ("pipeline", "overhead", "evaluation", "sweep", "scale", "layout")

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
_SECTION = re.compile(
    r"<!-- benchmark (?P<name>[A-Za-z0-9_-]+) start\n(?P<record>.*?)\n-->\n.*?"
    r"<!-- benchmark (?P=name) end -->",
    re.S,
)


class UsageError(Exception):
    """Bad command-line input: one ``error:`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one error line, not argparse's usage block
        raise UsageError(message)


def _modules() -> tuple[dict[str, ModuleType], dict[str, str]]:
    """The registered benchmark modules, and why each one that does not import failed."""
    modules, broken = {}, {}
    for name in BENCHMARKS:
        try:
            modules[name] = importlib.import_module(name)
        except Exception as err:  # reported when that benchmark is asked for
            broken[name] = f"{type(err).__name__}: {err}"
    return modules, broken


def _parser(modules: list[ModuleType]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="benchmarks/run.py",
        description="Run fedkws's benchmarks and rewrite benchmarks/RESULTS.md.",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only this benchmark (repeatable; default all: {', '.join(BENCHMARKS)})",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="Markdown file to update (default benchmarks/RESULTS.md)",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print the ratios, leave RESULTS.md alone"
    )
    for module in modules:
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser.add_argument_group(module.__name__))
    return parser


def _selected(only: list[str] | None) -> list[str]:
    if not only:
        return list(BENCHMARKS)
    names = [n for item in only for n in item.split(",") if n]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise UsageError(f"unknown benchmark {unknown[0]!r}; registered: {', '.join(BENCHMARKS)}")
    return list(dict.fromkeys(names))


def command_line(argv: list[str]) -> str:
    """The command line of this process, paths relative to the repository."""
    words = []
    for path in (Path(sys.executable), Path(sys.argv[0]).absolute()):
        try:
            words.append(str(path.relative_to(common.ROOT)))
        except ValueError:
            words.append(str(path))
    return shlex.join([*words, *argv])


def print_ratio(bench: str, ratio: Ratio) -> None:
    """One result line on stdout."""
    verdict = ratio.verdict("met", "NOT MET")
    print(
        f"{bench}/{ratio.name}: {ratio.formatted()}  (target {ratio.target})  {verdict}",
        flush=True,
    )


# ---------------------------------------------------------------------------- RESULTS.md


def read_records(path: Path) -> dict[str, dict]:
    """The record of every section of ``path`` (none if it is missing or unreadable)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    out = {}
    for match in _SECTION.finditer(text):
        try:
            out[match["name"]] = json.loads(match["record"])
        except json.JSONDecodeError:
            continue
    return out


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _machine_line(m: dict[str, str]) -> str:
    return (
        f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('ram', '?')} RAM, "
        f"GPU: {m.get('gpu', 'none')}; Python {m.get('python', '?')}, "
        f"torch {m.get('torch', '?')}, flwr {m.get('flwr', '?')}"
    )


def _section(name: str, record: dict) -> str:
    ratios = [Ratio(**r) for r in record["ratios"]]
    lines = [
        f"<!-- benchmark {name} start",
        json.dumps(record, sort_keys=True),
        "-->",
        f"## {name}",
        "",
        record.get("title", ""),
        "",
        f"- command: `{record['command']}`",
        f"- date: {record['date']}",
        f"- machine: {_machine_line(record['machine'])}",
        "",
        "| ratio | value | target | met | details |",
        "|---|---|---|---|---|",
    ]
    for r in ratios:
        cells = [_cell(r.name), r.formatted(), _cell(r.target), r.verdict(), _cell(r.details)]
        lines.append("| " + " | ".join(cells) + " |")
    if record.get("notes"):
        lines += ["", record["notes"]]
    lines.append(f"<!-- benchmark {name} end -->")
    return "\n".join(lines)


def render(records: dict[str, dict]) -> str:
    """The whole of RESULTS.md: an overview of every ratio, then one section per benchmark."""
    order = [n for n in BENCHMARKS if n in records] + sorted(set(records) - set(BENCHMARKS))
    lines = [
        "# Benchmark results",
        "",
        "Written by `benchmarks/run.py` (`make bench`); do not edit by hand. A run",
        "replaces the sections of the benchmarks it ran and keeps the others, so the",
        "sections can come from different dates: each names its command, date and machine.",
        "",
        "| benchmark | ratio | value | target | met | date |",
        "|---|---|---|---|---|---|",
    ]
    for name in order:
        for r in (Ratio(**x) for x in records[name]["ratios"]):
            lines.append(
                f"| {name} | {_cell(r.name)} | {r.formatted()} | {_cell(r.target)} | {r.verdict()} "
                f"| {records[name]['date']} |"
            )
    for name in order:
        lines += ["", _section(name, records[name])]
    return "\n".join(lines) + "\n"


def write_results(path: Path, new: dict[str, dict]) -> None:
    """Replace the sections of ``new`` in ``path``; keep the other benchmarks' sections."""
    records = read_records(path)
    records.update(new)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(render(records))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- main


def _run_one(name: str, module: ModuleType, args: argparse.Namespace) -> list[Ratio]:
    common.progress(name, f"start: {module.TITLE}")
    ratios = list(module.run(args))
    if not ratios or not all(isinstance(r, Ratio) for r in ratios):
        raise TypeError(f"{name}.run() must return a non-empty list of Ratio")
    return ratios


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    """Entry point; returns the exit status (2: bad input, 1: a benchmark failed).

    ``command`` is what RESULTS.md names as the command (default: this process's).
    """
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("WANDB_MODE", "disabled")
    try:
        modules, broken = _modules()
        parser = _parser(list(modules.values()))
        args = parser.parse_args(argv)
        if args.list:
            for name in BENCHMARKS:
                about = modules[name].TITLE if name in modules else f"cannot import: {broken[name]}"
                print(f"{name}: {about}")
            return 0
        names = _selected(args.only)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    command = command or command_line(argv)
    machine = common.machine()
    records: dict[str, dict] = {}
    failed = []
    for name in names:
        if name in broken:
            print(
                f"error: {name}: benchmarks/{name}.py cannot be imported: {broken[name]}",
                file=sys.stderr,
            )
            failed.append(name)
            continue
        try:
            ratios = _run_one(name, modules[name], args)
        except KeyboardInterrupt:
            print(f"error: {name}: interrupted", file=sys.stderr)
            return 130
        except Exception as err:  # one benchmark's failure does not hide the others'
            if not isinstance(err, common.BenchmarkError):  # a bug in the benchmark
                traceback.print_exc(file=sys.stderr)
            print(f"error: {name}: {err}", file=sys.stderr)
            failed.append(name)
            continue
        for ratio in ratios:
            print_ratio(name, ratio)
        records[name] = {
            "title": modules[name].TITLE,
            "ratios": [r.to_json() for r in ratios],
            "notes": getattr(modules[name], "NOTES", ""),
            "command": command,
            "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "machine": machine,
        }
    every = [r for rec in records.values() for r in (Ratio(**x) for x in rec["ratios"])]
    targeted = [r for r in every if r.has_target]
    print(f"{sum(r.met for r in targeted)} of {len(targeted)} targets met", flush=True)
    if records and not args.no_write:
        write_results(args.results, records)
        print(f"wrote {args.results}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
