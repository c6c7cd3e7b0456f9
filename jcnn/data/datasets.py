"""Image classification datasets read from their original distribution files.

``load(name, split)`` reads MNIST, Fashion-MNIST and CIFAR-10 from the files their publishers
distribute (the gzip IDX files; the CIFAR-10 binary tarball or its extracted folder) and returns
``uint8`` images ``(N, H, W, C)`` and ``int32`` labels in the official train/test split. Any other
name goes through tensorflow-datasets (the optional ``tfds`` extra), see :func:`load_tfds`.

The data directory is, in order: the ``data_dir`` argument, the ``JCNN_DATA_DIR`` environment
variable, then the per-user cache ``$XDG_CACHE_HOME/jcnn/data`` (``~/.cache/jcnn/data``).
A dataset's files are looked for in ``<data_dir>/<name>/`` and then in ``<data_dir>/`` itself;
``load(..., download=True)`` fetches missing ones first (:mod:`jcnn.data.fetch`).

Reading is all-or-nothing: every file is decompressed in memory and checked (gzip integrity, IDX
magic number and dimensions, byte count, record count, label range) before any array is returned,
and a failure raises :class:`CorruptFileError` naming the file and what was wrong. Decompression is
bounded by the dataset's known sizes: a file inflating past them is refused there, never held whole
in memory. Archives are streamed member by member in memory; nothing is ever written to disk, and
an archive holding a member with an absolute path or ``..`` is refused.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import re
import shlex
import sys
import tarfile
import urllib.error
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

__all__ = [
    "CorruptFileError",
    "DATASETS",
    "default_data_dir",
    "load",
    "load_tfds",
    "verify",
    "verify_sha256sums",
]


class CorruptFileError(ValueError):
    """A dataset file exists but is truncated, corrupt or not what its name says."""


@dataclass(frozen=True)
class _IdxDataset:
    """An MNIST-style dataset: four gzip IDX files."""

    shape: tuple[int, int, int]
    num_classes: int
    counts: dict[str, int]
    prefixes = {"train": "train", "test": "t10k"}

    def files(self, split: str) -> tuple[str, str]:
        prefix = self.prefixes[split]
        return (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")

    def file_size(self, split: str, filename: str) -> int:
        """The decompressed size of one IDX file: its header and ``count`` items."""
        if "images" in filename:
            return 16 + self.counts[split] * int(np.prod(self.shape[:2]))
        return 8 + self.counts[split]


@dataclass(frozen=True)
class _CifarDataset:
    """A CIFAR-10-style binary dataset: fixed-size records of 1 label byte and 3 colour planes."""

    archive: str
    folder: str
    members: dict[str, tuple[str, ...]]
    shape: tuple[int, int, int]
    num_classes: int
    records_per_file: int

    @property
    def member_size(self) -> int:
        """Bytes in one batch file: ``records_per_file`` records of a label byte and the pixels."""
        return self.records_per_file * (1 + int(np.prod(self.shape)))

    @property
    def archive_limit(self) -> int:
        """A bound on the decompressed archive: every batch file plus room for headers and text."""
        batches = sum(len(members) for members in self.members.values())
        return batches * self.member_size + (16 << 20)


DATASETS = {
    "mnist": _IdxDataset((28, 28, 1), 10, {"train": 60000, "test": 10000}),
    "fashion_mnist": _IdxDataset((28, 28, 1), 10, {"train": 60000, "test": 10000}),
    "cifar10": _CifarDataset(
        archive="cifar-10-binary.tar.gz",
        folder="cifar-10-batches-bin",
        members={
            "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
            "test": ("test_batch.bin",),
        },
        shape=(32, 32, 3),
        num_classes=10,
        records_per_file=10000,
    ),
}
"""The datasets read from their original files, by name."""

# SHA-256 of the decompressed content of each official file. Content hashes (not hashes of the
# .gz/.tar.gz) so that a re-compressed or re-packed copy of the same data verifies too.
CONTENT_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": (
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
        ),
        "train-labels-idx1-ubyte.gz": (
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
        ),
        "t10k-images-idx3-ubyte.gz": (
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
        ),
        "t10k-labels-idx1-ubyte.gz": (
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
        ),
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": (
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
        ),
        "train-labels-idx1-ubyte.gz": (
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
        ),
        "t10k-images-idx3-ubyte.gz": (
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
        ),
        "t10k-labels-idx1-ubyte.gz": (
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
        ),
    },
    "cifar10": {
        "data_batch_1.bin": ("cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5"),
        "data_batch_2.bin": ("a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed"),
        "data_batch_3.bin": ("bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67"),
        "data_batch_4.bin": ("014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48"),
        "data_batch_5.bin": ("755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add"),
        "test_batch.bin": ("8e2eb146ae340b09e24670f29cabc6326dba54da8789dab6768acf480273f65b"),
    },
}

_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned-byte data with 3 or 1 dimensions


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir``, else ``$JCNN_DATA_DIR``, else the per-user cache.

    The per-user cache is ``$XDG_CACHE_HOME/jcnn/data``, or ``~/.cache/jcnn/data`` where
    ``XDG_CACHE_HOME`` is unset.

    >>> str(default_data_dir("/tmp/somewhere"))
    '/tmp/somewhere'
    """
    if data_dir is not None:
        if not isinstance(data_dir, (str, os.PathLike)):
            raise TypeError(
                f"data_dir: expected a folder (str or os.PathLike) or None, got "
                f"{type(data_dir).__name__}"
            )
        return Path(data_dir).expanduser()
    if os.environ.get("JCNN_DATA_DIR"):
        return Path(os.environ["JCNN_DATA_DIR"]).expanduser()
    return _user_cache()


