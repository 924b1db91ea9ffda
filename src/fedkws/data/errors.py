"""Errors of the data layer whose message is written for the user.

Each message is one line that names the path or config key, the value found
and what is allowed, so the command-line entry points print it instead of a
traceback (see ``fedkws.errors.user_errors``).
"""

from __future__ import annotations

from pathlib import Path


class DatasetNotFoundError(FileNotFoundError):
    """The dataset root does not exist or holds no Speech Commands folders."""


class DataError(ValueError):
    """A dataset, cache folder or data setting that cannot work as configured."""


def check_folder(path: Path | str, key: str) -> Path:
    """Raise :class:`DataError` if ``path`` or one of its parents is a file.

    ``key`` names the setting the path came from (``dataset.root``,
    ``cache_dir``) in the message. Missing folders are fine: they are created
    later.
    """
    from fedkws.fileio import why_not_a_folder

    if why := why_not_a_folder(path):
        raise DataError(f"{key}='{path}': {why}; set {key} to a folder")
    return Path(path)
