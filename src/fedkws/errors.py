"""Turn expected user mistakes into one clear line instead of a traceback."""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ConfigError(ValueError):
    """A config value that cannot work, with the reason and the valid choices (one per line)."""


class FederationError(RuntimeError):
    """The federation cannot go on (no clients came up, too few replied, a client query failed)."""


class RunRefused(RuntimeError):
    """A run that must not start (it would overwrite or mix up another run's files)."""


class AlreadyComplete(RunRefused):
    """``resume=true`` on a run that has all its rounds and its final evaluation."""


class StopReached(AlreadyComplete):
    """``resume=true`` on a run already at its ``train.stop_after_round``: nothing to train.

    The same command that starts a chunk of a long run (and restarts it after a
    preemption) meets it once the chunk is done: the run is left as it is and the
    command ends without error (a sweep goes on to its next job).
    """


# A run that failed after Hydra gave it a folder keeps why in that folder (the error, and
# for an unexpected one its traceback): ``fedkws report`` lists the run as failed, with
# the first line, and a sweep's other jobs go on (fedkws.train).
FAILED_FILE = "failed.txt"


def write_failure(folder: Path, err: BaseException) -> Path | None:
    """Keep ``err`` in ``folder/failed.txt``; the file, or None when it cannot be written.

    A user error keeps its message; anything else its type, message and traceback.
    """
    import traceback

    if is_user_error(err):
        text = str(err) or type(err).__name__
    else:
        text = f"{type(err).__name__}: {err}\n\n" + "".join(traceback.format_exception(err))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / FAILED_FILE).write_text(text.rstrip() + "\n")
    except OSError:
        return None
    return folder / FAILED_FILE


def read_failure(folder: Path) -> str | None:
    """The first line of ``folder/failed.txt``, or None when the run has not failed."""
    try:
        text = (folder / FAILED_FILE).read_text(errors="replace")
    except OSError:
        return None
    return (text.splitlines() or ["(no message)"])[0]


