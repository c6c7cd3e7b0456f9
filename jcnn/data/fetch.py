"""Downloads of the datasets' original files, checked against pinned SHA-256 digests.

:func:`download` fetches the files :func:`jcnn.data.load` reads into ``<data_dir>/<name>/``, from
the publishers' addresses and their mirrors, each tried in order. Every file is written to
``<file>.part`` in the target folder, checked against the official SHA-256 pinned in
:data:`SOURCES` and only then renamed into place (``os.replace``): the dataset's file name never
holds anything but a complete, verified file. An interrupted download (connection lost, server
stalled, Ctrl-C) keeps its ``.part``, and the next attempt asks for the rest with an HTTP ``Range``
request; the whole file is verified at the end either way. A resumed file that fails the check is
fetched whole from the same address once more (the kept part may have been the wrong bytes); bytes
that fail the check then are deleted.
Bytes that differ from the pinned digest are accepted only when their decompressed content has the
official content digests (``datasets.CONTENT_SHA256``, read with the loader's bounded
decompression): a mirror that re-compressed a file still delivers verified data.

``jcnn-data download NAME`` / ``jcnn-data verify NAME`` / ``jcnn-data list`` are the command line.

The addresses tried are, in order: the ``mirrors`` argument, else the environment variable
``JCNN_DATA_MIRRORS``, else the built-in list of :data:`SOURCES`. Each address is a base URL that
the file name is appended to; ``{name}`` in it becomes the dataset's name, so one local mirror can
serve every dataset (``JCNN_DATA_MIRRORS=http://mirror.lan/datasets/{name}/``). A given address
without ``{name}`` is tried as is, then with ``<name>/`` appended (a copy of a data directory).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import http.client
import math
import numbers
import os
import re
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from jcnn._cli import OneLineParser, quiet_when_the_reader_leaves
from jcnn.data import datasets
from jcnn.functional._checks import check_bool

__all__ = [
    "DownloadError",
    "MIRRORS_ENV",
    "RemoteFile",
    "SOURCES",
    "Source",
    "download",
    "file_sha256",
    "main",
    "mirrors_for",
    "urls",
]

MIRRORS_ENV = "JCNN_DATA_MIRRORS"
"""Environment variable overriding the built-in addresses: base URLs separated by commas/spaces."""

_CHUNK = 1 << 16
_USER_AGENT = "jcnn-data/0.1 (Python urllib)"


class DownloadError(OSError):
    """No address delivered a verified copy of a file; the message lists each address and why."""


@dataclass(frozen=True)
class RemoteFile:
    """One file as its publisher distributes it: name, size in bytes, SHA-256 of the bytes."""

    filename: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Source:
    """Where a dataset's files come from: base URLs tried in order, and the files."""

    mirrors: tuple[str, ...]
    files: tuple[RemoteFile, ...]
    homepage: str


# Sizes and digests are those of the official files, as registered by tensorflow-datasets 4.9
# (url_checksums/{mnist,fashion_mnist,cifar10}.txt); the MNIST and Fashion-MNIST ones agree with the
# MD5s the publishers list. Every mirror serves the same bytes.
SOURCES = {
    "mnist": Source(
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        files=(
            RemoteFile(
                "train-images-idx3-ubyte.gz",
                9912422,
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            ),
            RemoteFile(
                "train-labels-idx1-ubyte.gz",
                28881,
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            ),
            RemoteFile(
                "t10k-images-idx3-ubyte.gz",
                1648877,
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            ),
            RemoteFile(
                "t10k-labels-idx1-ubyte.gz",
                4542,
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            ),
        ),
        homepage="http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion_mnist": Source(
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
        ),
        files=(
            RemoteFile(
                "train-images-idx3-ubyte.gz",
                26421880,
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            ),
            RemoteFile(
                "train-labels-idx1-ubyte.gz",
                29515,
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            ),
            RemoteFile(
                "t10k-images-idx3-ubyte.gz",
                4422102,
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            ),
            RemoteFile(
                "t10k-labels-idx1-ubyte.gz",
                5148,
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            ),
        ),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    ),
    "cifar10": Source(
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        files=(
            RemoteFile(
                "cifar-10-binary.tar.gz",
                170052171,
                "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
            ),
        ),
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
    ),
}
"""Each downloadable dataset: its addresses (tried in order) and its files with pinned digests."""