def _user_cache() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "jcnn" / "data"


def _candidate_dirs(name: str, data_dir) -> list[Path]:
    root = default_data_dir(data_dir)
    return [root / name, root]


def _missing(name: str, split: str, expected: list[str], data_dir) -> FileNotFoundError:
    from jcnn.data.fetch import SOURCES

    searched = _candidate_dirs(name, data_dir)
    places = ", ".join(str(p) for p in searched)
    addresses = " or ".join(SOURCES[name].mirrors)
    command = f"jcnn-data download {name}"
    if data_dir is not None:
        command += f" --data-dir {shlex.quote(str(searched[1]))}"
    return FileNotFoundError(
        f"{name} ({split}): expected {' and '.join(expected)} in one of: {places}. Download them "
        f"with `{command}` or load(..., download=True) (from {addresses}), or "
        f"place the original files in {_user_cache() / name} (the per-user cache), or in a "
        f"folder given as data_dir= (--data-dir on the command line) or JCNN_DATA_DIR."
    )


def _gunzip(path: Path, limit: int) -> bytes:
    """The decompressed content of ``path``, reading at most ``limit + 1`` bytes of it.

    The bound keeps a file that inflates far beyond the dataset's size (a gzip bomb, or the wrong
    file) from filling memory: the caller sees ``limit + 1`` bytes and reports the excess.
    """
    try:
        with gzip.open(path, "rb") as f:
            return f.read(limit + 1)
    except (OSError, EOFError, zlib.error) as err:
        raise CorruptFileError(f"{path}: not a valid gzip file ({err})") from err


