"""Turn expected user mistakes into one clear line instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from fedkws.data.speech_commands import DatasetNotFoundError


class ConfigError(ValueError):
    """A config value that cannot work, with the reason and the valid choices."""


# Errors whose message is already written for the user.
USER_ERRORS: tuple[type[BaseException], ...] = (DatasetNotFoundError, ConfigError)


def _user_error_types() -> tuple[type[BaseException], ...]:
    from fedkws.data.download import DownloadError

    return USER_ERRORS + (DownloadError,)


@contextmanager
def user_errors() -> Iterator[None]:
    """Print ``error: <message>`` and exit with status 2 on a user error."""
    try:
        yield
    except _user_error_types() as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
