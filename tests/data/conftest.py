"""Fixtures of the jcnn.data tests: where the real dataset files are, and session-cached loads."""

import os
from pathlib import Path

import pytest

from jcnn import data

_REPO = Path(__file__).resolve().parents[2]


def _data_dir() -> Path | None:
    if os.environ.get("JCNN_DATA_DIR"):
        return Path(os.environ["JCNN_DATA_DIR"])
    shared = _REPO.parent / "shared" / "data"
    return shared if shared.is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder holding mnist/, fashion_mnist/ and cifar10/ with the original files.

    ``JCNN_DATA_DIR``, else ``<repo>/../shared/data``. Where neither exists the test skips, unless
    ``JCNN_REQUIRE_DATA=1`` (set by CI), where it fails.
    """
    folder = _data_dir()
    if folder is None or not folder.is_dir():
        reason = (
            "real dataset files not found: set JCNN_DATA_DIR to a folder holding mnist/, "
            f"fashion_mnist/ and cifar10/ (looked for {_REPO.parent / 'shared' / 'data'})"
        )
        if os.environ.get("JCNN_REQUIRE_DATA") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return folder


@pytest.fixture(scope="session")
def loaded(data_dir):
    """``loaded(name, split)``: ``data.load`` cached for the session (each split read once)."""
    cache = {}

    def get(name, split):
        if (name, split) not in cache:
            cache[name, split] = data.load(name, split, data_dir=data_dir)
        return cache[name, split]

    return get
