"""``fedkws`` command: dataset tools and reports (training is ``fedkws-train``).

fedkws generate --root data/synthetic        # embedded synthetic dataset
fedkws download --root data/speech_commands_v0.02 --version v0.02
fedkws report outputs/bn_ablation/multirun/<date>/<time>
fedkws caveat outputs/train_mode_caveat/<date>/<time>   # train mode vs evaluation batch
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from fedkws.errors import user_errors


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``error:`` line (exit 2), like every other one."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _at_least(low: float, kind: type = int, high: float | None = None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} is less than {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} is more than {high}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _folder(text: str) -> Path:
    if not text.strip():  # Path("") is the current folder
        raise argparse.ArgumentTypeError("empty: name the folder")
    return Path(text)


def _file(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: name the file")
    return Path(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch the sub-commands."""
    from fedkws.data import synth

    args = _parser(synth).parse_args(argv)
    try:
        with user_errors():
            _dispatch(args, synth)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return 0


def _parser(synth) -> argparse.ArgumentParser:
    """``fedkws`` and its sub-commands' options."""
    from fedkws.data.speech_commands import OTHER_WORDS_V2

    parser = _Parser(prog="fedkws", description=__doc__.split("\n")[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate the synthetic Speech Commands dataset")
    synth.add_generate_arguments(gen, types={
        "root": _folder,
        # Three speakers at least: one for each of the training, validation and test splits.
        "speakers": _at_least(3),
        "utterances": _at_least(1),
        "noise_seconds": _at_least(1.0, float),
        "held_out_speakers": _at_least(0),
        "unknown_words": _at_least(0, int, len(OTHER_WORDS_V2)),
        "workers": _at_least(1),
    })  # fmt: skip

    dl = sub.add_parser("download", help="download and extract real Speech Commands")
    dl.add_argument("--root", type=_folder, required=True, help="a new or empty folder")
    dl.add_argument("--version", choices=("v0.01", "v0.02"), default="v0.02")
    dl.add_argument("--url", type=_url, default=None, help="mirror URL (default: official)")
    dl.add_argument("--sha256", type=_sha256, default=None, help="checksum of the archive at --url")

    rep = sub.add_parser("report", help="table of a sweep's (or run's) results.json files")
    rep.add_argument("paths", type=Path, nargs="+", help="run or sweep folders")
    rep.add_argument("--markdown", type=_file, default=None, help="also write the table here")
    rep.add_argument("--plot", type=_file, default=None, help="also draw the curves to this PNG")
    rep.add_argument(
        "--columns", type=_patterns, default=None,
        help="only these value columns: comma-separated shell patterns, e.g. 'test/*/acc'",
    )  # fmt: skip

    cav = sub.add_parser("caveat", help="train-mode accuracy of a run vs evaluation batch")
    cav.add_argument("run", type=Path, help="a finished run folder")
    cav.add_argument(
        "--batch-sizes", type=_sizes, default=(1, 8, 64, 512), help="comma-separated, e.g. 1,8,64"
    )
    return parser


def _generate(args: argparse.Namespace, synth) -> None:
    """``fedkws generate``: its options' mistakes as one line, in the options' own words."""
    from fedkws.data.errors import DataError
    from fedkws.fileio import why_not_a_folder

    params = synth.arguments_params(args)
    held_out, speakers = params["held_out_speakers"], params["num_speakers"]
    most = synth.max_held_out(speakers)
    if held_out is not None and speakers >= 3 and not 1 <= held_out <= most:
        given = "" if args.held_out_speakers is not None else " (the default)"
        raise DataError(
            f"--held-out-speakers={held_out}{given} leaves no training speaker with "
            f"--speakers={speakers}; allowed: {synth.held_out_allowed(speakers)}, or 0 for 10 %"
        )
    if why := why_not_a_folder(args.root):
        raise DataError(f"--root {args.root}: {why}")
    if differences := synth.other_settings(args.root, **params):  # kept, never generated over
        keys_values = [d.removeprefix("dataset.generate.").partition("=") for d in differences]
        settings = "; ".join(  # in the options' own words: --held-out-speakers=...
            f"--{key.replace('_', '-')}={value}".replace("--unknown-words=null", "--all-words")
            for key, _, value in keys_values
        )
        raise DataError(
            f"--root {args.root} holds a synthetic dataset generated with other settings "
            f"({settings}): give the settings it has, another --root, or delete that folder "
            "to generate it again"
        )
    try:
        summary = synth.generate(args.root, **params)
    except (ValueError, FileExistsError) as err:  # documented: bad sizes, a folder not ours
        raise DataError(str(err)) from err
    print(summary.describe())


def _url(text: str) -> str:
    if not text.strip():  # "" would download the official archive, unverified
        raise argparse.ArgumentTypeError("empty: give the mirror's URL, or leave --url out")
    return text


def _sha256(text: str) -> str:
    from fedkws.data.download import as_sha256

    if as_sha256(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not 64 hexadecimal digits")
    return text


def _sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(_at_least(1)(part) for part in text.split(","))
    if not sizes:
        raise argparse.ArgumentTypeError("no batch size given")
    return sizes


def _patterns(text: str) -> list[str]:
    patterns = [part.strip() for part in text.split(",") if part.strip()]
    if not patterns:
        raise argparse.ArgumentTypeError("no column pattern given")
    return patterns


def _dispatch(args: argparse.Namespace, synth) -> None:
    if args.command == "generate":
        _generate(args, synth)
    elif args.command == "download":
        from fedkws.data.download import download_speech_commands

        root = download_speech_commands(
            args.root, version=args.version, url=args.url, sha256=args.sha256
        )
        print(f"Speech Commands {args.version} ready at {root}")
    elif args.command == "caveat":
        from fedkws.caveat import caveat

        print(caveat(args.run, args.batch_sizes), end="")
    else:
        from fedkws.report import report

        print(report(args.paths, markdown=args.markdown, plot=args.plot, columns=args.columns))


if __name__ == "__main__":
    sys.exit(main())