def _parse_idx(raw: bytes, path: Path, ndim: int, expected_count: int, item_shape) -> np.ndarray:
    """An IDX unsigned-byte array after checking its magic number, dimensions and byte count."""
    header_size = 4 * (1 + ndim)
    if len(raw) < header_size:
        raise CorruptFileError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    magic, *dims = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    if magic != _IDX_MAGIC[ndim]:
        raise CorruptFileError(
            f"{path}: wrong IDX magic number 0x{int(magic):08x}, expected 0x{_IDX_MAGIC[ndim]:08x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    dims = tuple(int(d) for d in dims)
    if dims[0] != expected_count or dims[1:] != tuple(item_shape):
        raise CorruptFileError(
            f"{path}: header says shape {dims}, expected {(expected_count, *item_shape)}"
        )
    expected_bytes = header_size + int(np.prod(dims))
    if len(raw) > expected_bytes:
        raise CorruptFileError(
            f"{path}: more than {expected_bytes} bytes after decompression, expected "
            f"{expected_bytes} for shape {dims} (file padded or not this dataset); decompression "
            "stopped there"
        )
    if len(raw) != expected_bytes:
        raise CorruptFileError(
            f"{path}: {len(raw)} bytes after decompression, expected {expected_bytes} "
            f"for shape {dims} (file truncated or padded)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)


def _check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
    if labels.size and int(labels.max()) >= num_classes:
        raise CorruptFileError(
            f"{source}: label {int(labels.max())} out of range, expected 0..{num_classes - 1}"
        )


def _verify_content(name: str, filename: str, raw: bytes, source: str) -> None:
    expected = CONTENT_SHA256[name][filename]
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected:
        raise CorruptFileError(
            f"{source}: SHA-256 of the content is {actual}, expected {expected} (official {name})"
        )


def _load_idx(name: str, spec: _IdxDataset, split: str, data_dir, verify: bool):
    image_file, label_file = spec.files(split)
    searched = _candidate_dirs(name, data_dir)
    folder = next(
        (d for d in searched if (d / image_file).is_file() and (d / label_file).is_file()), None
    )
    if folder is None:
        raise _missing(name, split, [image_file, label_file], data_dir)
    count = spec.counts[split]
    raw_images = _gunzip(folder / image_file, spec.file_size(split, image_file))
    raw_labels = _gunzip(folder / label_file, spec.file_size(split, label_file))
    if verify:
        _verify_content(name, image_file, raw_images, str(folder / image_file))
        _verify_content(name, label_file, raw_labels, str(folder / label_file))
    images = _parse_idx(raw_images, folder / image_file, 3, count, spec.shape[:2])
    labels = _parse_idx(raw_labels, folder / label_file, 1, count, ())
    _check_labels(labels, spec.num_classes, str(folder / label_file))
    # a copy: np.frombuffer's view of the bytes is read-only (images[i] = ... failed)
    return images.reshape(count, *spec.shape).copy(), labels.astype(np.int32)


def _verify_file_content(name: str, filename: str, path: Path) -> None:
    """Check one file of ``name`` against the official *content*; raise CorruptFileError if not.

    The content of a gzip IDX file, or of every batch file of a CIFAR archive, so that a faithful
    re-compressed or re-packed copy passes.
    """
    spec = DATASETS[name]
    if isinstance(spec, _IdxDataset):
        split = next(s for s in spec.prefixes if filename.startswith(spec.prefixes[s] + "-"))
        limit = spec.file_size(split, filename)
        raw = _gunzip(path, limit)
        if len(raw) > limit:
            raise CorruptFileError(f"{path}: more than {limit} bytes after decompression")
        _verify_content(name, filename, raw, str(path))
        return
    members = [m for split_members in spec.members.values() for m in split_members]
    contents = _read_tar_members(path, set(members), spec)
    for member in members:
        if member not in contents:
            raise CorruptFileError(f"{path}: member {member} missing from the archive")
        member_path, raw = contents[member]
        _verify_content(name, member, raw, f"{path}:{member_path}")


def _safe_member_name(member: tarfile.TarInfo, archive: Path) -> PurePosixPath:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise CorruptFileError(
            f"{archive}: refusing member {member.name!r} (absolute path or '..' component)"
        )
    if member.issym() or member.islnk():
        raise CorruptFileError(f"{archive}: refusing link member {member.name!r}")
    return path


class _BoundedReader:
    """A file object raising :class:`CorruptFileError` once more than ``limit`` bytes are read."""

    def __init__(self, fileobj, limit: int, source: Path):
        self._fileobj, self._limit, self._source, self._count = fileobj, limit, source, 0

    def read(self, size: int = -1) -> bytes:
        room = self._limit - self._count + 1
        chunk = self._fileobj.read(room if size is None or size < 0 else min(size, room))
        self._count += len(chunk)
        if self._count > self._limit:
            raise CorruptFileError(
                f"{self._source}: more than {self._limit} bytes after decompression, more than "
                "this dataset's archive holds; decompression stopped there"
            )
        return chunk


def _wrong_size(source: str, size: int, spec: _CifarDataset) -> CorruptFileError:
    record = 1 + int(np.prod(spec.shape))
    return CorruptFileError(
        f"{source}: {size} bytes, expected {spec.member_size} "
        f"({spec.records_per_file} records of {record} bytes); wrong record count or truncated"
    )


def _read_tar_members(
    archive: Path, wanted: set[str], spec: _CifarDataset
) -> dict[str, tuple[str, bytes]]:
    """The batch files named ``wanted`` (base names) from a tar archive, read in memory, as
    ``{base name: (path in the archive, content)}``.

    The archive is streamed once to its end (so that the gzip checksum is checked) with the
    decompressed size bounded by ``spec.archive_limit``; a wanted member whose header declares any
    size other than a batch file's is refused before it is read.
    """
    found = {}
    try:
        with contextlib.ExitStack() as stack:
            raw = stack.enter_context(archive.open("rb"))
            if raw.read(2) == b"\x1f\x8b":  # gzip magic, whatever the file's name
                raw.seek(0)
                raw = stack.enter_context(gzip.open(raw, "rb"))
            else:
                raw.seek(0)
            stream = _BoundedReader(raw, spec.archive_limit, archive)
            tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 20))
            for member in tar:
                path = _safe_member_name(member, archive)
                if path.name in wanted and not member.isfile():
                    kind = "a directory" if member.isdir() else "not a regular file"
                    raise CorruptFileError(
                        f"{archive}:{member.name}: {kind}, where the batch file {path.name} "
                        "was expected"
                    )
                if member.isfile() and path.name in wanted:
                    source = f"{archive}:{member.name}"
                    if path.name in found:
                        raise CorruptFileError(f"{source}: a second member named {path.name}")
                    if member.size != spec.member_size:
                        raise _wrong_size(source, member.size, spec)
                    found[path.name] = (member.name, tar.extractfile(member).read())
                tar.members = []  # stream mode keeps every header otherwise
        return found
    except (OSError, EOFError, zlib.error, tarfile.TarError) as err:
        raise CorruptFileError(f"{archive}: not a readable tar.gz archive ({err})") from err


