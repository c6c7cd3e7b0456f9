"""Tests of jcnn.data.datasets on the real files and on deliberately corrupted copies."""

import gzip
import io
import os
import re
import shutil
import struct
import tarfile
import tracemalloc
import zlib

import numpy as np
import pytest

from jcnn import data
from jcnn.data.datasets import CorruptFileError

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.parametrize(
    ("name", "split", "shape"),
    [
        ("mnist", "train", (60000, 28, 28, 1)),
        ("mnist", "test", (10000, 28, 28, 1)),
        ("fashion_mnist", "test", (10000, 28, 28, 1)),
        ("cifar10", "train", (50000, 32, 32, 3)),
        ("cifar10", "test", (10000, 32, 32, 3)),
    ],
)
def test_shapes_dtypes_and_labels(loaded, name, split, shape):
    images, labels = loaded(name, split)
    assert images.shape == shape and images.dtype == np.uint8
    assert labels.shape == shape[:1] and labels.dtype == np.int32
    counts = np.bincount(labels, minlength=10)
    assert counts.size == 10 and counts.sum() == shape[0]
    assert 0 < images.mean() < 255 and images.max() == 255 and images.min() == 0


def test_official_class_counts(loaded):
    assert np.bincount(loaded("mnist", "test")[1]).tolist() == MNIST_TEST_COUNTS
    assert np.bincount(loaded("cifar10", "test")[1]).tolist() == [1000] * 10
    assert np.bincount(loaded("cifar10", "train")[1]).tolist() == [5000] * 10
    assert np.bincount(loaded("fashion_mnist", "test")[1]).tolist() == [1000] * 10