def _source(name) -> Source:
    if not isinstance(name, str) or name not in SOURCES:
        raise ValueError(f"name: expected one of {', '.join(SOURCES)}, got {name!r}")
    return SOURCES[name]


def mirrors_for(name: str, mirrors: Iterable[str] | None = None) -> list[str]:
    """The base URLs tried for ``name``, in order: ``mirrors``, ``$JCNN_DATA_MIRRORS``, built-in.

    ``{name}`` in a given mirror becomes the dataset's name; a mirror without it is tried as a copy
    of the dataset's folder, then as a copy of a whole data directory (``<mirror>/<name>/``).

    >>> mirrors_for("cifar10", ["http://127.0.0.1:8000/{name}"])
    ['http://127.0.0.1:8000/cifar10/']
    >>> mirrors_for("mnist", ["http://mirror.lan/data"])
    ['http://mirror.lan/data/', 'http://mirror.lan/data/mnist/']
    """
    source = _source(name)
    label = "mirrors"
    if mirrors is None:
        given = os.environ.get(MIRRORS_ENV, "")
        from_env = [m for m in re.split(r"[,\s]+", given) if m]
        if not from_env and given.strip():
            raise ValueError(
                f"{MIRRORS_ENV}: expected http:// or https:// base URLs separated by commas or "
                f"spaces (or unset: the built-in addresses), got {given!r}"
            )
        if not from_env:
            return list(source.mirrors)
        mirrors, label = from_env, MIRRORS_ENV
    elif isinstance(mirrors, str):
        raise TypeError(f"mirrors: expected a list of base URLs, got the string {mirrors!r}")
    else:
        mirrors = list(mirrors)
        if not mirrors:
            raise ValueError("mirrors: expected at least one base URL, got an empty list")
    bases = []
    for mirror in mirrors:
        if not isinstance(mirror, str) or not re.match(r"https?://", mirror):
            raise ValueError(f"{label}: expected http:// or https:// base URLs, got {mirror!r}")
        try:
            parts = urllib.parse.urlsplit(mirror)
            _ = parts.port  # raises for a port that is not a number in 0..65535
        except ValueError as err:
            raise ValueError(f"{label}: {mirror!r} is not a valid URL ({err})") from None
        if not parts.hostname:
            raise ValueError(f"{label}: expected a base URL with a host name, got {mirror!r}")
        base = mirror.replace("{name}", name)
        base = base if base.endswith("/") else base + "/"
        # without {name}: a copy of one dataset's folder, or of a whole data directory
        bases += [base] if "{name}" in mirror else [base, f"{base}{name}/"]
    return bases


def urls(name: str, mirrors: Iterable[str] | None = None) -> dict[str, list[str]]:
    """``{file name: [address, ...]}``: every address each file of ``name`` is fetched from."""
    bases = mirrors_for(name, mirrors)
    return {f.filename: [base + f.filename for base in bases] for f in _source(name).files}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    return datasets._sha256_file(Path(path))


def _resolve_folder(name: str, data_dir) -> Path:
    return datasets.default_data_dir(data_dir) / name


