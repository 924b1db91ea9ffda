"""Download and unpack the Google Speech Commands archives.

The archives have the word folders at their top level (no enclosing
directory), so unpacking into ``root`` gives ``root/yes/...``,
``root/_background_noise_/...``, ``root/validation_list.txt`` and so on: the
layout :mod:`fedkws.data.speech_commands` reads.

The steps are ordered so that an interrupted run never leaves something that
looks finished:

1. the archive is streamed to ``<archive>.part`` while its SHA-256 is
   computed; its size is checked against ``Content-Length`` and its digest
   against the expected one, and only then is it renamed to ``<archive>``.
   An interrupted transfer (network error, timeout, Ctrl-C, short body)
   keeps the ``.part`` file and ``<archive>.part.json`` (its URL and the
   server's ETag or Last-Modified); the next call asks for the rest with an
   HTTP ``Range`` request guarded by ``If-Range``, and starts over if the
   server answers with the whole file (changed, or no range support). A
   ``.part`` whose finished digest is wrong is deleted;
2. it is unpacked into a temporary directory beside ``root`` (same file
   system, so the final move is a rename), refusing members that would land
   outside it;
3. the unpacked tree is moved into ``root``;
4. the marker file ``root/.fedkws_complete`` (version, digest, URL) is
   written last. A ``root`` without it is never treated as complete.

Checksum policy
---------------
With the default URL the official digest from :data:`ARCHIVES` is always
checked. With a custom ``url`` (a mirror, a local server, a ``file://`` path)
the digest is checked only if ``sha256`` is given; otherwise a warning says
that the archive cannot be verified. A faithful mirror of the official
archive can be verified with ``sha256=ARCHIVES[version].sha256``.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import http.client
import json
import logging
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from fedkws.fileio import file_lock, umask, why_not_a_folder, write_json, write_text

log = logging.getLogger(__name__)

MARKER_NAME = ".fedkws_complete"
# Present while an install into an existing root is moving files into it.
INCOMPLETE_NAME = ".fedkws_incomplete"
DEFAULT_TIMEOUT = 60.0
_CHUNK_SIZE = 1 << 20
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")  # a Windows drive prefix makes a member absolute there


class DownloadError(Exception):
    """The dataset could not be downloaded, verified or unpacked."""


@dataclass(frozen=True)
class ArchiveSpec:
    """Where an official archive lives and the SHA-256 digest it must have."""

    url: str
    sha256: str


# Digests as recorded by torchaudio (torchaudio/datasets/speechcommands.py,
# ``_CHECKSUMS``) for the archives on download.tensorflow.org.
ARCHIVES: dict[str, ArchiveSpec] = {
    "v0.01": ArchiveSpec(
        url="http://download.tensorflow.org/data/speech_commands_v0.01.tar.gz",
        sha256="743935421bb51cccdb6bdd152e04c5c70274e935c82119ad7faeec31780d811d",
    ),
    "v0.02": ArchiveSpec(
        url="http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz",
        sha256="af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58",
    ),
}


def is_complete(root: Path | str) -> bool:
    """Whether ``root`` holds a fully downloaded and unpacked dataset.

    Parameters
    ----------
    root
        The dataset directory passed to :func:`download_speech_commands`.

    Returns
    -------
    bool
        ``True`` if the completion marker exists and is readable. Files in
        ``root`` without the marker (an interrupted run, a manual copy) do not
        count.
    """
    return _read_marker(Path(root)) is not None


def download_speech_commands(
    root: Path | str,
    version: str = "v0.02",
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    keep_archive: bool = False,
) -> Path:
    """Download, verify and unpack Speech Commands into ``root``.

    Does nothing if ``root`` already holds a complete dataset of the same
    version (see :func:`is_complete`). A verified archive left beside
    ``root`` by an earlier run whose unpacking failed is reused after its
    digest is checked again.

    Parameters
    ----------
    root
        Directory that receives the word folders. Its parent is created if
        needed and also holds the archive and temporary files while they
        are being written.
    version
        ``"v0.01"`` or ``"v0.02"``; selects the official URL and digest and is
        recorded in the completion marker.
    url
        Download from here instead of the official URL: any URL ``urllib``
        opens (``http://``, ``https://``, ``file://``).
    sha256
        Expected SHA-256 digest (hex) of the archive. Defaults to the official
        digest when ``url`` is not given. With a custom ``url`` and no
        ``sha256`` the archive is not verified and a warning is logged.
    progress
        Show a ``rich`` progress bar while downloading and unpacking.
    timeout
        Seconds to wait for the server to connect or send data before giving
        up.
    keep_archive
        Keep the verified ``.tar.gz`` beside ``root`` after unpacking instead
        of deleting it.

    Returns
    -------
    Path
        ``root``, holding the unpacked dataset and its completion marker.

    Raises
    ------
    DownloadError
        On HTTP errors, unreachable hosts, timeouts, truncated downloads,
        checksum mismatches, corrupt or unsafe archives, or when ``root``
        already holds a different complete dataset.
    ValueError
        For an unknown ``version`` or a malformed ``sha256``.
    """
    if version not in ARCHIVES:
        raise ValueError(f"unknown Speech Commands version {version!r}; known: {sorted(ARCHIVES)}")
    root = Path(root).expanduser().absolute()
    spec = ARCHIVES[version]
    if url is not None and not url.strip():
        raise DownloadError("an empty URL: give the mirror's URL, or none for the official one")
    expected = _expected_digest(spec, url, sha256)
    url = spec.url if url is None else url

    if _already_done(root, version, expected):
        return root
    _check_url(url)
    _check_root(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _lock(root):
        # Another process may have finished the same download while this one waited.
        if _already_done(root, version, expected):
            return root
        _check_root(root)
        archive = root.parent / f"{root.name}-{_archive_name(url)}"
        digest = _reuse_archive(archive, expected)
        if digest is None:
            if expected is None:
                log.warning(
                    "No SHA-256 given for %s: the archive cannot be verified. Give its "
                    "checksum (fedkws download --sha256, dataset.download.sha256 in a config, "
                    "sha256= in Python); a mirror of the official %s archive has %s.",
                    url,
                    version,
                    ARCHIVES[version].sha256,
                )
            digest = _download(url, archive, expected, timeout, progress)
        _install(archive, root, progress, url)
        _write_marker(root, {"version": version, "sha256": digest, "url": url})
        (root / INCOMPLETE_NAME).unlink(missing_ok=True)
        if not keep_archive:
            archive.unlink(missing_ok=True)
    log.info("Speech Commands %s ready in %s", version, root)
    return root


def as_sha256(text: object) -> str | None:
    """``text`` as a SHA-256 digest (64 hex digits, case and surrounding spaces ignored), or None.

    The one reading of a checksum as given: the command line, the config and the library.
    """
    digest = text.strip().lower() if isinstance(text, str) else ""
    return digest if _SHA256_PATTERN.fullmatch(digest) else None


def _expected_digest(spec: ArchiveSpec, url: str | None, sha256: str | None) -> str | None:
    if sha256 is None:
        return spec.sha256 if url is None else None
    digest = as_sha256(sha256)
    if digest is None:
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    return digest


def _already_done(root: Path, version: str, expected: str | None) -> bool:
    marker = _read_marker(root)
    if marker is None:
        return False
    if marker.get("version") != version:
        raise DownloadError(
            f"{root} already holds Speech Commands {marker.get('version')}, not {version}; "
            "use another root directory"
        )
    if expected is not None and marker.get("sha256") != expected:
        raise DownloadError(
            f"{root} already holds a dataset unpacked from an archive with SHA-256 "
            f"{marker.get('sha256')}, but {expected} was requested; use another root "
            f"directory, or delete {root} to download again"
        )
    log.info("Speech Commands %s already complete in %s", version, root)
    return True


def check_complete(root: Path, version: str, sha256: str | None = None) -> None:
    """Refuse a complete ``root`` of another version (or, when given, another archive).

    What training checks before using a root ``fedkws download`` made: a mirror's
    archive has a checksum of its own, so without ``sha256`` only the version counts.
    """
    _already_done(root, version, None if sha256 is None else as_sha256(sha256))


def _check_url(url: str) -> None:
    try:
        urllib.parse.urlsplit(url)
    except ValueError as err:
        raise DownloadError(f"invalid URL {url!r}: {err}") from None


def _check_root(root: Path) -> None:
    """Refuse a root that is a file, below a file, or a folder of other files.

    fedkws writes into an existing folder only when it is empty or an install of its
    own that was interrupted (:data:`INCOMPLETE_NAME`): never over a user's files.
    """
    if why := why_not_a_folder(root):
        raise DownloadError(f"{root}: {why}")
    if root.is_dir() and not (root / INCOMPLETE_NAME).exists() and any(root.iterdir()):
        raise DownloadError(
            f"{root} already holds files and no Speech Commands that fedkws downloaded: "
            "refusing to unpack into it (give a new or empty folder as the root)"
        )


def _read_marker(root: Path) -> dict | None:
    try:
        marker = json.loads((root / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or "version" not in marker or "sha256" not in marker:
        return None
    return marker


def _write_marker(root: Path, content: dict) -> None:
    # Written to a temporary name and renamed, so a crash mid-write cannot
    # leave a truncated marker that still parses.
    write_text(root / MARKER_NAME, json.dumps(content, indent=2) + "\n")


def _lock(root: Path) -> contextlib.AbstractContextManager:
    # Several simulation workers may call the downloader at once; without the
    # lock they would write the same .part file concurrently. The lock file is
    # the one fedkws.data.synth uses for a root, and re-entrant in a process.
    return file_lock(root.parent / f".{root.name}.lock")


def _archive_name(url: str) -> str:
    name = posixpath.basename(urllib.parse.urlsplit(url).path)
    return name or "speech_commands.tar.gz"


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_SIZE), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _reuse_archive(archive: Path, expected: str | None) -> str | None:
    # An archive without .part was verified when it was written, but it is
    # checked again because it may have been modified since; without an
    # expected digest there is nothing to check it against, so it is fetched
    # again.
    if not archive.is_file() or expected is None:
        return None
    actual = _sha256_of(archive)
    if actual == expected:
        log.info("Reusing verified archive %s", archive)
        return actual
    log.warning("Ignoring %s: SHA-256 %s, expected %s", archive, actual, expected)
    archive.unlink()
    return None


def _download(url: str, archive: Path, expected: str | None, timeout: float, progress: bool) -> str:
    """Fetch ``url`` into ``archive`` and return the SHA-256 of what arrived.

    An interrupted transfer leaves ``<archive>.part`` (and ``.part.json``,
    the URL and validator it came from) for the next call to resume; a
    finished one whose digest is wrong is deleted.
    """
    part = archive.with_name(archive.name + ".part")
    digest = _fetch(url, part, timeout, progress)
    if expected is not None and digest != expected:
        _discard(part)
        raise DownloadError(
            f"checksum mismatch for {part} downloaded from {url}: expected SHA-256 "
            f"{expected}, got {digest}; the file was deleted"
        )
    os.replace(part, archive)
    _state_path(part).unlink(missing_ok=True)
    return digest


class _RangeNotSatisfiable(Exception):
    """HTTP 416: the server has nothing after the bytes already received."""


def _open_url(url: str, timeout: float, headers: dict[str, str] | None = None) -> IO[bytes]:
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "fedkws", **(headers or {})})
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and headers and "Range" in headers:
            raise _RangeNotSatisfiable from None
        raise DownloadError(f"HTTP {err.code} {err.reason} while downloading {url}") from None
    except urllib.error.URLError as err:
        raise DownloadError(f"could not connect to {url}: {err.reason}") from None
    except (http.client.HTTPException, OSError) as err:
        raise DownloadError(f"could not download {url}: {err!r}") from None
    except ValueError as err:
        raise DownloadError(f"invalid URL {url!r}: {err}") from None


def _state_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _state_path(part).unlink(missing_ok=True)


def _resume_headers(url: str, part: Path) -> dict[str, str]:
    """``Range``/``If-Range`` headers to continue ``part``, or {} to start over.

    A partial file is continued only if it came from the same URL and the
    server gave a validator (a strong ETag or Last-Modified): ``If-Range``
    makes the server send the whole file again if it changed since.
    """
    try:
        state = json.loads(_state_path(part).read_text())
        size = part.stat().st_size
    except (OSError, ValueError):
        return {}
    if not isinstance(state, dict) or state.get("url") != url or size == 0:
        return {}
    validator = state.get("validator")
    if not isinstance(validator, str) or not validator:
        return {}
    return {"Range": f"bytes={size}-", "If-Range": validator}


def _validator(response: IO[bytes]) -> str | None:
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


def _resumed_at(response: IO[bytes], headers: dict[str, str]) -> int:
    """The offset the response continues from: 0 unless the server honoured the range."""
    if not headers or getattr(response, "status", None) != 206:
        return 0
    asked = int(headers["Range"][len("bytes=") : -1])
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return asked if match and int(match.group(1)) == asked else 0


def _sha256_prefix(path: Path, size: int) -> hashlib._Hash:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while size > 0:
            chunk = handle.read(min(_CHUNK_SIZE, size))
            if not chunk:
                break
            digest.update(chunk)
            size -= len(chunk)
    return digest


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> str:
    headers = _resume_headers(url, part)
    try:
        response = _open_url(url, timeout, headers)
    except _RangeNotSatisfiable:
        # The partial file is as long as the server's (or longer): start over.
        _discard(part)
        headers = {}
        response = _open_url(url, timeout)
    with response:
        offset = _resumed_at(response, headers)
        if offset:
            log.info("Resuming %s at byte %d into %s", url, offset, part)
        else:
            write_json(_state_path(part), {"url": url, "validator": _validator(response)})
        digest = _sha256_prefix(part, offset) if offset else hashlib.sha256()
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        received = _stream(response, url, part, offset, total, digest, progress)
    if total is not None and received != total:
        raise DownloadError(
            f"truncated download of {url} into {part}: server announced {total} bytes, "
            f"received {received}; the partial file is kept and the next call resumes it"
        )
    return digest.hexdigest()


def _stream(
    response: IO[bytes],
    url: str,
    part: Path,
    offset: int,
    total: int | None,
    digest: hashlib._Hash,
    progress: bool,
) -> int:
    """Append the response body to ``part`` (after ``offset`` bytes); return the new size."""
    received = offset
    # read1 returns what has arrived (up to a chunk), so an interruption loses
    # nothing that was received: it is all in the .part file for the resume.
    read = getattr(response, "read1", response.read)
    with (
        open(part, "r+b" if offset else "wb") as out,
        _progress(progress, "Downloading", total, transfer=True) as advance,
    ):
        out.seek(offset)
        out.truncate()
        advance(offset)
        while True:
            try:
                chunk = read(_CHUNK_SIZE)
            except (http.client.HTTPException, OSError) as err:
                raise DownloadError(
                    f"download of {url} interrupted after {received} bytes "
                    f"(writing {part}): {err!r}; the partial file is kept and the next "
                    "call resumes it"
                ) from None
            if not chunk:
                break
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            advance(len(chunk))
    return received


@contextlib.contextmanager
def _progress(
    enabled: bool, description: str, total: int | None, transfer: bool
) -> Iterator[Callable[[int], object]]:
    """Yield a callable that advances a progress bar (or does nothing)."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    if transfer:
        columns = (DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    else:
        columns = (MofNCompleteColumn(),)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), *columns) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _install(archive: Path, root: Path, progress: bool, url: str) -> None:
    """Unpack ``archive`` beside ``root`` and move the result into ``root``.

    Runs under ``root``'s lock: an unpacking folder of an earlier process that was
    killed (SIGKILL, a lost machine) is removed first.
    """
    for stale in root.parent.glob(f".{glob.escape(root.name)}.extract-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.extract-", dir=root.parent))
    os.chmod(staging, 0o777 & ~umask())  # mkdtemp makes 0700; the root gets the usual mode
    try:
        _extract(archive, staging, progress)
        top = _dataset_top(staging)
        from fedkws.data.speech_commands import has_word_folders

        if not has_word_folders(top):
            found = ", ".join(sorted(e.name for e in top.iterdir())[:5])
            archive.unlink(missing_ok=True)
            raise DownloadError(
                f"the archive from {url} holds no Speech Commands word folders (yes/, no/, "
                f"... with .wav files), only: {found} (not kept)"
            )
        _move_into(top, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _dataset_top(staging: Path) -> Path:
    # The official archives have no enclosing folder, but a repacked mirror
    # may wrap everything in one; unwrap it so the layout is the same.
    entries = list(staging.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        inner = entries[0]
        if (inner / "validation_list.txt").exists() or (inner / "_background_noise_").is_dir():
            log.info("Archive has an enclosing folder %r; using its contents", inner.name)
            return inner
    if not entries:
        raise DownloadError("the archive is empty")
    return staging


def _checked_members(
    tar: tarfile.TarFile, archive: Path, advance: Callable[[int], object]
) -> Iterator[tarfile.TarInfo]:
    # Checked one by one as tarfile reads them, so the gzip stream is
    # decompressed only once. Only files and folders occur in the dataset;
    # anything else (links, devices) is refused rather than interpreted.
    for member in tar:
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts or _DRIVE_RE.match(member.name):
            raise DownloadError(
                f"refusing to unpack {archive}: member {member.name!r} points outside the "
                "target directory"
            )
        if not (member.isfile() or member.isdir()):
            raise DownloadError(
                f"refusing to unpack {archive}: member {member.name!r} is not a regular "
                "file or directory"
            )
        yield member
        advance(1)


def _extract(archive: Path, dest: Path, progress: bool) -> None:
    # The "data" filter (3.11.4+) also normalises permissions and rejects
    # anything escaping dest; older versions rely on _checked_members alone.
    kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        with (
            tarfile.open(archive, "r:*") as tar,
            _progress(progress, "Unpacking", None, transfer=False) as advance,
        ):
            tar.extractall(dest, members=_checked_members(tar, archive, advance), **kwargs)
    except DownloadError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__  # one line, not a repr
        if isinstance(err, tarfile.ReadError) and "could not be opened" in reason:
            reason = "not a tar archive (gzip, bzip2, xz or plain: tarfile read none of them)"
        raise DownloadError(f"could not unpack {archive}: {reason}") from None


def _move_into(src: Path, root: Path) -> None:
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    if not root.exists():
        (src / INCOMPLETE_NAME).touch()  # ours until the marker is written
        os.replace(src, root)
        return
    # root holds files but no marker: most likely an interrupted earlier
    # install. Entries the archive provides are replaced; others are kept.
    # Until the marker is written, INCOMPLETE_NAME says that the word folders
    # in root may be a partial copy (see fedkws.data.pipeline.ensure_dataset).
    log.warning("%s exists without a completion marker; replacing its dataset files", root)
    (root / INCOMPLETE_NAME).touch()
    for entry in sorted(src.iterdir()):
        target = root / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(entry, target)