def test_idx_against_independent_parse(data_dir, loaded):
    """Pixels and labels match a struct-based reading of the raw IDX bytes."""
    images, labels = loaded("mnist", "test")
    raw = gzip.decompress((data_dir / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes())
    magic, count, rows, cols = struct.unpack(">IIII", raw[:16])
    assert (magic, count, rows, cols) == (2051, 10000, 28, 28)
    for index in (0, 1234, 9999):
        start = 16 + index * 784
        expected = np.array(list(raw[start : start + 784]), np.uint8).reshape(28, 28)
        np.testing.assert_array_equal(images[index, :, :, 0], expected)
    raw_labels = gzip.decompress((data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert labels[:5].tolist() == list(raw_labels[8:13]) == [7, 2, 1, 0, 4]


def _cifar_record_bytes(image, label):
    return bytes([label]) + image.transpose(2, 0, 1).tobytes()


def test_cifar_extracted_folder_equals_tarball(tmp_path, loaded):
    """The extracted-folder route reads the same arrays; records are label + R, G, B planes."""
    images, labels = loaded("cifar10", "test")
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    (folder / "test_batch.bin").write_bytes(
        b"".join(_cifar_record_bytes(images[i], int(labels[i])) for i in range(10000))
    )
    again_images, again_labels = data.load("cifar10", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(again_images, images)
    np.testing.assert_array_equal(again_labels, labels)
    # the first CIFAR-10 test image is a cat (3); the first record's label byte agrees
    assert labels[0] == 3 and (folder / "test_batch.bin").read_bytes()[0] == 3


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_loaded_arrays_are_writable_and_c_contiguous(name, loaded):
    # MNIST's images were np.frombuffer's read-only view of the bytes (images[0] = 0 failed) and
    # CIFAR-10's kept the (N, C, H, W) memory order of the files behind (N, H, W, C) strides
    images, labels = loaded(name, "test")
    for array in (images, labels):
        assert array.flags.writeable and array.flags.c_contiguous


def test_checksums(data_dir):
    results = data.verify_sha256sums(data_dir / "SHA256SUMS")
    assert len(results) == 9 and all(results.values()), results
    data.verify("mnist", data_dir=data_dir)
    data.load("cifar10", "test", data_dir=data_dir, verify=True)


def test_data_dir_resolution(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("JCNN_DATA_DIR", str(data_dir))
    assert data.default_data_dir() == data_dir
    assert data.load("fashion_mnist", "test")[0].shape == (10000, 28, 28, 1)
    monkeypatch.delenv("JCNN_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.default_data_dir() == tmp_path / "jcnn" / "data"
    # the dataset folder itself is accepted as data_dir too
    assert data.load("mnist", "test", data_dir=data_dir / "mnist")[1].shape == (10000,)


# ---- corrupted copies -------------------------------------------------------------------------


@pytest.fixture
def mnist_copy(tmp_path, data_dir):
    """A writable copy of the MNIST test files; returns its data_dir."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(data_dir / "mnist" / name, folder / name)
    return tmp_path


def _rewrite(path, transform):
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(transform(raw), compresslevel=1))


def test_missing_file_names_files_and_places(mnist_copy):
    (mnist_copy / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as info:
        data.load("mnist", "test", data_dir=mnist_copy)
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte.gz" in message and "t10k-images-idx3-ubyte.gz" in message
    assert str(mnist_copy / "mnist") in message
    with pytest.raises(FileNotFoundError, match="cifar-10-binary.tar.gz"):
        data.load("cifar10", "test", data_dir=mnist_copy)


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "not a valid gzip"),
        (lambda p: p.write_bytes(b"this is not gzip data"), "not a valid gzip"),
        (lambda p: _rewrite(p, lambda r: b"\x00\x00\x08\x01" + r[4:]), "wrong IDX magic"),
        (lambda p: _rewrite(p, lambda r: r[:-784]), "bytes after decompression"),
        (lambda p: _rewrite(p, lambda r: r + b"\x00"), "bytes after decompression"),
        (lambda p: _rewrite(p, lambda r: r[:4] + struct.pack(">I", 9999) + r[8:]), "header says"),
        (lambda p: _rewrite(p, lambda r: r[:10]), "too short"),
    ],
    ids=["truncated_gzip", "not_gzip", "magic", "short", "long", "count", "header"],
)
def test_corrupt_images_reported_with_file_name(mnist_copy, corrupt, match):
    path = mnist_copy / "mnist" / "t10k-images-idx3-ubyte.gz"
    corrupt(path)
    with pytest.raises(CorruptFileError, match=match) as info:
        data.load("mnist", "test", data_dir=mnist_copy)
    assert str(path) in str(info.value)


def test_corrupt_labels_reported(mnist_copy):
    path = mnist_copy / "mnist" / "t10k-labels-idx1-ubyte.gz"
    _rewrite(path, lambda r: r[:8] + b"\x0c" + r[9:])
    with pytest.raises(CorruptFileError, match="label 12 out of range") as info:
        data.load("mnist", "test", data_dir=mnist_copy)
    assert str(path) in str(info.value)
    with pytest.raises(CorruptFileError, match="SHA-256"):
        data.load("mnist", "test", data_dir=mnist_copy, verify=True)


def test_verify_detects_changed_pixel(mnist_copy):
    path = mnist_copy / "mnist" / "t10k-images-idx3-ubyte.gz"
    _rewrite(path, lambda r: r[:500] + bytes([r[500] ^ 1]) + r[501:])
    assert data.load("mnist", "test", data_dir=mnist_copy)[0].shape == (10000, 28, 28, 1)
    with pytest.raises(CorruptFileError, match="SHA-256") as info:
        data.load("mnist", "test", data_dir=mnist_copy, verify=True)
    assert str(path) in str(info.value)


def _write_tar(path, members):
    """A .tar.gz holding ``members``: (name, bytes) pairs, names stored verbatim."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


@pytest.fixture
def small_cifar_record():
    rng = np.random.default_rng(0)
    return _cifar_record_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), 7)


def test_cifar_wrong_record_count(tmp_path, small_cifar_record):
    (tmp_path / "cifar10").mkdir()
    archive = tmp_path / "cifar10" / "cifar-10-binary.tar.gz"
    _write_tar(archive, [("cifar-10-batches-bin/test_batch.bin", small_cifar_record * 9999)])
    with pytest.raises(CorruptFileError, match="wrong record count") as info:
        data.load("cifar10", "test", data_dir=tmp_path)
    assert "test_batch.bin" in str(info.value) and str(archive) in str(info.value)


def test_cifar_missing_member_and_truncated_archive(tmp_path, small_cifar_record, data_dir):
    (tmp_path / "cifar10").mkdir()
    archive = tmp_path / "cifar10" / "cifar-10-binary.tar.gz"
    _write_tar(archive, [("cifar-10-batches-bin/data_batch_1.bin", small_cifar_record)])
    with pytest.raises(CorruptFileError, match="test_batch.bin"):
        data.load("cifar10", "test", data_dir=tmp_path)
    with open(data_dir / "cifar10" / "cifar-10-binary.tar.gz", "rb") as f:
        archive.write_bytes(f.read(5_000_000))
    with pytest.raises(CorruptFileError, match="not a readable tar.gz") as info:
        data.load("cifar10", "test", data_dir=tmp_path)
    assert str(archive) in str(info.value)


@pytest.mark.parametrize("verify", [False, True])
def test_a_bad_member_is_named_by_its_path_in_the_archive(tmp_path, small_cifar_record, verify):
    # a batch file stored under another folder was reported as cifar-10-batches-bin/<file>, a
    # path the archive does not hold
    (tmp_path / "cifar10").mkdir()
    archive = tmp_path / "cifar10" / "cifar-10-binary.tar.gz"
    bad_label = small_cifar_record[:0] + bytes([12]) + small_cifar_record[1:]
    _write_tar(archive, [("renamed/test_batch.bin", bad_label * 10000)])
    with pytest.raises(CorruptFileError, match="SHA-256" if verify else "label 12") as info:
        data.load("cifar10", "test", data_dir=tmp_path, verify=verify)
    assert str(info.value).startswith(f"{archive}:renamed/test_batch.bin: ")


def test_a_directory_member_in_place_of_a_batch_file_is_named(tmp_path):
    # it was reported as missing from the archive, which holds an entry of that name
    (tmp_path / "cifar10").mkdir()
    archive = tmp_path / "cifar10" / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    with pytest.raises(CorruptFileError) as info:
        data.load("cifar10", "test", data_dir=tmp_path)
    assert str(info.value) == (
        f"{archive}:cifar-10-batches-bin/test_batch.bin: a directory, where the batch file "
        "test_batch.bin was expected"
    )


@pytest.mark.parametrize("evil", ["../escaped.bin", "/tmp/jcnn_escaped_absolute.bin"])
def test_archive_member_outside_target_is_refused(tmp_path, small_cifar_record, evil):
    target = tmp_path / "data"
    (target / "cifar10").mkdir(parents=True)
    archive = target / "cifar10" / "cifar-10-binary.tar.gz"
    _write_tar(
        archive,
        [(evil, b"payload"), ("cifar-10-batches-bin/test_batch.bin", small_cifar_record * 10000)],
    )
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(CorruptFileError, match="refusing member") as info:
        data.load("cifar10", "test", data_dir=target)
    assert evil in str(info.value)
    assert sorted(tmp_path.rglob("*")) == before
    assert not os.path.exists("/tmp/jcnn_escaped_absolute.bin")


def test_other_names_go_through_tfds_and_say_how_to_get_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
    with pytest.raises(ImportError, match=r"'cifar100'.*pip install 'jcnn\[tfds\]'"):
        data.load("cifar100", "train")


@pytest.mark.parametrize(
    "name, known", [("MNIST", "mnist"), ("Fashion-MNIST", "fashion_mnist"), ("CIFAR-10", "cifar10")]
)
def test_another_spelling_of_a_known_name_is_refused(monkeypatch, name, known):
    """tfds takes "MNIST" for its "mnist": it downloaded (or, offline, retried for minutes) into
    the folder of the original files instead of reading them."""
    import sys

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # never reached
    with pytest.raises(ValueError, match=f"^name: expected '{known}' .* got '{name}'$"):
        data.load(name, "train")


def test_verify_is_refused_for_a_name_read_through_tfds(monkeypatch):
    """verify=True would otherwise be dropped silently: no content check, no error."""
    import sys

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # never reached
    with pytest.raises(ValueError, match="verify: only for .* got verify=True for 'cifar100'"):
        data.load("cifar100", "train", verify=True)


def test_bad_arguments(data_dir):
    with pytest.raises(ValueError, match="split: expected 'train' or 'test'"):
        data.load("mnist", "validation", data_dir=data_dir)
    with pytest.raises(TypeError, match="name"):
        data.load(3, "train")
    with pytest.raises(TypeError, match="verify: expected True or False, got 'no'"):
        data.load("mnist", "test", data_dir=data_dir, verify="no")
    with pytest.raises(TypeError, match="data_dir: expected a folder .* got int"):
        data.load("mnist", "test", data_dir=3)
    # a split that is no str is a TypeError, as load_tfds says for the other names
    for split, got in ((None, "NoneType None"), (["test"], "list ['test']"), (0, "int 0")):
        with pytest.raises(TypeError, match=re.escape(f"or 'test' for cifar10, got {got}")):
            data.load("cifar10", split, data_dir=data_dir)


def test_an_unknown_tfds_name_is_a_short_value_error(tmp_path):
    pytest.importorskip("tensorflow_datasets", reason="the tfds route needs: pip install .[tfds]")
    # tfds's own DatasetNotFoundError lists every dataset it knows: hundreds of lines
    with pytest.raises(ValueError, match=r"^name: .* got 'fashion_mnistt'") as caught:
        data.load_tfds("fashion_mnistt", "train", data_dir=tmp_path)
    assert len(str(caught.value)) < 400
    assert "did you mean 'fashion_mnist'?" in str(caught.value)
    assert not list(tmp_path.iterdir())


def test_a_tfds_name_tfds_cannot_parse_is_a_one_line_value_error(tmp_path):
    pytest.importorskip("tensorflow_datasets", reason="the tfds route needs: pip install .[tfds]")
    # tfds's own ValueError is a 20-line grammar of builder names (jcnn-train --dataset tfds:a/..)
    for name in ("../../etc", "a b", ""):
        with pytest.raises(ValueError) as raised:
            data.load_tfds(name, "train", data_dir=tmp_path)
        message = str(raised.value)
        assert message.startswith("name: expected a tensorflow-datasets name such as 'cifar100'")
        assert f"got {name!r}" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"name": 3}, TypeError, r"name: expected a dataset name \(str\), got int"),
        ({"split": 3}, TypeError, "split: expected one tfds split .* got int"),
        ({"split": ["train", "test"]}, TypeError, "split: expected one tfds split .* got list"),
        ({"download": "no"}, TypeError, "download: expected True or False, got 'no'"),
        ({"data_dir": 3}, TypeError, "data_dir: expected a folder .* got int"),
        ({"manual_dir": 3}, TypeError, "manual_dir: expected a folder .* got int"),
        ({"download_options": [1]}, TypeError, "download_options: expected a dict .* got list"),
        (
            {"download_options": {"bogus": 1}},
            TypeError,
            r"download_options: expected tfds.download.DownloadConfig fields, got \['bogus'\]",
        ),
    ],
)
def test_load_tfds_names_a_bad_argument(tmp_path, kwargs, error, message):
    pytest.importorskip("tensorflow_datasets", reason="the tfds route needs: pip install .[tfds]")
    call = {"name": "fashion_mnist", "split": "test", "data_dir": tmp_path, "download": False}
    with pytest.raises(error, match=message):
        data.load_tfds(**{**call, **kwargs})
    assert not list(tmp_path.iterdir())


