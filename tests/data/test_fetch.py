"""Tests of jcnn.data.fetch against a local HTTP server on 127.0.0.1 (never the real network).

The server serves the shared data folder's files. Its behaviour is chosen by the first part of the
URL path (``/<mode>/<dataset>/<file>``), so one server plays every kind of mirror: ``ok`` (honours
``Range``), ``norange`` (ignores it), ``missing`` (404), ``truncate`` (announces the full length,
sends half and closes), ``corrupt`` (one byte changed), ``long`` (extra bytes, no length),
``flood`` (4 MiB of zeros, no length), ``cut`` (half the body, no length), ``bloated``
(announces 1 TB), ``stall`` (half the body, then silence), ``silent`` (no answer at all).
"""

import errno
import filecmp
import functools
import hashlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from jcnn import data
from jcnn.data import fetch
from jcnn.data.fetch import DownloadError, Source

LABELS = "t10k-labels-idx1-ubyte.gz"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        try:
            mode, name, filename = self.path.strip("/").split("/", 2)
        except ValueError:
            mode = "missing"
        path = server.root / name / filename if mode != "missing" else None
        if path is None or not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        if mode == "silent":
            server.release.wait(60)
            return
        if mode == "corrupt":
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
        start = 0
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if wanted and mode == "whole206":  # a partial answer that starts at byte 0 anyway
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 0-{len(body) - 1}/{len(body)}")
        elif wanted and mode == "ok":
            start = int(wanted[1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if mode == "bloated":
            self.send_header("Content-Length", str(10**12))
        elif mode not in ("long", "flood", "cut"):
            self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Connection", "close")
        self.end_headers()
        payload = body[start:]
        if mode in ("truncate", "stall", "cut"):
            payload = payload[: len(payload) // 2]
        if mode == "long":
            payload += b"extra bytes"
        if mode == "flood":
            payload = bytes(4 << 20)
        self.wfile.write(payload)
        self.wfile.flush()
        server.sent.append(len(payload))
        if mode == "stall":
            server.release.wait(60)
        self.close_connection = True


@pytest.fixture
def server(data_dir):
    """A threaded HTTP server on 127.0.0.1 serving ``data_dir``; ``server.url(mode)``: a mirror."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.root, httpd.requests, httpd.sent = Path(data_dir), [], []
    httpd.release = threading.Event()
    host, port = httpd.server_address
    httpd.url = lambda mode: f"http://{host}:{port}/{mode}/{{name}}/"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _never_the_real_network(monkeypatch):
    """A test that forgets its mirrors gets a refused connection, never the publishers' servers."""
    monkeypatch.setenv(fetch.MIRRORS_ENV, "http://127.0.0.1:9/")


def _only(monkeypatch, name, filename):
    """Restrict ``name`` to one of its files, keeping the pinned digest (small, fast tests)."""
    source = fetch.SOURCES[name]
    files = tuple(f for f in source.files if f.filename == filename)
    monkeypatch.setitem(fetch.SOURCES, name, Source(source.mirrors, files, source.homepage))


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---- the pinned digests -----------------------------------------------------------------------


def test_pinned_digests_match_the_official_files_we_have(data_dir):
    """The shared folder's byte-identical files (all but two, per its README) match the pins."""
    sums = dict(
        reversed(line.split("  ", 1)) for line in (data_dir / "SHA256SUMS").read_text().splitlines()
    )
    repacked = {"mnist/train-images-idx3-ubyte.gz", "cifar10/cifar-10-binary.tar.gz"}
    checked = 0
    for name, source in fetch.SOURCES.items():
        for remote in source.files:
            key = f"{name}/{remote.filename}"
            assert re.fullmatch(r"[0-9a-f]{64}", remote.sha256) and remote.size > 0
            if key in repacked:
                assert sums[key] != remote.sha256
                continue
            assert sums[key] == remote.sha256, key
            assert (data_dir / key).stat().st_size == remote.size, key
            checked += 1
    assert checked == 7
    # every dataset jcnn reads from original files can be downloaded, under the names it reads
    assert set(fetch.SOURCES) == set(data.DATASETS)
    for name, spec in data.DATASETS.items():
        if hasattr(spec, "archive"):
            expected = {spec.archive}
        else:
            expected = {f for split in ("train", "test") for f in spec.files(split)}
        assert {f.filename for f in fetch.SOURCES[name].files} == expected


def test_mirror_list_resolution(monkeypatch):
    monkeypatch.delenv(fetch.MIRRORS_ENV, raising=False)
    assert fetch.mirrors_for("mnist")[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    assert len(fetch.mirrors_for("mnist")) >= 2
    monkeypatch.setenv(fetch.MIRRORS_ENV, "http://a.lan/{name}, http://b.lan/x/")
    assert fetch.mirrors_for("cifar10") == [
        "http://a.lan/cifar10/",
        "http://b.lan/x/",
        "http://b.lan/x/cifar10/",
    ]
    assert fetch.urls("cifar10")["cifar-10-binary.tar.gz"][0] == (
        "http://a.lan/cifar10/cifar-10-binary.tar.gz"
    )
    assert fetch.mirrors_for("mnist", ["http://c.lan"]) == ["http://c.lan/", "http://c.lan/mnist/"]
    with pytest.raises(TypeError, match="mirrors"):
        fetch.mirrors_for("mnist", "http://c.lan")
    with pytest.raises(ValueError, match="mirrors.*ftp://x"):
        fetch.mirrors_for("mnist", ["ftp://x"])
    for bad, why in (("http://[bad/", "Invalid IPv6 URL"), ("http://h.lan:99999/", "Port")):
        with pytest.raises(ValueError, match=re.escape(f"mirrors: {bad!r} is not a valid URL")):
            fetch.mirrors_for("mnist", [bad])
        monkeypatch.setenv(fetch.MIRRORS_ENV, bad)
        with pytest.raises(ValueError, match=why):
            fetch.urls("mnist")
    with pytest.raises(ValueError, match="mirrors: expected a base URL with a host name"):
        fetch.mirrors_for("mnist", ["http:///data/"])
    with pytest.raises(ValueError, match="name: expected one of"):
        data.download("imagenet")
    with pytest.raises(ValueError, match="timeout"):
        data.download("mnist", timeout=0)


@pytest.mark.parametrize("timeout", [1e10, 2**63, 1e300])
def test_a_timeout_longer_than_a_socket_waits_is_named_before_anything_is_written(
    tmp_path, timeout
):
    # a socket refuses it with a raw OverflowError ("timestamp out of range for platform
    # time_t") at the first connection, after the folder was made
    with pytest.raises(ValueError, match="timeout: expected at most .* seconds"):
        data.download("mnist", data_dir=tmp_path / "x", timeout=timeout, progress=False)
    assert not (tmp_path / "x").exists()


def test_a_bad_mirrors_variable_is_named_in_the_error(monkeypatch):
    # Errors in JCNN_DATA_MIRRORS said "mirrors:", an argument never passed, and a value with no
    # address in it (",") silently meant the built-in addresses.
    for bad, message in (
        ("ftp://x", "expected http:// or https:// base URLs, got 'ftp://x'"),
        ("http:///data/", "expected a base URL with a host name"),
        ("http://h.lan:99999/", "'http://h.lan:99999/' is not a valid URL"),
        (" , ", r"expected http:// or https:// base URLs separated by commas .*got ' , '"),
    ):
        monkeypatch.setenv(fetch.MIRRORS_ENV, bad)
        with pytest.raises(ValueError, match=f"^JCNN_DATA_MIRRORS: {message}"):
            fetch.mirrors_for("mnist")
    monkeypatch.setenv(fetch.MIRRORS_ENV, "")  # empty: as if unset
    assert fetch.mirrors_for("mnist")[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"


# ---- downloads --------------------------------------------------------------------------------


def test_download_all_files_and_load_them(tmp_path, server, data_dir):
    """Fashion-MNIST's four files, checked against the real pinned digests, load as originals."""
    folder = data.download(
        "fashion_mnist", data_dir=tmp_path, mirrors=[server.url("ok")], progress=False
    )
    assert folder == tmp_path / "fashion_mnist"
    assert _listing(folder) == sorted(f.filename for f in fetch.SOURCES["fashion_mnist"].files)
    for remote in fetch.SOURCES["fashion_mnist"].files:
        assert (folder / remote.filename).read_bytes() == (
            data_dir / "fashion_mnist" / remote.filename
        ).read_bytes()
    images, labels = data.load("fashion_mnist", "test", data_dir=tmp_path)
    assert images.shape == (10000, 28, 28, 1) and np.bincount(labels).tolist() == [1000] * 10
    # present and verified: nothing is fetched again, even from a mirror that would fail
    count = len(server.requests)
    data.download(
        "fashion_mnist", data_dir=tmp_path, mirrors=[server.url("missing")], progress=False
    )
    assert len(server.requests) == count


def test_progress_bar_shown(tmp_path, server, monkeypatch, capsys):
    _only(monkeypatch, "mnist", LABELS)
    data.download("mnist", data_dir=tmp_path, mirrors=[server.url("ok")], progress=True)
    err = capsys.readouterr().err
    assert LABELS in err and "4.5" in err  # the file's name and its size (4.5 kB)


def test_not_found_on_first_mirror_then_second(tmp_path, server, monkeypatch):
    _only(monkeypatch, "mnist", LABELS)
    mirrors = [server.url("missing"), server.url("ok")]
    data.download("mnist", data_dir=tmp_path, mirrors=mirrors, progress=False)
    assert [path for path, _ in server.requests] == [
        f"/missing/mnist/{LABELS}",
        f"/ok/mnist/{LABELS}",
    ]
    assert _listing(tmp_path / "mnist") == [LABELS]


@pytest.mark.parametrize(
    ("mode", "match", "kept"),
    [
        ("missing", "HTTP 404", False),
        ("corrupt", "SHA-256 mismatch", False),
        ("long", "SHA-256 mismatch", False),
        ("flood", "sent more than 1057660 bytes", False),
        ("bloated", "announces 1000000000000 bytes", False),
        ("truncate", "truncated: the server closed the connection after 2271 of 4542 bytes", True),
    ],
)
def test_failures_are_clear_and_leave_nothing_half_written(
    tmp_path, server, monkeypatch, mode, match, kept
):
    _only(monkeypatch, "mnist", LABELS)
    url = server.url(mode)
    with pytest.raises(DownloadError, match=match) as info:
        data.download("mnist", data_dir=tmp_path, mirrors=[url], progress=False)
    message = str(info.value)
    assert url.replace("{name}", "mnist") + LABELS in message
    assert "--data-dir" in message and str(tmp_path / "mnist") in message
    assert not (tmp_path / "mnist" / LABELS).exists()
    part = tmp_path / "mnist" / (LABELS + ".part")
    if kept:  # an interrupted download keeps what it received, to resume from
        assert part.read_bytes() == (server.root / "mnist" / LABELS).read_bytes()[:2271]
        assert "resumes from there" in message
    else:
        assert _listing(tmp_path / "mnist") == []


def test_stalled_server_times_out_and_next_mirror_resumes(tmp_path, server, monkeypatch):
    """A server silent mid-body fails after ``timeout``; the next mirror continues with Range."""
    _only(monkeypatch, "mnist", LABELS)
    original = (server.root / "mnist" / LABELS).read_bytes()
    with pytest.raises(DownloadError, match=r"stalled: no data for 0.5 s after 2271 of 4542 bytes"):
        data.download(
            "mnist", data_dir=tmp_path, mirrors=[server.url("stall")], timeout=0.5, progress=False
        )
    assert not (tmp_path / "mnist" / LABELS).exists()
    data.download(
        "mnist",
        data_dir=tmp_path,
        mirrors=[server.url("stall"), server.url("ok")],
        timeout=0.5,
        progress=False,
    )
    assert (tmp_path / "mnist" / LABELS).read_bytes() == original
    assert server.requests[-1] == (f"/ok/mnist/{LABELS}", "bytes=2271-")
    assert server.sent[-1] == len(original) - 2271
    assert _listing(tmp_path / "mnist") == [LABELS]


def test_server_that_never_answers_times_out(tmp_path, server, monkeypatch):
    _only(monkeypatch, "mnist", LABELS)
    with pytest.raises(DownloadError, match=r"no answer within 0.3 s"):
        data.download(
            "mnist", data_dir=tmp_path, mirrors=[server.url("silent")], timeout=0.3, progress=False
        )
    assert _listing(tmp_path / "mnist") == []


@pytest.mark.parametrize("mode", ["ok", "norange"])
def test_resume_of_a_partial_file(tmp_path, server, monkeypatch, mode):
    """A kept .part is completed with a Range request (or fetched whole where Range is ignored)."""
    _only(monkeypatch, "fashion_mnist", "t10k-images-idx3-ubyte.gz")
    original = (server.root / "fashion_mnist" / "t10k-images-idx3-ubyte.gz").read_bytes()
    folder = tmp_path / "fashion_mnist"
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte.gz.part").write_bytes(original[:1_000_003])
    data.download("fashion_mnist", data_dir=tmp_path, mirrors=[server.url(mode)], progress=False)
    assert (folder / "t10k-images-idx3-ubyte.gz").read_bytes() == original
    assert _listing(folder) == ["t10k-images-idx3-ubyte.gz"]
    assert server.requests == [
        (f"/{mode}/fashion_mnist/t10k-images-idx3-ubyte.gz", "bytes=1000003-")
    ]
    assert server.sent == [len(original) - 1_000_003 if mode == "ok" else len(original)]


def test_a_partial_answer_from_byte_0_to_a_resume_replaces_the_kept_bytes(
    tmp_path, server, monkeypatch
):
    """A server answering ``Range: bytes=N-`` with a 206 whose Content-Range starts at byte 0
    sends the whole file: it is written from byte 0 (the kept .part used to be refused forever)."""
    _only(monkeypatch, "mnist", LABELS)
    original = (server.root / "mnist" / LABELS).read_bytes()
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / (LABELS + ".part")).write_bytes(original[:1000])
    data.download("mnist", data_dir=tmp_path, mirrors=[server.url("whole206")], progress=False)
    assert (folder / LABELS).read_bytes() == original
    assert _listing(folder) == [LABELS]
    assert server.requests == [(f"/whole206/mnist/{LABELS}", "bytes=1000-")]


def test_resume_after_a_truncated_download(tmp_path, server, monkeypatch):
    _only(monkeypatch, "mnist", LABELS)
    with pytest.raises(DownloadError, match="truncated"):
        data.download("mnist", data_dir=tmp_path, mirrors=[server.url("truncate")], progress=False)
    data.download("mnist", data_dir=tmp_path, mirrors=[server.url("ok")], progress=False)
    assert server.requests[-1] == (f"/ok/mnist/{LABELS}", "bytes=2271-")
    assert server.sent[-1] == 4542 - 2271
    original = (server.root / "mnist" / LABELS).read_bytes()
    assert (tmp_path / "mnist" / LABELS).read_bytes() == original


@pytest.mark.parametrize("kept", [b"\x00" * 1000, b"\x00" * 4600, "the file and 2 bytes"])
def test_wrong_partial_file_is_dropped_and_the_file_fetched_again_whole(
    tmp_path, server, monkeypatch, kept
):
    """A .part whose bytes are not the file's start (or that is longer than the file) fails the
    check after the resume; the same address then serves the whole file from byte 0."""
    _only(monkeypatch, "mnist", LABELS)
    original = (server.root / "mnist" / LABELS).read_bytes()
    if kept == "the file and 2 bytes":
        kept = original + b"xx"
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / (LABELS + ".part")).write_bytes(kept)
    data.download("mnist", data_dir=tmp_path, mirrors=[server.url("ok")], progress=False)
    assert (folder / LABELS).read_bytes() == original
    assert _listing(folder) == [LABELS]
    url = f"/ok/mnist/{LABELS}"
    assert server.requests == [(url, f"bytes={len(kept)}-"), (url, None)]


def test_a_server_sending_wrong_bytes_after_a_resume_is_refused_and_nothing_kept(
    tmp_path, server, monkeypatch
):
    _only(monkeypatch, "mnist", LABELS)
    original = (server.root / "mnist" / LABELS).read_bytes()
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / (LABELS + ".part")).write_bytes(original[:1000])
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        data.download("mnist", data_dir=tmp_path, mirrors=[server.url("corrupt")], progress=False)
    assert _listing(folder) == []


def test_a_body_cut_short_without_a_length_is_called_truncated_and_resumed(
    tmp_path, server, monkeypatch
):
    _only(monkeypatch, "mnist", LABELS)
    original = (server.root / "mnist" / LABELS).read_bytes()
    message = "truncated: the server closed the connection after 2271 bytes without announcing"
    with pytest.raises(DownloadError, match=message):
        data.download("mnist", data_dir=tmp_path, mirrors=[server.url("cut")], progress=False)
    part = tmp_path / "mnist" / (LABELS + ".part")
    assert part.read_bytes() == original[:2271]
    data.download("mnist", data_dir=tmp_path, mirrors=[server.url("ok")], progress=False)
    assert (tmp_path / "mnist" / LABELS).read_bytes() == original
    assert server.requests[-1] == (f"/ok/mnist/{LABELS}", "bytes=2271-")


def test_offline_error_lists_every_address(tmp_path, monkeypatch):
    _only(monkeypatch, "mnist", LABELS)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mirrors = [f"http://127.0.0.1:{port}/a/", f"http://127.0.0.1:{port}/b/"]
    with pytest.raises(DownloadError) as info:
        data.download("mnist", data_dir=tmp_path, mirrors=mirrors, progress=False)
    message = str(info.value)
    for mirror in mirrors:
        assert f"{mirror}{LABELS}: cannot connect" in message
    assert "--data-dir" in message and "JCNN_DATA_DIR" in message
    assert _listing(tmp_path / "mnist") == []


def test_present_file_that_is_wrong_is_replaced_only_by_a_verified_one(
    tmp_path, server, monkeypatch
):
    _only(monkeypatch, "mnist", LABELS)
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / LABELS).write_bytes(b"not the labels")
    with pytest.raises(DownloadError):
        data.download("mnist", data_dir=tmp_path, mirrors=[server.url("corrupt")], progress=False)
    assert (folder / LABELS).read_bytes() == b"not the labels"  # a failed download changes nothing
    data.download("mnist", data_dir=tmp_path, mirrors=[server.url("ok")], progress=False)
    assert (folder / LABELS).read_bytes() == (server.root / "mnist" / LABELS).read_bytes()


def test_faithful_repacked_copy_is_kept(tmp_path, server, data_dir):
    """The shared MNIST (train images re-compressed) verifies by content: nothing downloaded."""
    shutil.copytree(data_dir / "mnist", tmp_path / "mnist")
    data.download("mnist", data_dir=tmp_path, mirrors=[server.url("missing")], progress=False)
    assert server.requests == []


@pytest.mark.parametrize("home", [".", "mnist"])
def test_files_where_load_reads_them_are_verified_not_downloaded_again(
    tmp_path, server, monkeypatch, capsys, data_dir, home
):
    """Files directly in the data directory (or the dataset's folder given as it), where
    data.load reads them, count as present: they were downloaded again into <dir>/mnist/."""
    _only(monkeypatch, "mnist", LABELS)
    given = tmp_path / home
    given.mkdir(exist_ok=True)
    shutil.copy(data_dir / "mnist" / LABELS, given / LABELS)
    mirrors = [server.url("ok")]
    assert data.download("mnist", data_dir=given, mirrors=mirrors, progress=False) == given
    assert server.requests == [] and _listing(given) == [LABELS]
    monkeypatch.setenv(fetch.MIRRORS_ENV, server.url("ok"))
    assert fetch.main(["download", "mnist", "--data-dir", str(given)]) == 0
    out = capsys.readouterr().out
    assert f"mnist: already in {given}, where jcnn.data.load reads it" in out
    assert f"{given / LABELS}: ok: the official file" in out
    assert server.requests == [] and _listing(given) == [LABELS]
    (given / LABELS).write_bytes(b"not the labels")  # a wrong file there: the download goes on
    target = data.download("mnist", data_dir=given, mirrors=mirrors, progress=False)
    assert target == given / "mnist" and _listing(target) == [LABELS]


def test_environment_mirrors_and_load_download(tmp_path, server, monkeypatch, loaded):
    """load(download=True) into an empty cache, mirrors from JCNN_DATA_MIRRORS (all MNIST)."""
    monkeypatch.setenv(fetch.MIRRORS_ENV, server.url("ok"))
    monkeypatch.delenv("JCNN_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="jcnn-data download mnist"):
        data.load("mnist", "test")
    images, labels = data.load("mnist", "test", download=True)
    expected_images, expected_labels = loaded("mnist", "test")
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)
    assert _listing(tmp_path / "jcnn" / "data" / "mnist") == sorted(
        f.filename for f in fetch.SOURCES["mnist"].files
    )
    with pytest.raises(TypeError, match="download"):
        data.load("mnist", "test", download="yes")


def test_cifar10_archive(tmp_path, server):
    data.download("cifar10", data_dir=tmp_path, mirrors=[server.url("ok")], progress=False)
    assert _listing(tmp_path / "cifar10") == ["cifar-10-binary.tar.gz"]
    name = "cifar-10-binary.tar.gz"
    assert filecmp.cmp(tmp_path / "cifar10" / name, server.root / "cifar10" / name, shallow=False)


# ---- jcnn-data --------------------------------------------------------------------------------


def test_cli_download_verify_list(tmp_path, server, monkeypatch, capsys, data_dir):
    monkeypatch.setenv(fetch.MIRRORS_ENV, server.url("ok"))
    assert fetch.main(["download", "fashion_mnist", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok: the official file") == 4
    folder = tmp_path / "fashion_mnist"
    files = ", ".join(f.filename for f in fetch.SOURCES["fashion_mnist"].files)
    assert f"fashion_mnist: downloaded {files} into {folder}" in out
    # again: the ok lines alone did not say whether anything was fetched
    fetched = len(server.requests)
    assert fetch.main(["download", "fashion_mnist", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert len(server.requests) == fetched
    assert f"fashion_mnist: every file already in {folder}, verified; nothing downloaded" in out
    first = fetch.SOURCES["fashion_mnist"].files[0].filename
    (folder / first).unlink()
    assert fetch.main(["download", "fashion_mnist", "--data-dir", str(tmp_path)]) == 0
    assert f"fashion_mnist: downloaded {first} into {folder}\n" in capsys.readouterr().out
    assert fetch.main(["verify", "mnist", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert (
        out.count("ok: the official file") == 3 and "train-images-idx3-ubyte.gz: ok: content" in out
    )
    target = tmp_path / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(target.read_bytes()[:-1])
    assert fetch.main(["verify", "fashion_mnist", "--data-dir", str(tmp_path)]) == 1
    assert f"{target}: BAD" in capsys.readouterr().out
    assert fetch.main(["list", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'cifar10' / 'cifar-10-binary.tar.gz'}: missing" in out
    assert server.url("ok").replace("{name}", "cifar10") + "cifar-10-binary.tar.gz" in out
    # the dataset folder itself as --data-dir, as data.load accepts it
    assert fetch.main(["verify", "mnist", "--data-dir", str(data_dir / "mnist")]) == 0
    assert capsys.readouterr().out.count(": ok:") == 4


def test_cli_verify_extracted_cifar_folder(tmp_path, capsys, loaded):
    """CIFAR-10 as an extracted folder: each batch file checked against the official content."""
    images, labels = loaded("cifar10", "test")
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    records = np.concatenate(
        [labels.astype(np.uint8)[:, None], images.transpose(0, 3, 1, 2).reshape(10000, -1)], axis=1
    )
    (folder / "test_batch.bin").write_bytes(records.tobytes())
    assert fetch.main(["verify", "cifar10", "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{folder / 'test_batch.bin'}: ok: content identical" in out
    assert f"{folder / 'data_batch_1.bin'}: missing" in out


def test_cli_refuses_a_bad_mirrors_variable_in_one_line(tmp_path, monkeypatch, capsys):
    # jcnn-data download/list ended in a raw ValueError traceback.
    monkeypatch.setenv(fetch.MIRRORS_ENV, "ftp://x")
    for argv in (["download", "mnist", "--data-dir", str(tmp_path / "d")], ["list"]):
        assert fetch.main(argv) == 2
        captured = capsys.readouterr()
        assert captured.err == (
            "jcnn-data: JCNN_DATA_MIRRORS: expected http:// or https:// base URLs, got 'ftp://x'\n"
        )
        assert captured.out == ""
    assert not (tmp_path / "d").exists()


def test_cli_download_failure_is_one_clear_message(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv(fetch.MIRRORS_ENV, server.url("missing"))
    assert fetch.main(["download", "mnist", "--data-dir", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("jcnn-data: mnist: could not download") and "Traceback" not in err
    assert "HTTP 404" in err and "--data-dir" in err
    with pytest.raises(SystemExit):
        fetch.main(["download", "imagenet"])
    capsys.readouterr()
    for bad in ("inf", "nan", "0"):  # inf was a raw ValueError traceback from download
        assert fetch.main(["download", "mnist", "--data-dir", str(tmp_path), "--timeout", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("jcnn-data: --timeout: expected a finite number of seconds > 0")


@pytest.mark.parametrize(
    "argv, says",
    [
        ([], "jcnn-data: error: the following arguments are required: command"),
        (["download"], "jcnn-data download: error: the following arguments are required: NAME"),
        (["verify", "imagenet"], "jcnn-data verify: error: argument NAME: invalid choice"),
        (["download", "mnist", "--timeout", "x"], "argument --timeout: invalid float value: 'x'"),
        (["list", "--force"], "jcnn-data: error: unrecognized arguments: --force"),
    ],
)
def test_cli_usage_errors_are_one_line(argv, says, capsys):
    # argparse printed its usage block before the error
    with pytest.raises(SystemExit) as exit:
        fetch.main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and says in err, err
    assert err.rstrip().endswith("--help lists the flags)"), err


def test_cli_verify_names_a_data_dir_that_is_not_a_folder(tmp_path, capsys):
    # each file was listed as missing under the folder, as if the files alone were absent
    (tmp_path / "file").write_bytes(b"x")
    for folder in (tmp_path / "none", tmp_path / "file"):
        assert fetch.main(["verify", "mnist", "--data-dir", str(folder)]) == 2
        captured = capsys.readouterr()
        assert captured.err == f"jcnn-data: --data-dir {folder}: no such folder\n"
        assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("command", [["list"], ["download", "mnist"]])
def test_cli_list_and_download_name_a_data_dir_that_is_a_file(tmp_path, capsys, command):
    # list showed every file as missing beneath the file, exit 0; download failed creating it
    (tmp_path / "file").write_bytes(b"x")
    assert fetch.main([*command, "--data-dir", str(tmp_path / "file")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"jcnn-data: --data-dir {tmp_path / 'file'}: no such folder\n"
    assert captured.out == "" and (tmp_path / "file").read_bytes() == b"x"


def test_numpy_real_scalars_are_valid_timeouts(tmp_path, server, monkeypatch):
    _only(monkeypatch, "mnist", LABELS)
    for timeout in (np.float32(5), np.int64(5), np.float64(0.5)):  # np.float32(5) was refused
        folder = data.download(
            "mnist",
            data_dir=tmp_path,
            mirrors=[server.url("ok")],
            timeout=timeout,
            progress=False,
            force=True,
        )
        assert (folder / LABELS).exists()


@pytest.mark.slow
def test_jcnn_train_downloads_into_an_empty_cache(tmp_path, server):
    """``jcnn-train`` without --data-dir, empty cache, mirror reachable: downloads and trains."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("JCNN_DATA_DIR", None)
    env[fetch.MIRRORS_ENV] = server.url("ok")
    code = "import sys; from jcnn.train.cli import main; sys.exit(main())"
    args = [
        "--model",
        "lenet5_1998",
        "--dataset",
        "fashion_mnist",
        "--limit-train",
        "256",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test accuracy" in done.stdout
    folder = tmp_path / "cache" / "jcnn" / "data" / "fashion_mnist"
    assert _listing(folder) == sorted(f.filename for f in fetch.SOURCES["fashion_mnist"].files)
    for remote in fetch.SOURCES["fashion_mnist"].files:
        assert hashlib.sha256((folder / remote.filename).read_bytes()).hexdigest() == remote.sha256


def test_unusable_data_folder_is_a_clear_error(tmp_path, server, monkeypatch):
    _only(monkeypatch, "mnist", LABELS)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DownloadError, match="cannot create or write the data folder .*--data-dir"):
        data.download("mnist", data_dir=tmp_path / "a_file", mirrors=[server.url("ok")])
    for bad in ("5", True, np.bool_(True), np.array([5.0]), None):
        with pytest.raises(TypeError, match="timeout: expected a number of seconds"):
            data.download("mnist", data_dir=tmp_path, timeout=bad)
    for bad in (float("inf"), np.float32("nan"), np.float64(-1.0), np.int64(0), 0.0):
        with pytest.raises(ValueError, match="timeout: expected a finite number of seconds > 0"):
            data.download("mnist", data_dir=tmp_path, timeout=bad)
    with pytest.raises(ValueError, match="at least one"):
        data.download("mnist", data_dir=tmp_path, mirrors=[])
    assert server.requests == []
    # a folder where a file goes: os.replace raised IsADirectoryError after the download
    (tmp_path / "mnist" / LABELS / "inside").mkdir(parents=True)
    with pytest.raises(DownloadError, match=f"mnist/{LABELS} exists and is not a file.*move it"):
        data.download("mnist", data_dir=tmp_path, mirrors=[server.url("ok")])
    assert server.requests == [] and (tmp_path / "mnist" / LABELS / "inside").is_dir()
    # the same for its partial file: the download failed writing it and advised freeing space
    (tmp_path / "mnist" / LABELS / "inside").rmdir()
    (tmp_path / "mnist" / LABELS).rmdir()
    (tmp_path / "mnist" / f"{LABELS}.part").mkdir()
    with pytest.raises(DownloadError, match=f"mnist/{LABELS}.part exists and is not a file.*move"):
        data.download("mnist", data_dir=tmp_path, mirrors=[server.url("ok")])
    assert server.requests == []
    (tmp_path / "mnist" / f"{LABELS}.part").rmdir()


@pytest.mark.parametrize("code, advice", [(errno.ENOSPC, True), (errno.EACCES, False)])
def test_a_partial_file_that_cannot_be_written_is_named_with_advice_that_fits(
    tmp_path, server, monkeypatch, code, advice
):
    _only(monkeypatch, "mnist", LABELS)
    opened = Path.open

    def refuse_part_files(path, *args, **kwargs):
        if path.name.endswith(".part"):
            raise OSError(code, os.strerror(code))
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse_part_files)
    with pytest.raises(DownloadError, match=f"cannot write .*{LABELS}.part") as error:
        data.download("mnist", data_dir=tmp_path, mirrors=[server.url("ok")])
    assert ("free some space" in str(error.value)) == advice
    assert "give another folder as --data-dir" in str(error.value)
    assert not (tmp_path / "mnist" / LABELS).exists()


def test_mirror_serving_a_recompressed_copy(tmp_path, server, monkeypatch, data_dir):
    """Other bytes with the official content (re-compressed) pass; a changed byte in them fails."""
    name = "train-images-idx3-ubyte.gz"
    _only(monkeypatch, "mnist", name)
    served = server.root / "mnist" / name
    assert fetch.file_sha256(served) != fetch.SOURCES["mnist"].files[0].sha256
    with pytest.raises(DownloadError, match="SHA-256 mismatch.*not the official data either"):
        data.download("mnist", data_dir=tmp_path, mirrors=[server.url("corrupt")], progress=False)
    assert _listing(tmp_path / "mnist") == []
    data.download("mnist", data_dir=tmp_path, mirrors=[server.url("ok")], progress=False)
    assert filecmp.cmp(tmp_path / "mnist" / name, served, shallow=False)


def test_jcnn_train_missing_files_are_one_line_errors(tmp_path, server, monkeypatch):
    """With --data-dir nothing is downloaded; without it a failed download is one message."""
    from jcnn.train.cli import main

    monkeypatch.setenv(fetch.MIRRORS_ENV, server.url("missing"))
    monkeypatch.delenv("JCNN_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    empty = tmp_path / "my data"
    empty.mkdir()
    common = ["--dataset", "mnist", "--out", str(tmp_path / "run"), "--no-progress"]
    with pytest.raises(SystemExit) as info:
        main([*common, "--data-dir", str(empty)])
    message = str(info.value.code)
    assert message.startswith("jcnn-train: mnist (train): expected")
    assert f"jcnn-data download mnist --data-dir '{empty}'" in message
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/" in message
    assert server.requests == [] and _listing(empty) == []
    with pytest.raises(SystemExit) as info:
        main(common)
    message = str(info.value.code)
    assert message.startswith("jcnn-train: mnist: could not download") and "HTTP 404" in message
    assert _listing(tmp_path / "cache" / "jcnn" / "data" / "mnist") == []
    assert not (tmp_path / "run").exists()


def test_plain_http_server_over_a_data_directory(tmp_path, monkeypatch, data_dir):
    """``python -m http.server`` in a data directory is a mirror as is: no {name} needed."""
    handler = functools.partial(_QuietFiles, directory=str(data_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        host, port = httpd.server_address
        monkeypatch.setenv(fetch.MIRRORS_ENV, f"http://{host}:{port}")
        _only(monkeypatch, "fashion_mnist", LABELS)
        data.download("fashion_mnist", data_dir=tmp_path, progress=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert filecmp.cmp(
        tmp_path / "fashion_mnist" / LABELS, data_dir / "fashion_mnist" / LABELS, shallow=False
    )


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_complete_part_file_is_used_or_replaced(tmp_path, server, monkeypatch):
    """A full-size .part is renamed without a request when right, fetched again when wrong."""
    _only(monkeypatch, "mnist", LABELS)
    original = (server.root / "mnist" / LABELS).read_bytes()
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / (LABELS + ".part")).write_bytes(original)
    data.download("mnist", data_dir=tmp_path, mirrors=[server.url("ok")], progress=False)
    assert server.requests == [] and _listing(folder) == [LABELS]
    (folder / LABELS).unlink()
    (folder / (LABELS + ".part")).write_bytes(bytes(len(original)))
    data.download("mnist", data_dir=tmp_path, mirrors=[server.url("ok")], progress=False)
    assert server.requests == [(f"/ok/mnist/{LABELS}", None)]
    assert (folder / LABELS).read_bytes() == original and _listing(folder) == [LABELS]


def test_ctrl_c_keeps_the_part_and_the_next_run_resumes(tmp_path, server, monkeypatch):
    _only(monkeypatch, "fashion_mnist", LABELS)
    original = (server.root / "fashion_mnist" / LABELS).read_bytes()
    monkeypatch.setattr(fetch, "_CHUNK", 1000)
    real_read_some, calls = fetch._read_some, []

    def interrupted_after_two_chunks(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_read_some(*args)

    monkeypatch.setattr(fetch, "_read_some", interrupted_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        data.download(
            "fashion_mnist", data_dir=tmp_path, mirrors=[server.url("ok")], progress=False
        )
    folder = tmp_path / "fashion_mnist"
    assert _listing(folder) == [LABELS + ".part"]
    assert (folder / (LABELS + ".part")).read_bytes() == original[:2000]
    monkeypatch.setattr(fetch, "_read_some", real_read_some)
    data.download("fashion_mnist", data_dir=tmp_path, mirrors=[server.url("ok")], progress=False)
    assert server.requests[-1] == (f"/ok/fashion_mnist/{LABELS}", "bytes=2000-")
    assert (folder / LABELS).read_bytes() == original and _listing(folder) == [LABELS]


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1"])
def test_cli_download_refuses_a_timeout_that_is_not_finite_and_positive(tmp_path, capsys, value):
    # --timeout inf used to pass the command's check and end in download()'s ValueError traceback
    argv = ["download", "mnist", "--data-dir", str(tmp_path), "--timeout", value, "--no-progress"]
    assert fetch.main(argv) == 2
    assert "--timeout: expected a finite number of seconds > 0" in capsys.readouterr().err
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("flag", ["force", "progress"])
@pytest.mark.parametrize("bad", ["no", 0, None])
def test_download_flags_must_be_bools(tmp_path, server, flag, bad):
    # force="no" was truthy and downloaded again every file already present; any value passed
    with pytest.raises(TypeError, match=f"{flag}: expected a Python bool, got {bad!r}"):
        data.download("mnist", data_dir=tmp_path, mirrors=[server.url("ok")], **{flag: bad})
    assert server.requests == [] and not (tmp_path / "mnist").exists()


def test_python_dash_m_runs_the_command(tmp_path):
    # `python -m jcnn.data.fetch download mnist` did nothing and exited 0 (no __main__ guard),
    # as jcnn-train's and jcnn-eval's modules do run
    done = subprocess.run(
        [sys.executable, "-m", "jcnn.data.fetch", "list", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"data directory: {tmp_path}" in done.stdout
    assert "mnist:" in done.stdout and "missing" in done.stdout