def _read_batch_file(path: Path, spec: _CifarDataset) -> bytes:
    size = path.stat().st_size
    if size != spec.member_size:
        raise _wrong_size(str(path), size, spec)
    return path.read_bytes()


def _parse_cifar(raw: bytes, source: str, spec: _CifarDataset):
    height, width, channels = spec.shape
    record = 1 + height * width * channels
    if len(raw) != spec.member_size:
        raise _wrong_size(source, len(raw), spec)
    records = np.frombuffer(raw, dtype=np.uint8).reshape(spec.records_per_file, record)
    labels = records[:, 0].astype(np.int32)
    _check_labels(labels, spec.num_classes, source)
    planes = records[:, 1:].reshape(spec.records_per_file, channels, height, width)
    return planes.transpose(0, 2, 3, 1), labels


def _load_cifar(name: str, spec: _CifarDataset, split: str, data_dir, verify: bool):
    members = spec.members[split]
    searched = _candidate_dirs(name, data_dir)
    contents = None
    for folder in searched:
        extracted = folder / spec.folder
        if all((extracted / m).is_file() for m in members):
            contents = {m: _read_batch_file(extracted / m, spec) for m in members}
            sources = {m: str(extracted / m) for m in members}
            break
        if (folder / spec.archive).is_file():
            archive = folder / spec.archive
            found = _read_tar_members(archive, set(members), spec)
            absent = [m for m in members if m not in found]
            if absent:
                raise CorruptFileError(f"{archive}: members {absent} missing from the archive")
            contents = {m: raw for m, (_, raw) in found.items()}
            sources = {m: f"{archive}:{member_path}" for m, (member_path, _) in found.items()}
            break
    if contents is None:
        expected = [spec.archive, f"{spec.folder}/{{{','.join(members)}}}"]
        raise _missing(name, split, expected, data_dir)
    # one C-contiguous array filled batch by batch: np.concatenate of the transposed batches kept
    # their (N, C, H, W) memory order, strided as (N, H, W, C)
    count = spec.records_per_file
    images = np.empty((len(members) * count, *spec.shape), np.uint8)
    labels = []
    for i, member in enumerate(members):
        if verify:
            _verify_content(name, member, contents[member], sources[member])
        batch_images, batch_labels = _parse_cifar(contents[member], sources[member], spec)
        images[i * count : (i + 1) * count] = batch_images
        labels.append(batch_labels)
    return images, np.concatenate(labels)


