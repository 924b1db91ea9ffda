from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fedkws.data.download import (
    ARCHIVES,
    INCOMPLETE_NAME,
    MARKER_NAME,
    DownloadError,
    download_speech_commands,
    is_complete,
)

WAVS = (
    "yes/0123abcd_nohash_0.wav",
    "yes/89abcdef_nohash_1.wav",
    "no/0123abcd_nohash_0.wav",
    "_background_noise_/white_noise.wav",
)
LISTS = {
    "validation_list.txt": "yes/89abcdef_nohash_1.wav\n",
    "testing_list.txt": "no/0123abcd_nohash_0.wav\n",
}


def _wav_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    sf.write(buf, rng.uniform(-0.1, 0.1, 1600), 16000, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _make_archive(path: Path, prefix: str = "", extra=None) -> bytes:
    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate(WAVS):
            _add_bytes(tar, prefix + name, _wav_bytes(i))
        for name, text in LISTS.items():
            _add_bytes(tar, prefix + name, text.encode())
        if extra is not None:
            extra(tar)
    return path.read_bytes()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Server:
    """Serves byte strings by path, with ETag and single-range (``bytes=N-``) support.

    ``truncate`` paths announce more bytes than they send, every time;
    ``truncate_once`` paths only on their first request; ``ignore_range``
    paths answer every request with the whole file; ``stall`` paths send 100
    bytes, then nothing.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.truncate_once: set[str] = set()
        self.ignore_range: set[str] = set()
        self.stall: set[str] = set()
        self.requests: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.statuses: list[int] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _start(self, data: bytes) -> int:
                """The first byte to send, or -1 after answering 416 (nothing left)."""
                etag = f'"{_sha(data)[:16]}"'
                wanted = self.headers.get("Range")
                if not wanted or self.path in outer.ignore_range:
                    return 0
                if self.headers.get("If-Range") not in (None, etag):
                    return 0
                start = int(wanted.removeprefix("bytes=").removesuffix("-"))
                if start >= len(data):
                    outer.statuses.append(416)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return -1
                return start

            def do_GET(self) -> None:  # noqa: N802
                outer.requests.append(self.path)
                outer.headers.append(dict(self.headers))
                data = outer.files.get(self.path)
                if data is None:
                    outer.statuses.append(404)
                    self.send_error(404, "Not Found")
                    return
                start = self._start(data)
                if start < 0:
                    return
                body = data[start:]
                outer.statuses.append(206 if start else 200)
                self.send_response(206 if start else 200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("ETag", f'"{_sha(data)[:16]}"')
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in outer.stall:
                    self.wfile.write(body[:100])
                    self.wfile.flush()
                    time.sleep(1.0)
                    return
                if self.path in outer.truncate or self.path in outer.truncate_once:
                    outer.truncate_once.discard(self.path)
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture
def archive(tmp_path) -> bytes:
    # Built in its own folder so the checks for leftovers in tmp_path do not see it.
    (tmp_path / "src").mkdir()
    return _make_archive(tmp_path / "src" / "speech_commands_test.tar.gz")


def _serve(server: _Server, data: bytes, path: str = "/speech_commands_test.tar.gz") -> str:
    server.files[path] = data
    return server.url(path)


def _leftovers(parent: Path) -> list[str]:
    """Files a failed or finished run should not leave behind (besides the lock)."""
    return sorted(
        p.name
        for p in parent.iterdir()
        if ".part" in p.name or ".extract-" in p.name or p.name.endswith(".tar.gz")
    )


PART = "sc-speech_commands_test.tar.gz.part"


def test_official_archives():
    assert set(ARCHIVES) == {"v0.01", "v0.02"}
    for version, spec in ARCHIVES.items():
        assert spec.url == f"http://download.tensorflow.org/data/speech_commands_{version}.tar.gz"
        assert len(spec.sha256) == 64
        int(spec.sha256, 16)


def test_download_and_extract(tmp_path, server, archive):
    url = _serve(server, archive)
    root = tmp_path / "data" / "speech_commands"
    out = download_speech_commands(root, url=url, sha256=_sha(archive), progress=False)

    assert out == root.absolute()
    for name in WAVS:
        data, rate = sf.read(root / name)
        assert rate == 16000 and data.shape == (1600,)
    for name, text in LISTS.items():
        assert (root / name).read_text() == text
    marker = json.loads((root / MARKER_NAME).read_text())
    assert marker["version"] == "v0.02"
    assert marker["sha256"] == _sha(archive)
    assert marker["url"] == url
    assert is_complete(root)
    assert _leftovers(root.parent) == []


def test_second_call_does_not_download_again(tmp_path, server, archive):
    url = _serve(server, archive)
    root = tmp_path / "sc"
    download_speech_commands(root, url=url, sha256=_sha(archive), progress=False)
    download_speech_commands(root, url=url, sha256=_sha(archive), progress=False)
    download_speech_commands(root, url=url, progress=False)
    assert len(server.requests) == 1


def test_progress_bar_path(tmp_path, server, archive):
    url = _serve(server, archive)
    root = download_speech_commands(tmp_path / "sc", url=url, sha256=_sha(archive), progress=True)
    assert is_complete(root)


def test_wrong_checksum_rejected(tmp_path, server, archive):
    url = _serve(server, archive)
    root = tmp_path / "sc"
    wrong = "0" * 64
    with pytest.raises(DownloadError) as info:
        download_speech_commands(root, url=url, sha256=wrong, progress=False)
    message = str(info.value)
    assert wrong in message and _sha(archive) in message
    assert "speech_commands_test.tar.gz.part" in message
    assert not is_complete(root)
    assert not root.exists()
    assert _leftovers(tmp_path) == []


def test_truncated_download_keeps_part(tmp_path, server, archive):
    url = _serve(server, archive)
    server.truncate.add("/speech_commands_test.tar.gz")
    root = tmp_path / "sc"
    # No checksum: only the size check can catch the truncation.
    with pytest.raises(DownloadError, match="truncated.*the partial file is kept"):
        download_speech_commands(root, url=url, progress=False)
    assert not is_complete(root)
    assert not root.exists()
    # What arrived is kept, with the URL and validator needed to resume it.
    assert _leftovers(tmp_path) == [PART, PART + ".json"]
    assert (tmp_path / PART).read_bytes() == archive[: len(archive) // 2]
    state = json.loads((tmp_path / (PART + ".json")).read_text())
    assert state == {"url": url, "validator": f'"{_sha(archive)[:16]}"'}


def test_interrupted_download_resumes_with_range(tmp_path, server, archive):
    url = _serve(server, archive)
    server.truncate_once.add("/speech_commands_test.tar.gz")
    root = tmp_path / "sc"
    with pytest.raises(DownloadError, match="truncated"):
        download_speech_commands(root, url=url, sha256=_sha(archive), progress=False)
    half = len(archive) // 2
    assert (tmp_path / PART).stat().st_size == half

    download_speech_commands(root, url=url, sha256=_sha(archive), progress=False)
    assert server.headers[1]["Range"] == f"bytes={half}-"
    assert server.headers[1]["If-Range"] == f'"{_sha(archive)[:16]}"'
    assert server.statuses == [200, 206]
    assert is_complete(root)
    assert json.loads((root / MARKER_NAME).read_text())["sha256"] == _sha(archive)
    assert _leftovers(tmp_path) == []


def test_resume_starts_over_when_range_is_ignored(tmp_path, server, archive):
    url = _serve(server, archive)
    server.truncate_once.add("/speech_commands_test.tar.gz")
    server.ignore_range.add("/speech_commands_test.tar.gz")
    root = tmp_path / "sc"
    with pytest.raises(DownloadError, match="truncated"):
        download_speech_commands(root, url=url, sha256=_sha(archive), progress=False)
    download_speech_commands(root, url=url, sha256=_sha(archive), progress=False)
    assert "Range" in server.headers[1] and server.statuses == [200, 200]
    assert is_complete(root)
    assert _leftovers(tmp_path) == []


def test_resume_starts_over_when_the_file_changed(tmp_path, server, archive):
    url = _serve(server, archive)
    server.truncate_once.add("/speech_commands_test.tar.gz")
    root = tmp_path / "sc"
    with pytest.raises(DownloadError, match="truncated"):
        download_speech_commands(root, url=url, progress=False)
    # The server now has another archive: If-Range no longer matches its ETag.
    changed = _make_archive(tmp_path / "changed.tar.gz", prefix="")
    changed = changed + b"\0" * 512  # still a valid gzip stream followed by padding
    (tmp_path / "changed.tar.gz").unlink()
    server.files["/speech_commands_test.tar.gz"] = changed
    download_speech_commands(root, url=url, sha256=_sha(changed), progress=False)
    assert server.statuses == [200, 200]
    assert json.loads((root / MARKER_NAME).read_text())["sha256"] == _sha(changed)


def test_complete_part_is_fetched_again(tmp_path, server, archive):
    """A .part as long as the file (killed before the rename): 416, then a fresh download."""
    url = _serve(server, archive)
    server.truncate_once.add("/speech_commands_test.tar.gz")
    root = tmp_path / "sc"
    with pytest.raises(DownloadError, match="truncated"):
        download_speech_commands(root, url=url, sha256=_sha(archive), progress=False)
    (tmp_path / PART).write_bytes(archive)
    download_speech_commands(root, url=url, sha256=_sha(archive), progress=False)
    assert server.statuses == [200, 416, 200]
    assert is_complete(root)
    assert _leftovers(tmp_path) == []


def test_corrupt_part_fails_the_checksum_and_is_deleted(tmp_path, server, archive):
    url = _serve(server, archive)
    server.truncate_once.add("/speech_commands_test.tar.gz")
    root = tmp_path / "sc"
    with pytest.raises(DownloadError, match="truncated"):
        download_speech_commands(root, url=url, sha256=_sha(archive), progress=False)
    part = tmp_path / PART
    part.write_bytes(b"x" * part.stat().st_size)  # same length, wrong bytes
    with pytest.raises(DownloadError, match="checksum mismatch.*the file was deleted"):
        download_speech_commands(root, url=url, sha256=_sha(archive), progress=False)
    assert _leftovers(tmp_path) == []
    download_speech_commands(root, url=url, sha256=_sha(archive), progress=False)
    assert is_complete(root)


def test_http_404(tmp_path, server):
    url = server.url("/missing.tar.gz")
    with pytest.raises(DownloadError, match="404") as info:
        download_speech_commands(tmp_path / "sc", url=url, sha256="a" * 64, progress=False)
    assert url in str(info.value)
    assert not is_complete(tmp_path / "sc")


def test_connection_refused(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/speech_commands_v0.02.tar.gz"
    with pytest.raises(DownloadError, match="could not connect") as info:
        download_speech_commands(tmp_path / "sc", url=url, sha256="a" * 64, progress=False)
    assert url in str(info.value)
    assert _leftovers(tmp_path) == []


def test_stalled_server_times_out(tmp_path, server, archive):
    url = _serve(server, archive)
    server.stall.add("/speech_commands_test.tar.gz")
    with pytest.raises(DownloadError, match=r"interrupted after \d+ bytes.*timed out"):
        download_speech_commands(
            tmp_path / "sc", url=url, sha256=_sha(archive), progress=False, timeout=0.2
        )
    # The 100 bytes that arrived are kept for a later resume.
    assert (tmp_path / PART).read_bytes() == archive[:100]


@pytest.fixture(params=["data_filter", "manual_checks"])
def extraction_mode(request, monkeypatch):
    # Python < 3.11.4 has no extraction filters; the member checks must hold alone.
    if request.param == "manual_checks":
        monkeypatch.delattr(tarfile, "data_filter")
    return request.param


@pytest.mark.usefixtures("extraction_mode")
def test_path_traversal_refused(tmp_path, server):
    data = _make_archive(
        tmp_path / "evil.tar.gz", extra=lambda tar: _add_bytes(tar, "../evil", b"pwned")
    )
    (tmp_path / "evil.tar.gz").unlink()
    url = _serve(server, data, "/evil.tar.gz")
    root = tmp_path / "data" / "sc"
    with pytest.raises(DownloadError, match="evil"):
        download_speech_commands(root, url=url, sha256=_sha(data), progress=False)
    assert not is_complete(root)
    assert not root.exists()
    assert not any(p.name == "evil" for p in tmp_path.rglob("*"))
    # The verified archive is kept so a fixed extractor would not need to download again.
    assert _leftovers(root.parent) == ["sc-evil.tar.gz"]


@pytest.mark.usefixtures("extraction_mode")
def test_absolute_and_link_members_refused(tmp_path, server):
    def absolute(tar):
        _add_bytes(tar, "/tmp/fedkws_evil", b"x")

    def link(tar):
        info = tarfile.TarInfo("yes/link.wav")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)

    for i, extra in enumerate((absolute, link)):
        data = _make_archive(tmp_path / f"bad{i}.tar.gz", extra=extra)
        url = _serve(server, data, f"/bad{i}.tar.gz")
        root = tmp_path / f"sc{i}"
        with pytest.raises(DownloadError, match="refusing to unpack"):
            download_speech_commands(root, url=url, sha256=_sha(data), progress=False)
        assert not is_complete(root)


def test_custom_url_without_checksum_warns(tmp_path, server, archive, caplog):
    url = _serve(server, archive)
    with caplog.at_level(logging.WARNING, logger="fedkws.data.download"):
        root = download_speech_commands(tmp_path / "sc", url=url, progress=False)
    assert "cannot be verified" in caplog.text
    assert is_complete(root)
    assert json.loads((root / MARKER_NAME).read_text())["sha256"] == _sha(archive)


def test_a_folder_of_other_files_is_refused_and_left_as_it_is(tmp_path, server, archive):
    # Catches: unpacking over a user's folder (their files of the archive's names replaced,
    # e.g. a README.md, or a word folder of their own recordings deleted).
    root = tmp_path / "sc"
    (root / "yes").mkdir(parents=True)
    (root / "yes" / "mine.wav").write_bytes(b"my recording")
    (root / "notes.txt").write_text("mine")
    assert not is_complete(root)
    url = _serve(server, archive)
    with pytest.raises(DownloadError, match="already holds files"):
        download_speech_commands(root, url=url, sha256=_sha(archive), progress=False)
    assert sorted(p.name for p in root.rglob("*")) == ["mine.wav", "notes.txt", "yes"]
    assert (root / "yes" / "mine.wav").read_bytes() == b"my recording"
    assert server.requests == []  # refused before anything was downloaded


def test_an_interrupted_install_is_finished(tmp_path, server, archive):
    # fedkws's own interrupted unpacking (its marker says so): archive entries replaced.
    root = tmp_path / "sc"
    (root / "yes").mkdir(parents=True)
    (root / "yes" / "stale.wav").write_bytes(b"partial")
    (root / "notes.txt").write_text("mine")
    (root / INCOMPLETE_NAME).touch()
    assert not is_complete(root)
    url = _serve(server, archive)
    download_speech_commands(root, url=url, sha256=_sha(archive), progress=False)
    assert is_complete(root) and not (root / INCOMPLETE_NAME).exists()
    assert not (root / "yes" / "stale.wav").exists()
    assert (root / "yes" / "0123abcd_nohash_0.wav").exists()
    assert (root / "notes.txt").read_text() == "mine"


def test_corrupt_marker_is_not_complete(tmp_path):
    root = tmp_path / "sc"
    root.mkdir()
    (root / MARKER_NAME).write_text("{not json")
    assert not is_complete(root)
    assert not is_complete(tmp_path / "missing")


def test_verified_archive_reused(tmp_path, server, archive):
    url = _serve(server, archive)
    root = tmp_path / "sc"
    download_speech_commands(root, url=url, sha256=_sha(archive), progress=False, keep_archive=True)
    assert (tmp_path / "sc-speech_commands_test.tar.gz").is_file()
    shutil.rmtree(root)  # as if unpacking had failed
    download_speech_commands(root, url=url, sha256=_sha(archive), progress=False)
    assert len(server.requests) == 1
    assert is_complete(root)
    assert _leftovers(tmp_path) == []


def test_other_version_in_root_rejected(tmp_path, server, archive):
    url = _serve(server, archive)
    root = download_speech_commands(tmp_path / "sc", url=url, version="v0.01", progress=False)
    with pytest.raises(DownloadError, match="v0.01"):
        download_speech_commands(root, url=url, version="v0.02", progress=False)
    with pytest.raises(DownloadError, match="already holds"):
        download_speech_commands(root, url=url, version="v0.01", sha256="b" * 64, progress=False)


def test_enclosing_folder_unwrapped(tmp_path, server):
    data = _make_archive(tmp_path / "wrapped.tar.gz", prefix="speech_commands_v0.02/")
    url = _serve(server, data, "/wrapped.tar.gz")
    root = download_speech_commands(tmp_path / "sc", url=url, sha256=_sha(data), progress=False)
    assert (root / "yes" / "0123abcd_nohash_0.wav").is_file()
    assert (root / "validation_list.txt").is_file()


def test_file_url(tmp_path, archive):
    src = tmp_path / "src" / "speech_commands_test.tar.gz"
    root = download_speech_commands(
        tmp_path / "sc", url=src.as_uri(), sha256=_sha(archive), progress=False
    )
    assert is_complete(root)
    assert src.is_file()


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="version"):
        download_speech_commands(tmp_path / "sc", version="v9")
    with pytest.raises(ValueError, match="sha256"):
        download_speech_commands(tmp_path / "sc", url="http://127.0.0.1:1/x.tar.gz", sha256="xyz")
    with pytest.raises(DownloadError, match="invalid URL"):
        download_speech_commands(tmp_path / "sc", url="no-scheme/x.tar.gz", sha256="c" * 64)


def test_a_root_that_is_or_lies_below_a_file_is_refused(tmp_path, server, archive):
    url = _serve(server, archive)
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for root in (a_file, a_file / "sc"):
        with pytest.raises(DownloadError, match=f"{a_file} is a file, not a folder"):
            download_speech_commands(root, url=url, sha256=_sha(archive), progress=False)
    (tmp_path / "gone").symlink_to(tmp_path / "moved")
    gone = f"{tmp_path / 'gone'} is a link to .*, which does not exist"
    with pytest.raises(DownloadError, match=gone):
        download_speech_commands(tmp_path / "gone", url=url, progress=False)
    assert server.requests == [] and a_file.read_text() == "mine"


def test_an_archive_without_word_folders_is_not_a_dataset(tmp_path, server):
    # Catches: any tar.gz marked complete (training then sends the user back to download).
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("README.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    data = buf.getvalue()
    url = _serve(server, data, "/other.tar.gz")
    with pytest.raises(DownloadError, match=r"holds no Speech Commands word folders.*README.txt"):
        download_speech_commands(tmp_path / "sc", url=url, sha256=_sha(data), progress=False)
    assert not (tmp_path / "sc").exists() and _leftovers(tmp_path) == []


def test_a_root_downloaded_as_one_version_is_not_used_as_another(tmp_path, server, archive):
    # Catches: dataset=speech_commands_v1 on a root fedkws downloaded as v0.02, used (and
    # described) as v0.01 because it was complete.
    from fedkws.data.pipeline import ensure_dataset

    url = _serve(server, archive)
    root = download_speech_commands(tmp_path / "sc", url=url, sha256=_sha(archive), progress=False)
    with pytest.raises(DownloadError, match="already holds Speech Commands v0.02, not v0.01"):
        ensure_dataset(root, download={"version": "v0.01", "url": url}, progress=False)
    assert ensure_dataset(root, download={"version": "v0.02", "url": url}, progress=False) == root
    # Catches: a root downloaded from a mirror (its archive's checksum is not the official
    # one) refused by a config that names no URL or checksum (the default dataset config).
    assert ensure_dataset(root, download={"version": "v0.02"}, progress=False) == root
    with pytest.raises(DownloadError, match="already holds a dataset unpacked from an archive"):
        ensure_dataset(root, download={"version": "v0.02", "sha256": "b" * 64}, progress=False)
    assert len(server.requests) == 1


def test_generating_into_a_folder_of_other_files_is_one_data_error(tmp_path):
    # Catches: a FileExistsError traceback and a failed.txt instead of an error line.
    from fedkws.data.errors import DataError
    from fedkws.data.pipeline import ensure_dataset

    root = tmp_path / "mine"
    root.mkdir()
    (root / "README.md").write_text("mine")
    with pytest.raises(DataError, match=f"dataset.root={root}: .*not empty"):
        ensure_dataset(root, generate={"speakers": 3, "utterances": 1, "seed": 0}, progress=False)
    assert [p.name for p in root.iterdir()] == ["README.md"]


def test_a_killed_unpacking_is_cleared_and_the_root_has_the_usual_mode(tmp_path, server, archive):
    # Catches: a .sc.extract-* folder of a process killed mid-unpacking kept forever, and a
    # root of mode 0700 (the temporary folder's) that other users cannot read.
    import stat

    from fedkws.fileio import umask

    stale = tmp_path / ".sc.extract-abc123"
    (stale / "yes").mkdir(parents=True)
    (stale / "yes" / "half.wav").write_bytes(b"x")
    url = _serve(server, archive)
    root = download_speech_commands(tmp_path / "sc", url=url, sha256=_sha(archive), progress=False)
    assert not stale.exists() and _leftovers(tmp_path) == []
    assert stat.S_IMODE(root.stat().st_mode) == 0o777 & ~umask()


def test_an_archive_that_is_not_a_tar_is_one_line(tmp_path, server):
    data = b"<html>not found</html>\n" * 4
    url = _serve(server, data, "/page.tar.gz")
    with pytest.raises(DownloadError, match="could not unpack") as refused:
        download_speech_commands(tmp_path / "sc", url=url, sha256=_sha(data), progress=False)
    assert "\n" not in str(refused.value) and "ReadError(" not in str(refused.value)
