"""Test configuration shared by the unit tests and the doctests in ``jcnn/``."""

import os
import zlib

import jax
import numpy as np
import pytest

# No silent broadcasting anywhere in the suite: a rank mismatch is an error.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def torch():
    """PyTorch CPU, the independent oracle of the parity tests.

    Skips where PyTorch is absent (a user's machine) unless ``JCNN_REQUIRE_TORCH=1`` (set by CI),
    where its absence is an error so that nothing skips silently.
    """
    try:
        import torch as torch_module
    except ImportError:
        if os.environ.get("JCNN_REQUIRE_TORCH") == "1":
            raise
        pytest.skip(
            "PyTorch is the test oracle for this test; install it with `pip install -e .[dev]`"
        )
    torch_module.set_num_threads(1)
    return torch_module


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's name: reproducible, different per test."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    import jax.numpy as jnp

    doctest_namespace.update(jax=jax, jnp=jnp, np=np)


@pytest.fixture
def onednn():
    """The native oneDNN backend (:mod:`jcnn.native`), built and loaded.

    Skips where it is not built, unless ``JCNN_REQUIRE_NATIVE=1`` (set by CI after
    ``jcnn-build-native``), where its absence fails.
    """
    from jcnn import native

    if not native.available():
        message = f"the oneDNN library is {native._load()}"
        if os.environ.get("JCNN_REQUIRE_NATIVE") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return native