def test_load_tfds_refuses_a_manual_dir_that_is_not_a_folder(tmp_path):
    """tfds itself ignores a missing manual_dir and goes to the network instead."""
    pytest.importorskip("tensorflow_datasets", reason="the tfds route needs: pip install .[tfds]")
    missing = tmp_path / "downloads"
    with pytest.raises(
        FileNotFoundError, match=f"manual_dir: .*'{re.escape(str(missing))}', which is not a folder"
    ):
        data.load_tfds("fashion_mnist", "test", data_dir=tmp_path / "tfds", manual_dir=missing)
    assert not list(tmp_path.iterdir())


def test_load_tfds_with_a_manual_dir_of_other_files_is_a_one_line_corrupt_file_error(
    tmp_path, data_dir
):
    """tfds's NonMatchingChecksumError (a multi-line message, a traceback through jcnn-train
    --dataset tfds:mnist --manual-dir <the Fashion-MNIST files>) is a CorruptFileError."""
    pytest.importorskip("tensorflow_datasets", reason="the tfds route needs: pip install .[tfds]")
    wrong = os.path.join(data_dir, "fashion_mnist")
    with pytest.raises(data.CorruptFileError) as info:
        data.load_tfds("mnist", "test", data_dir=tmp_path / "tfds", manual_dir=wrong)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("mnist (test): a file is not the one tensorflow-datasets expects")
    assert "wrong checksum" in message and str(wrong) in message


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_tfds_download_without_network_is_a_one_line_download_error(
    tmp_path, monkeypatch, wrapped
):
    """tfds downloads through requests: offline, jcnn-train --dataset tfds:svhn_cropped ended in
    a raw many-line requests.exceptions.ConnectionError traceback naming no dataset."""
    tfds = pytest.importorskip("tensorflow_datasets")
    requests = pytest.importorskip("requests")

    def offline(*args, **kwargs):
        error = requests.exceptions.ConnectionError(
            "HTTPConnectionPool(host='example.org', port=80): Max retries exceeded\nwith url"
        )
        if not wrapped:
            raise error
        try:
            raise error
        except Exception as inner:
            raise RuntimeError("tfds gave up") from inner

    monkeypatch.setattr(tfds, "load", offline)
    with pytest.raises(data.DownloadError) as caught:
        data.load_tfds("svhn_cropped", "train", data_dir=tmp_path)
    message = str(caught.value)
    assert message.startswith("svhn_cropped (train): tensorflow-datasets could not download it")
    assert "Max retries exceeded with url" in message and "\n" not in message
    assert "data_dir=" in message and "manual_dir=" in message


