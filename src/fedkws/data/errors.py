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
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists() or folder.is_symlink():
            if folder.is_dir():
                return path
            if folder == path:
                raise DataError(f"{key}='{path}' is not a folder (a file?); set {key} to a folder")
            raise DataError(
                f"{key}='{path}' cannot be a folder: '{folder}' is not a folder (a file?); "
                f"set {key} to a folder path"
            )
    return path