def download(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    mirrors: Iterable[str] | None = None,
    timeout: float = 30.0,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Download the original files of ``name`` into ``<data_dir>/<name>/`` and verify them.

    A file already there is kept when it is the official file (same SHA-256) or a faithful copy
    of its content (e.g. re-compressed); otherwise, or with ``force``, it is downloaded again and
    replaced only once the new copy is verified. Where :func:`jcnn.data.load` already reads every
    file elsewhere, verified (directly in ``data_dir``, or CIFAR-10's extracted folder), nothing
    is downloaded (unless ``force``) and that folder is returned.

    Args:
      name: ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"``.
      data_dir: the data directory (default as :func:`jcnn.data.load`: ``$JCNN_DATA_DIR``, then
        ``~/.cache/jcnn/data``); the files go into its ``<name>/`` folder.
      mirrors: base URLs tried in order instead of ``$JCNN_DATA_MIRRORS`` or the built-in ones.
      timeout: seconds to wait for a connection or for the next bytes of a response; a server
        silent for longer counts as failed and the next address is tried.
      progress: show a progress bar (rich) on standard error.
      force: download even the files that are present and correct.

    Returns:
      The folder holding the files.

    Raises:
      DownloadError: every address failed for a file; the message lists each address with its
        failure, and how to place the files by hand.
    """
    return _download(name, data_dir, mirrors, timeout, progress, force)[0]


def _download(name, data_dir, mirrors, timeout, progress, force) -> tuple[Path, list[str]]:
    """``download``, and the names of the files it fetched (none where all were there)."""
    source = _source(name)
    # numbers.Real takes NumPy's real scalars too (np.float32(5)), not bools or arrays
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout: expected a number of seconds, got {type(timeout).__name__}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout: expected a finite number of seconds > 0, got {timeout!r}")
    if timeout > threading.TIMEOUT_MAX:  # a socket raised OverflowError at the first connection
        raise ValueError(
            f"timeout: expected at most {threading.TIMEOUT_MAX:g} seconds (the longest a socket "
            f"waits), got {timeout!r}"
        )
    timeout = float(timeout)
    progress = check_bool(progress, "progress")
    force = check_bool(force, "force")
    addresses = urls(name, mirrors)
    folder = _resolve_folder(name, data_dir)
    if not force:
        held = _held_elsewhere(name, data_dir, folder)
        if held is not None:
            return held, []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError("not writable")
    except OSError as err:
        raise DownloadError(
            f"{name}: cannot create or write the data folder {folder} ({err}); give another as "
            "--data-dir (data_dir= in Python) or JCNN_DATA_DIR"
        ) from err
    for remote in source.files:
        target = folder / remote.filename
        for path in (target, _part_file(target)):  # the download's partial file too
            if path.exists() and not path.is_file():
                raise DownloadError(
                    f"{name}: {path} exists and is not a file, so {remote.filename} cannot be "
                    "written there; move it away"
                )
    fetched = []
    with _folder_lock(folder), _progress_bar(progress) as bar:
        for remote in source.files:
            target = folder / remote.filename
            if not force and target.is_file() and _mismatch(name, remote, target) is None:
                continue
            _fetch_file(name, remote, addresses[remote.filename], target, timeout, bar)
            fetched.append(remote.filename)
    return folder, fetched


def _held_elsewhere(name: str, data_dir, folder: Path) -> Path | None:
    """The folder other than ``folder`` where :func:`jcnn.data.load` reads every file of ``name``,
    each verified; ``None`` where there is none (then the files belong in ``folder``)."""
    rows = _describe(name, data_dir)
    where = rows[0][0].parent
    return where if where != folder and all(ok for _, _, ok in rows) else None


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Hold an exclusive lock on the dataset folder: one download into it at a time."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another download into {folder} to finish", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    ) as bar:
        yield bar


class _AttemptFailed(Exception):
    """One address failed; ``keep_partial`` says whether the ``.part`` file is worth resuming."""

    def __init__(self, reason: str, keep_partial: bool):
        super().__init__(reason)
        self.keep_partial = keep_partial


def _part_file(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def _fetch_file(name, remote: RemoteFile, addresses, target: Path, timeout, bar) -> None:
    part = _part_file(target)
    failures = []
    task = bar.add_task(remote.filename, total=remote.size)
    for url in addresses:
        try:
            _fetch_into(name, url, remote, part, timeout, bar, task)
        except OSError as err:  # the local file, not the server (those are _AttemptFailed)
            full = err.errno in (errno.ENOSPC, errno.EDQUOT)
            raise DownloadError(
                f"{name}: cannot write {part} ({err}); {'free some space or ' if full else ''}"
                "give another folder as --data-dir (data_dir= in Python) or JCNN_DATA_DIR"
            ) from err
        except _AttemptFailed as failure:
            failures.append((url, str(failure)))
            if not failure.keep_partial or (part.is_file() and part.stat().st_size == 0):
                part.unlink(missing_ok=True)
            continue
        os.replace(part, target)
        size = target.stat().st_size
        bar.update(task, total=size, completed=size)
        return
    raise _all_failed(name, remote, target, part, failures)


def _all_failed(name, remote: RemoteFile, target: Path, part: Path, failures) -> DownloadError:
    lines = "\n".join(f"  {url}: {reason}" for url, reason in failures)
    kept = ""
    if part.is_file():
        kept = (
            f"\n{part.stat().st_size} bytes are kept in {part}; the next attempt resumes from "
            "there."
        )
    return DownloadError(
        f"{name}: could not download {remote.filename} ({remote.size} bytes, SHA-256 "
        f"{remote.sha256}) from any address:\n{lines}{kept}\n"
        f"To place the files by hand, download them from one of these addresses (or "
        f"{SOURCES[name].homepage}) into {target.parent}, or into a folder of your choice given "
        f"as --data-dir (data_dir= in Python) or JCNN_DATA_DIR; set {MIRRORS_ENV} to use another "
        "mirror."
    )


def _size_limit(remote: RemoteFile) -> int:
    """The most bytes accepted for a file: room for a re-compressed copy, not an endless stream."""
    return 2 * remote.size + (1 << 20)


def _fetch_into(name: str, url: str, remote: RemoteFile, part: Path, timeout, bar, task) -> None:
    """Complete ``part`` from ``url`` (resuming what it holds), then verify it."""
    have = part.stat().st_size if part.is_file() else 0
    if have > _size_limit(remote):
        part.unlink()
        have = 0
    if have == remote.size:  # complete, e.g. left by a process stopped before its rename
        if _mismatch(name, remote, part) is None:
            return
        part.unlink()
        have = 0
    start, announced = _append_from(url, remote, part, have, timeout, bar, task)
    problem = _mismatch(name, remote, part)
    if problem is not None and start:
        # the bytes kept from an earlier attempt may be the wrong ones: once more from byte 0
        part.unlink()
        _, announced = _append_from(url, remote, part, 0, timeout, bar, task)
        problem = _mismatch(name, remote, part)
    if problem is None:
        return
    received = part.stat().st_size
    if not announced and received < remote.size:
        raise _AttemptFailed(
            f"truncated: the server closed the connection after {received} bytes without "
            f"announcing a length, fewer than the official {remote.size}",
            keep_partial=True,
        )
    raise _AttemptFailed(f"{problem}; deleted", keep_partial=False)


def _mismatch(name: str, remote: RemoteFile, path: Path) -> str | None:
    """None when ``path`` is the official file or a faithful copy of its content, else why not.

    The bytes are checked against the pinned SHA-256 of the official file; bytes that differ are
    accepted only if their decompressed content has the official content digests (a mirror that
    re-compressed the file), read with the loader's bounded decompression.
    """
    actual = file_sha256(path)
    if actual == remote.sha256:
        return None
    try:
        datasets._verify_file_content(name, remote.filename, path)
    except datasets.CorruptFileError as err:
        return (
            f"SHA-256 mismatch: got {actual}, expected {remote.sha256}, and the content is not "
            f"the official data either ({err})"
        )
    return None


def _append_from(
    url, remote: RemoteFile, part: Path, have: int, timeout, bar, task
) -> tuple[int, bool]:
    """Write the body of ``url`` into ``part``, from byte ``have`` where the server allows it.

    Returns:
        Where the body started in the file (``have`` or 0), and whether the server announced its
        length.
    """
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing past what we hold: the .part may be complete
            return have, True
        raise _AttemptFailed(f"HTTP {err.code} {err.reason}", keep_partial=True) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        raise _AttemptFailed(f"cannot connect ({reason})", keep_partial=True) from None
    limit = _size_limit(remote)
    with response:
        start = _start_offset(response, have)
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None and length.isdigit() else None
        if total is not None and total > limit:
            raise _AttemptFailed(
                f"the server announces {total} bytes, far more than the official {remote.size}",
                keep_partial=True,
            )
        received = start
        bar.update(task, total=total or remote.size, completed=received)
        with part.open("r+b" if start else "wb") as out:
            out.seek(start)
            out.truncate()
            while chunk := _read_some(response, limit + 1 - received, received, total, timeout):
                received += len(chunk)
                if received > limit:
                    raise _AttemptFailed(
                        f"the server sent more than {limit} bytes, far more than the official "
                        f"{remote.size}",
                        keep_partial=False,
                    )
                out.write(chunk)  # a local error (disk full) is not the server's: it propagates
                bar.update(task, completed=received)
            out.flush()
            os.fsync(out.fileno())
        if total is not None and received < total:
            raise _AttemptFailed(
                f"truncated: the server closed the connection after {received} of {total} bytes",
                keep_partial=True,
            )
    return start, total is not None


def _read_some(response, room: int, received: int, total, timeout) -> bytes:
    """The next bytes of the body (at most ``room``), empty at its end; a stall is a failure."""
    of_total = f" of {total}" if total is not None else ""
    try:
        return response.read1(min(_CHUNK, room))
    except TimeoutError:
        raise _AttemptFailed(
            f"stalled: no data for {timeout:g} s after {received}{of_total} bytes",
            keep_partial=True,
        ) from None
    except (http.client.HTTPException, OSError) as err:
        raise _AttemptFailed(
            f"connection lost after {received}{of_total} bytes ({err!r})", keep_partial=True
        ) from None


def _start_offset(response, have: int) -> int:
    """Where the response's body starts in the file: the first byte its ``Content-Range`` names
    for a 206 (``have``, or earlier: the bytes from there on are written again), else 0."""
    if response.status != 206:
        return 0
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    if match is None or int(match[1]) > have:
        raise _AttemptFailed(
            f"a partial answer for another range ({response.headers.get('Content-Range')!r}) "
            f"than asked (bytes={have}-)",
            keep_partial=True,
        )
    return int(match[1])


# ---- command line -------------------------------------------------------------------------------


def _describe(name: str, data_dir) -> list[tuple[Path, str, bool]]:
    """``(path, state, ok)`` for each file of ``name`` where :func:`jcnn.data.load` finds them."""
    candidates = datasets._candidate_dirs(name, data_dir)
    spec = datasets.DATASETS[name]
    filenames = [remote.filename for remote in SOURCES[name].files]
    folder = next((d for d in candidates if any((d / f).is_file() for f in filenames)), None)
    if folder is None and isinstance(spec, datasets._CifarDataset):
        extracted = next((d / spec.folder for d in candidates if (d / spec.folder).is_dir()), None)
        if extracted is not None:
            members = [m for split_members in spec.members.values() for m in split_members]
            return [_describe_batch_file(name, spec, extracted / m) for m in members]
    folder = folder or candidates[0]
    return [
        _describe_file(name, remote, folder / remote.filename) for remote in SOURCES[name].files
    ]


def _describe_file(name: str, remote: RemoteFile, path: Path) -> tuple[Path, str, bool]:
    if not path.is_file():
        return path, "missing", False
    if path.stat().st_size == remote.size and file_sha256(path) == remote.sha256:
        return path, "ok: the official file (SHA-256 matches)", True
    try:
        datasets._verify_file_content(name, remote.filename, path)
    except datasets.CorruptFileError as err:
        return path, f"BAD: {err}", False
    return path, "ok: content identical to the official (re-compressed or re-packed)", True


def _describe_batch_file(name: str, spec, path: Path) -> tuple[Path, str, bool]:
    if not path.is_file():
        return path, "missing", False
    try:
        raw = datasets._read_batch_file(path, spec)
        datasets._verify_content(name, path.name, raw, str(path))
    except datasets.CorruptFileError as err:
        return path, f"BAD: {err}", False
    return path, "ok: content identical to the official (extracted)", True


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``jcnn-data``."""
    p = OneLineParser(
        prog="jcnn-data",
        description="Download and verify the original files of the datasets jcnn.data.load reads.",
    )
    commands = p.add_subparsers(dest="command", required=True)
    for command, summary in (
        ("download", "download NAME's files into DATA_DIR/NAME/ (verified, resumable)"),
        ("verify", "check NAME's files in DATA_DIR/NAME/ against the official digests"),
        ("list", "the datasets, their files and addresses, and what DATA_DIR holds"),
    ):
        sub = commands.add_parser(command, help=summary, description=summary)
        if command != "list":
            sub.add_argument("name", choices=sorted(SOURCES), metavar="NAME")
        sub.add_argument(
            "--data-dir",
            default=None,
            help="data directory (default: $JCNN_DATA_DIR, else ~/.cache/jcnn/data)",
        )
        if command == "download":
            sub.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
            sub.add_argument("--force", action="store_true", help="download present files too")
            sub.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    """Entry point of ``jcnn-data``; returns the exit status."""
    with quiet_when_the_reader_leaves():
        return _main(argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("list", "download"):
        try:
            mirrors_for(getattr(args, "name", next(iter(SOURCES))))  # a bad $JCNN_DATA_MIRRORS
        except ValueError as err:
            print(f"jcnn-data: {err}", file=sys.stderr)
            return 2
    given = None if args.data_dir is None else Path(args.data_dir).expanduser()
    # a file there: list would show every file missing beneath it, download fail creating it
    if given is not None and given.exists() and not given.is_dir():
        print(f"jcnn-data: --data-dir {args.data_dir}: no such folder", file=sys.stderr)
        return 2
    if args.command == "list":
        root = datasets.default_data_dir(args.data_dir)
        print(f"data directory: {root}")
        for name in SOURCES:
            print(f"{name}:")
            for path, state, _ in _describe(name, args.data_dir):
                print(f"  {path}: {state}")
            for filename, addresses in urls(name).items():
                print(f"  {filename} from: {' or '.join(addresses)}")
        return 0
    if args.command == "download":
        if not (math.isfinite(args.timeout) and args.timeout > 0):
            print(
                f"jcnn-data: --timeout: expected a finite number of seconds > 0, got "
                f"{args.timeout}",
                file=sys.stderr,
            )
            return 2
        try:
            folder, fetched = _download(
                args.name,
                args.data_dir,
                None,
                args.timeout,
                not args.no_progress and sys.stderr.isatty(),
                args.force,
            )
        except DownloadError as err:
            print(f"jcnn-data: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("jcnn-data: interrupted; run the same command to resume", file=sys.stderr)
            return 130
        if folder != _resolve_folder(args.name, args.data_dir):
            print(
                f"{args.name}: already in {folder}, where jcnn.data.load reads it; nothing "
                "downloaded (--force to download anyway)"
            )
        elif not fetched:
            print(
                f"{args.name}: every file already in {folder}, verified; nothing downloaded "
                "(--force to download anyway)"
            )
        else:
            print(f"{args.name}: downloaded {', '.join(fetched)} into {folder}")
    if given is not None and not given.is_dir():
        print(f"jcnn-data: --data-dir {args.data_dir}: no such folder", file=sys.stderr)
        return 2
    rows = _describe(args.name, args.data_dir)
    for path, state, _ in rows:
        print(f"{path}: {state}")
    return 0 if all(ok for _, _, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