def test_a_tfds_error_that_is_no_network_error_is_not_disguised_as_one(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def broken(*args, **kwargs):
        raise KeyError("a bug of tfds's own")

    monkeypatch.setattr(tfds, "load", broken)
    with pytest.raises(KeyError, match="a bug of tfds's own"):
        data.load_tfds("svhn_cropped", "train", data_dir=tmp_path)


def test_load_tfds_without_download_names_where_the_dataset_is_not_prepared(tmp_path):
    """Not tfds's AssertionError: the FileNotFoundError a missing dataset gives everywhere."""
    pytest.importorskip("tensorflow_datasets", reason="the tfds route needs: pip install .[tfds]")
    with pytest.raises(FileNotFoundError, match="fashion_mnist") as caught:
        data.load_tfds("fashion_mnist", "test", data_dir=tmp_path, download=False)
    assert str(tmp_path) in str(caught.value) and "download=True" in str(caught.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_tfds_route_offline_gives_identical_arrays(tmp_path, data_dir, loaded):
    """tensorflow-datasets prepares Fashion-MNIST from the same files, without network.

    Slow (imports TensorFlow and prepares the dataset, ~20 s): only the test split is compared;
    the train split is capped at 10,000 examples to keep preparation short.
    """
    pytest.importorskip("tensorflow", reason="the tfds route needs the extra: pip install .[tfds]")
    pytest.importorskip("tensorflow_datasets", reason="the tfds route needs: pip install .[tfds]")
    images, labels = data.load_tfds(
        "fashion_mnist",
        "test",
        data_dir=tmp_path / "tfds",
        manual_dir=data_dir / "fashion_mnist",
        download_options={"max_examples_per_split": 10000},
    )
    expected_images, expected_labels = loaded("fashion_mnist", "test")
    assert images.shape == expected_images.shape and images.dtype == np.uint8
    assert labels.dtype == np.int32

    def canonical(images, labels):
        # tfds stores examples in its own shuffled order: compare in a canonical order
        order = sorted(range(len(labels)), key=lambda i: (int(labels[i]), images[i].tobytes()))
        return images[order], labels[order]

    got, want = canonical(images, labels), canonical(expected_images, expected_labels)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


# ---- bounded decompression (nothing inflated past the dataset's size) --------------------------


def _zeros_after(prefix: bytes, mebibytes: int, wbits: int = 31) -> bytes:
    """A gzip stream of ``prefix`` then ``mebibytes`` MiB of zeros, built in a few milliseconds.

    After a full flush deflate starts afresh, so every further MiB of zeros compresses to the same
    ~1 KB block: 1 GiB of content costs ~1 MB of file, as in a decompression bomb. The trailer's
    CRC is not the content's (computing it would take a second): a reader must stop long before.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return head + block * mebibytes + compressor.flush()


def test_bomb_builder_really_inflates():
    bomb = _zeros_after(b"xy", 3)
    assert len(bomb) < 4000
    assert zlib.decompressobj(31).decompress(bomb[:-8]) == b"xy" + bytes(3 << 20)


def _peak_memory_of(fn):
    """Run ``fn`` (expected to raise CorruptFileError); return (error, peak traced bytes)."""
    tracemalloc.start()
    try:
        with pytest.raises(CorruptFileError) as info:
            fn()
        return info.value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("which", ["labels", "images"])
def test_gzip_bomb_stops_at_the_dataset_size(mnist_copy, which):
    """1 GiB of zeros behind a valid header: refused after the expected size, memory stays small."""
    folder = mnist_copy / "mnist"
    if which == "labels":
        path, header, expected = folder / "t10k-labels-idx1-ubyte.gz", (2049, 10000), 10008
    else:
        path, header, expected = (
            folder / "t10k-images-idx3-ubyte.gz",
            (2051, 10000, 28, 28),
            7840016,
        )
    path.write_bytes(_zeros_after(struct.pack(f">{len(header)}I", *header), 1024))
    assert path.stat().st_size < 1_200_000
    error, peak = _peak_memory_of(lambda: data.load("mnist", "test", data_dir=mnist_copy))
    assert str(path) in str(error) and f"more than {expected} bytes" in str(error)
    assert peak < 64 << 20, f"peak traced memory {peak / 2**20:.0f} MiB"


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def test_tar_member_declaring_a_huge_size_is_refused_before_reading(tmp_path):
    (tmp_path / "cifar10").mkdir()
    archive = tmp_path / "cifar10" / "cifar-10-binary.tar.gz"
    archive.write_bytes(
        _zeros_after(_tar_header("cifar-10-batches-bin/test_batch.bin", 1 << 30), 1024)
    )
    error, peak = _peak_memory_of(lambda: data.load("cifar10", "test", data_dir=tmp_path))
    assert "test_batch.bin" in str(error) and f"{1 << 30} bytes" in str(error)
    assert "wrong record count" in str(error) and str(archive) in str(error)
    assert peak < 64 << 20, f"peak traced memory {peak / 2**20:.0f} MiB"


def test_tar_stream_bounded_in_total(tmp_path):
    """An unwanted 1 GiB member: the archive is refused once it outgrows any CIFAR-10 archive."""
    (tmp_path / "cifar10").mkdir()
    archive = tmp_path / "cifar10" / "cifar-10-binary.tar.gz"
    archive.write_bytes(
        _zeros_after(_tar_header("cifar-10-batches-bin/readme.html", 1 << 30), 1024)
    )
    limit = data.DATASETS["cifar10"].archive_limit
    assert 184_380_000 < limit < 1 << 30
    error, peak = _peak_memory_of(lambda: data.load("cifar10", "test", data_dir=tmp_path))
    assert str(archive) in str(error) and f"more than {limit} bytes" in str(error)
    assert peak < 64 << 20, f"peak traced memory {peak / 2**20:.0f} MiB"


def test_extracted_batch_file_of_wrong_size_is_not_read(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    with open(folder / "test_batch.bin", "wb") as f:
        f.truncate(1 << 34)  # sparse: 16 GiB that would not fit in memory
    with pytest.raises(CorruptFileError, match="wrong record count") as info:
        data.load("cifar10", "test", data_dir=tmp_path)
    assert str(folder / "test_batch.bin") in str(info.value) and str(1 << 34) in str(info.value)


def test_duplicate_member_in_archive_is_refused(tmp_path, small_cifar_record):
    (tmp_path / "cifar10").mkdir()
    archive = tmp_path / "cifar10" / "cifar-10-binary.tar.gz"
    batch = small_cifar_record * 10000
    _write_tar(archive, [("cifar-10-batches-bin/test_batch.bin", batch)] * 2)
    with pytest.raises(CorruptFileError, match="second member named test_batch.bin"):
        data.load("cifar10", "test", data_dir=tmp_path)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("not a checksum line", "words"),
        ("abc123  mnist/t10k-labels-idx1-ubyte.gz", "short digest"),
        ("f" * 64 + "mnist/t10k-labels-idx1-ubyte.gz", "no separator"),
        ("g" * 64 + "  mnist/t10k-labels-idx1-ubyte.gz", "not hex"),
        ("f" * 64, "no file"),
        ("f" * 64 + "  ", "empty file name"),
    ],
)
def test_malformed_checksum_line_names_file_and_line(tmp_path, data_dir, line, why):
    good = next(s for s in (data_dir / "SHA256SUMS").read_text().splitlines() if "t10k-labels" in s)
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(CorruptFileError) as info:
        data.verify_sha256sums(sums)
    assert str(sums) in str(info.value) and "line 3" in str(info.value), why
    (tmp_path / "bin.sums").write_bytes(b"\xff\xfe" + bytes(70))
    with pytest.raises(CorruptFileError, match="bin.sums"):
        data.verify_sha256sums(tmp_path / "bin.sums")


def test_checksum_file_formats_accepted(tmp_path, data_dir):
    lines = (data_dir / "SHA256SUMS").read_text().splitlines()
    binary_mode = [line.replace("  ", " *", 1) for line in lines]
    upper = [line[:64].upper() + line[64:] for line in lines]
    (tmp_path / "a").write_text("\r\n".join(binary_mode[:2] + upper[2:4]) + "\r\n")
    shutil.copytree(data_dir / "cifar10", tmp_path / "cifar10")
    shutil.copytree(data_dir / "fashion_mnist", tmp_path / "fashion_mnist")
    results = data.verify_sha256sums(tmp_path / "a")
    assert len(results) == 4 and all(results.values()), results
    target = tmp_path / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz"
    target.chmod(0o644)
    target.write_bytes(b"changed")
    assert (
        data.verify_sha256sums(tmp_path / "a")["fashion_mnist/t10k-labels-idx1-ubyte.gz"] is False
    )
