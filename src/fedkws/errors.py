"""Turn expected user mistakes into one clear line instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class ConfigError(ValueError):
    """A config value that cannot work, with the reason and the valid choices (one per line)."""


class FederationError(RuntimeError):
    """The federation cannot go on (no clients came up, too few replied, a client query failed)."""


class RunRefused(RuntimeError):
    """A run that must not start (it would overwrite or mix up another run's files)."""


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