def load(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    verify: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split of a dataset, from its original files.

    Args:
      name: ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"`` (read from the original files); any
        other name is loaded through tensorflow-datasets with :func:`load_tfds` (another
        spelling of these three, such as ``"MNIST"``, is refused).
      split: ``"train"`` or ``"test"`` (the official split).
      data_dir: folder holding ``<name>/`` with the original files (or the files themselves);
        defaults to ``$JCNN_DATA_DIR``, then ``~/.cache/jcnn/data``.
      download: where the files are not found, download them into ``<data_dir>/<name>/`` first
        with :func:`jcnn.data.download` (checked against the official SHA-256). Names read
        through tensorflow-datasets are downloaded by tfds itself.
      verify: also check the SHA-256 of every file's decompressed content against the official
        data (robust to re-compression and re-packing, which change the archive's own checksum);
        only for the names read from original files.

    Returns:
      ``(images, labels)``: ``uint8`` array ``(N, H, W, C)`` and ``int32`` array ``(N,)``, in the
      order of the original files.

    Raises:
      FileNotFoundError: naming the files expected, every folder searched and where to get them.
      CorruptFileError: naming the file and what is wrong with it (nothing is returned half-read).
      DownloadError: with ``download=True``, when no address delivered a verified file.
    """
    if not isinstance(download, bool):
        raise TypeError(f"download: expected True or False, got {download!r}")
    if not isinstance(verify, bool):
        raise TypeError(f"verify: expected True or False, got {verify!r}")
    if not isinstance(name, str):
        raise TypeError(f"name: expected a dataset name (str), got {type(name).__name__}")
    if name not in DATASETS:
        # tensorflow-datasets takes "MNIST" for its "mnist": a download, not the original files
        spelled = {re.sub(r"[-_]", "", known): known for known in DATASETS}
        known = spelled.get(re.sub(r"[-_]", "", name.lower()))
        if known is not None:
            raise ValueError(
                f"name: expected {known!r} (read from its original files; names are lower case), "
                f"got {name!r}"
            )
        if verify:
            raise ValueError(
                f"verify: only for the datasets read from their original files "
                f"({', '.join(DATASETS)}), got verify=True for {name!r}, which is read through "
                "tensorflow-datasets (it checks the checksums of its own downloads)"
            )
        return load_tfds(name, split, data_dir=data_dir)
    if not isinstance(split, str):  # as load_tfds: a list of splits is no split
        raise TypeError(
            f"split: expected 'train' or 'test' for {name}, got {type(split).__name__} {split!r}"
        )
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test' for {name}, got {split!r}")
    spec = DATASETS[name]
    reader = _load_idx if isinstance(spec, _IdxDataset) else _load_cifar
    try:
        return reader(name, spec, split, data_dir, verify)
    except FileNotFoundError:
        if not download:
            raise
    from jcnn.data.fetch import download as fetch

    fetch(name, data_dir=data_dir, progress=sys.stderr.isatty())
    return reader(name, spec, split, data_dir, verify)


def verify(name: str, *, data_dir: str | os.PathLike | None = None) -> None:
    """Check every file of ``name`` against the official content; raise on the first mismatch.

    Loads both splits with ``verify=True``: a missing file raises ``FileNotFoundError``, a corrupt
    or different one :class:`CorruptFileError`.
    """
    if name not in DATASETS:
        raise ValueError(f"name: expected one of {sorted(DATASETS)}, got {name!r}")
    for split in ("train", "test"):
        load(name, split, data_dir=data_dir, verify=True)


_SUMS_LINE = re.compile(r"([0-9A-Fa-f]{64}) [ *](.+)")


def verify_sha256sums(sums_file: str | os.PathLike) -> dict[str, bool]:
    """Check the files listed in a ``sha256sum``-format file (paths relative to its folder).

    Each non-blank line is ``<64 hex digits>  <path>`` (or ``<digits> *<path>``, binary mode).

    Returns:
      ``{relative path: matches}`` for every listed file.

    Raises:
      CorruptFileError: a line that is not in that format, naming the file and the line number
        (checked for every line before any file is hashed).
      FileNotFoundError: a listed file is absent.
    """
    sums_file = Path(sums_file)
    try:
        text = sums_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorruptFileError(f"{sums_file}: not a text checksum file ({err})") from err
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _SUMS_LINE.fullmatch(line.rstrip("\r"))
        if match is None:
            raise CorruptFileError(
                f"{sums_file}, line {number}: expected '<64 hex digits>  <file>' (sha256sum "
                f"format), got {line[:200]!r}"
            )
        entries.append((match[1].lower(), match[2]))
    return {
        relative: _sha256_file(sums_file.parent / relative) == expected
        for expected, relative in entries
    }


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _network_error(error: BaseException | None) -> BaseException | None:
    """The failed connection ``error`` is or wraps, else ``None``: tfds downloads through
    ``requests``, whose errors are no ``ConnectionError`` of Python's own."""
    while error is not None:
        modules = {cls.__module__.split(".")[0] for cls in type(error).__mro__}
        network = (ConnectionError, TimeoutError, urllib.error.URLError)
        if isinstance(error, network) or modules & {"requests", "urllib3"}:
            return error
        error = error.__cause__ or error.__context__
    return None


def load_tfds(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    download: bool = True,
    download_options: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of a split through tensorflow-datasets (optional extra ``jcnn[tfds]``).

    Prepares the dataset on first use (needs TensorFlow, ``tensorflow-cpu``) and reads the whole
    split into memory. With ``manual_dir`` the original files are taken from that folder instead of
    the network (e.g. the Fashion-MNIST files of ``load``'s data directory).

    tensorflow-datasets stores the examples in its own (shuffled) order, so the arrays hold the same
    examples as :func:`load` in a different order.

    Args:
      name: a tensorflow-datasets name (``"cifar100"``, ``"svhn_cropped"``, ``"fashion_mnist"``...).
      split: a tfds split string (``"train"``, ``"test"``, ``"train[:10%]"``...).
      data_dir: where tfds keeps prepared datasets (tfds's default where None).
      manual_dir: a folder holding the original downloads, used instead of the network.
      download: prepare the dataset if it is not prepared yet.
      download_options: more ``tfds.download.DownloadConfig`` fields, e.g.
        ``{"max_examples_per_split": 1000}`` to prepare a quick subset.

    Returns:
      ``(images, labels)``: ``uint8`` ``(N, H, W, C)`` and ``int32`` ``(N,)``.

    Raises:
      FileNotFoundError: with ``download=False``, the dataset is not prepared in ``data_dir``;
        or ``manual_dir`` is not a folder.
      DownloadError: preparing it needed the network, and the download failed.
      CorruptFileError: a file (e.g. in ``manual_dir``) is not the one tfds expects.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a dataset name (str), got {type(name).__name__}")
    for arg, value in (("data_dir", data_dir), ("manual_dir", manual_dir)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise TypeError(
                f"{arg}: expected a folder (str or os.PathLike) or None, got {type(value).__name__}"
            )
    if not isinstance(download, bool):
        raise TypeError(f"download: expected True or False, got {download!r}")
    if download_options is not None and not isinstance(download_options, Mapping):
        raise TypeError(
            f"download_options: expected a dict of tfds.download.DownloadConfig fields or None, "
            f"got {type(download_options).__name__}"
        )
    if manual_dir is not None and not Path(manual_dir).expanduser().is_dir():
        # tfds ignores a missing manual_dir and goes to the network instead
        raise FileNotFoundError(
            f"manual_dir: expected a folder holding {name}'s original downloads, got "
            f"{os.fspath(manual_dir)!r}, which is not a folder"
        )
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            f"dataset {name!r} is not read from original files by jcnn; loading it through "
            "tensorflow-datasets needs the optional extra: pip install 'jcnn[tfds]'"
        ) from err
    try:  # tfds's own message is a 20-line grammar of names
        tfds.core.naming.parse_builder_name_kwargs(name)
    except ValueError:
        raise ValueError(
            f"name: expected a tensorflow-datasets name such as 'cifar100' or "
            f"'dataset/config:1.0.0', got {name!r}, which is not one"
        ) from None
    # a list of splits would make tfds return a list of datasets, not one (images, labels) pair
    if not isinstance(split, (str, tfds.core.ReadInstruction)):
        raise TypeError(
            f"split: expected one tfds split such as 'train' or 'test[:10%]' (str or "
            f"tfds.core.ReadInstruction), got {type(split).__name__}"
        )
    try:
        download_config = tfds.download.DownloadConfig(
            manual_dir=None if manual_dir is None else os.fspath(Path(manual_dir).expanduser()),
            **(download_options or {}),
        )
    except TypeError as err:
        raise TypeError(
            f"download_options: expected tfds.download.DownloadConfig fields, got "
            f"{list(download_options)} ({err})"
        ) from None
    tfds_dir = None if data_dir is None else os.fspath(Path(data_dir).expanduser())
    try:
        if not download:
            builder = tfds.builder(name, data_dir=tfds_dir)
            if not builder.is_prepared():
                raise FileNotFoundError(
                    f"{name} ({split}): not prepared in {builder.data_dir} (tensorflow-datasets' "
                    f"data directory); pass download=True to prepare it (from manual_dir= where "
                    "given, else from the network), or data_dir= where it is prepared"
                )
        data = tfds.load(
            name,
            split=split,
            data_dir=tfds_dir,
            batch_size=-1,
            download=download,
            download_and_prepare_kwargs={"download_config": download_config},
            as_supervised=True,
        )
    except tfds.core.DatasetNotFoundError as err:
        # tfds's own message lists every dataset it knows (hundreds of lines)
        guess = re.search(r"Did you mean: \S+ -> (\S+) \?", str(err))
        hint = f" (did you mean {guess[1]!r}?)" if guess else ""
        raise ValueError(
            f"name: expected a tensorflow-datasets dataset name, got {name!r}, which "
            f"tensorflow-datasets does not know{hint}; tfds.list_builders() lists them"
        ) from None
    except Exception as err:
        network = _network_error(err)
        if network is not None:  # requests' or urllib's many-line traceback, no dataset named
            from jcnn.data.fetch import DownloadError

            reason = " ".join(str(network).split())[:300]
            raise DownloadError(
                f"{name} ({split}): tensorflow-datasets could not download it "
                f"({type(network).__name__}: {reason}); check the network, or prepare it where it "
                "can be reached and pass data_dir= (--data-dir) or manual_dir= (--manual-dir)"
            ) from None
        # e.g. a manual_dir holding other files: tfds's multi-line NonMatchingChecksumError
        if type(err).__name__ != "NonMatchingChecksumError":
            raise
        lines = [line.strip().rstrip(":") for line in str(err).splitlines() if line.strip()]
        details = "; ".join(line for line in lines if not line.startswith("To debug"))
        raise CorruptFileError(
            f"{name} ({split}): a file is not the one tensorflow-datasets expects: {details}"
            + (f" (check manual_dir {os.fspath(manual_dir)!r})" if manual_dir is not None else "")
        ) from None
    images, labels = tfds.as_numpy(data)
    return np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int32)