def _user_error_types() -> tuple[type[BaseException], ...]:
    from fedkws.data.download import DownloadError
    from fedkws.data.errors import DataError, DatasetNotFoundError

    return (
        ConfigError,
        RunRefused,
        DataError,
        DatasetNotFoundError,
        DownloadError,
        FederationError,
    )


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is a mistake the user can fix (said in one line), not a fault."""
    return isinstance(err, _user_error_types())


def print_error(err: BaseException) -> None:
    """``error: <message>``: one line per line of the message, nothing else."""
    for line in str(err).splitlines() or [type(err).__name__]:
        print(f"error: {line}", file=sys.stderr)


@contextmanager
def user_errors() -> Iterator[None]:
    """Print ``error: <message>`` and exit with status 2 on a user error."""
    try:
        yield
    except _user_error_types() as err:
        print_error(err)
        sys.exit(2)


# Config sections whose keys are constructor arguments, or Hydra's own: a key may be added
# to them (``+model.stem=light``); fedkws's other sections have fixed keys (fedkws.spec).
ARGUMENT_SECTIONS = ("model.", "optimizer.", "strategy.kwargs.", "federation.ray_init_args.",
                     "hydra.")  # fmt: skip


def hydra_error_line(err: BaseException) -> str:
    """Hydra's multi-line report of a command-line mistake as one line.

    An unknown key is said plainly (with Hydra's hint for adding one); an
    override that does not parse is named; the search path Hydra appends is
    left out; a list of available options (``Available options in
    'experiment':`` and one name per line) is kept, comma-separated; the
    first line of the cause (OmegaConf's reason) is kept, as Hydra prints it.
    """
    import re

    from hydra.errors import OverrideParseException

    text, cause = str(err), str(err.__cause__ or "").strip()
    unknown = re.match(r"Could not override '([^']+)'\.\s+To append to your config use (.+)", text)
    if unknown and "not in struct" in cause:
        key, append = unknown.groups()
        if key.startswith(ARGUMENT_SECTIONS):  # constructor arguments: any the class takes
            what = "key" if key.startswith("hydra.") else "argument"
            hint = f"a new {what} is added with {append.strip()}"
        else:  # fedkws reads only its own keys: a new one would be refused
            hint = "fedkws-train --cfg job prints every key"
        line = f"{key}: not a key of the config (a typo? {hint})"
        swept = [a for a in sys.argv[1:] if a.startswith("experiment=") and "," in a]
        if swept and {"-m", "--multirun"} & set(sys.argv[1:]):
            # Hydra composes a multirun's base config without its swept overrides.
            line += (
                f"; with {swept[0]} swept, the sweep's base config is composed without the "
                "presets: give the key's group too (e.g. model=resnet for model.width)"
            )
        return line
    text = text.split("Config search path:")[0]
    head, _, options = text.partition("Available options in")
    lines = [line.strip() for line in head.splitlines() if line.strip()]
    if isinstance(err, OverrideParseException):
        reason = " ".join(line for line in lines if not line.startswith("See https://"))
        return f"{err.override}: does not parse ({reason}; Hydra's override grammar)"
    words = " ".join(lines)
    if cause and cause.splitlines()[0] not in words:
        words += f": {cause.splitlines()[0]}"
    if options:
        group, _, names = options.partition(":")
        choices = ", ".join(n.strip() for n in names.splitlines() if n.strip())
        words += f"; available options in{group}: {choices}"
    if "submitit" in words:  # hydra/launcher=fedkws_slurm without its plugin
        words += " (the SLURM launcher is an extra: .venv/bin/pip install -e '.[slurm]')"
    return words


def _job_folder_error(err: OSError) -> str | None:
    """The ``error:`` line for a job folder Hydra could not make (``run_job``'s mkdir), if so."""
    frames = _frame_names(err)
    cause = err.__cause__
    in_a_sweep = "launch" in frames  # a launcher's (a single run has none)
    if type(cause).__name__ == "_RemoteTraceback":  # a parallel launcher's worker (joblib)
        in_a_sweep = True
        frames = re.findall(r'^\s*File ".*", line \d+, in (\S+)$', str(cause), re.MULTILINE)
    if "run_job" not in frames:
        return None
    after = frames[len(frames) - frames[::-1].index("run_job") :]
    if not after or any(name != "mkdir" for name in after):  # Hydra's own mkdir, not the run's
        return None
    folder = Path(err.filename or "?")
    why = err.strerror or type(err).__name__
    if isinstance(err, (FileExistsError, NotADirectoryError)):
        from fedkws.fileio import why_not_a_folder

        why = why_not_a_folder(folder) or "a file is in the way"
    if not in_a_sweep:
        return f"cannot make the run's folder {folder}: {why} (hydra.run.dir); choose another"
    return (
        f"cannot make the job's folder {folder}: {why} (hydra.sweep.dir, hydra.sweep.subdir); "
        "move it, or run the sweep into another folder"
    )


def _frame_names(err: BaseException) -> list[str]:
    """The functions of ``err``'s traceback, outermost first."""
    names = []
    tb = err.__traceback__
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return names


def _in_a_job(err: BaseException) -> bool:
    """Whether ``err`` was raised inside a job (Hydra's ``run_job``), not while composing."""
    return "run_job" in _frame_names(err)


def _null_group_choice(err: ValueError) -> str | None:
    """One line for a config group set to null on the command line (``model=null``)."""
    if "Config group override must be a string or a list" not in str(err):
        return None
    from fedkws import CONF_DIR

    groups = {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}
    named = [a.split("=", 1)[0].lstrip("+~") for a in sys.argv[1:] if a.endswith("=null")]
    named = [key for key in named if key in groups]
    if not named:  # a swept value (model=cnn,null) or a preset's defaults
        return "a config group's choice is null: give one of its options (conf/<group>/) by name"
    return (
        f"{', '.join(f'{key}=null' for key in named)}: a config group's choice is the name of "
        f"one of its options (conf/{named[0]}/), not null"
    )


@contextmanager
def hydra_mistakes_in_one_line() -> Iterator[None]:
    """Within this block, Hydra's own command-line mistakes are one ``error:`` line (exit 2).

    An unknown key (``train.round=5``), a preset that does not exist
    (``experiment=nope``) or a malformed override is reported by Hydra before
    fedkws sees the config, as several lines ending in a hint about
    ``HYDRA_FULL_ERROR``. Hydra 1.3 reports through
    ``hydra._internal.utils.run_and_report``; its report of these mistakes
    (``CompactHydraException`` raised while composing, not inside a job) is
    replaced for the block. Every other exception, and ``HYDRA_FULL_ERROR=1``,
    keeps Hydra's own report.
    """
    from hydra._internal import utils as hydra_utils
    from hydra.errors import CompactHydraException

    report = hydra_utils.run_and_report

    def compact(func):
        def call():
            try:
                return func()
            except CompactHydraException as err:
                if os.environ.get("HYDRA_FULL_ERROR") == "1" or _in_a_job(err):
                    raise
                print(f"error: {hydra_error_line(err)}", file=sys.stderr)
                sys.exit(2)
            except ValueError as err:  # `model=null`: Hydra's defaults list refuses the choice
                if os.environ.get("HYDRA_FULL_ERROR") == "1" or _in_a_job(err):
                    raise
                line = _null_group_choice(err)
                if line is None:
                    raise
                print(f"error: {line}", file=sys.stderr)
                sys.exit(2)
            except OSError as err:  # Hydra makes each job's folder before fedkws runs
                line = None if os.environ.get("HYDRA_FULL_ERROR") == "1" else _job_folder_error(err)
                if line is None:
                    raise
                print(f"error: {line}", file=sys.stderr)
                sys.exit(2)

        return report(call)

    hydra_utils.run_and_report = compact
    main_module = importlib.import_module("hydra.main")
    make_parser = main_module.get_args_parser
    main_module.get_args_parser = lambda: _one_line_usage_errors(make_parser())
    try:
        yield
    finally:
        hydra_utils.run_and_report = report
        main_module.get_args_parser = make_parser


def _one_line_usage_errors(parser):
    """Hydra's argparse parser, its usage mistakes one ``error:`` line (not its usage text)."""

    def error(message: str):
        hint = ""
        unrecognized = message.partition("unrecognized arguments:")[2].split()
        if any("=" in a and not a.startswith("-") for a in unrecognized):  # `a=1 -m b=2,3`
            hint = "; options (-m, --cfg, ...) go before the key=value overrides"
        print(f"error: {parser.prog}: {message}{hint} (see {parser.prog} --help)",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)

    parser.error = error
    return parser
