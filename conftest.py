"""Test configuration shared by the unit tests and the doctests in ``jcnn/``."""

import atexit
import os
import shutil
import tempfile
import zlib


def _compile_faster():
    """Compiling, not running, is most of the suite's time: its programs are small. So the test
    session and every process it starts (xdist workers, the scripts tests run) get, through the
    environment, where XLA and JAX read them:

    - LLVM's -O0 (``--xla_backend_optimization_level=0``): about 40% less compile time. Values
      differ from the default level's by rounding only (where LLVM fuses a multiply and an add),
      which every comparison's tolerance allows.
    - one compilation cache for the session, in a fresh temporary folder removed at its end: a
      program another test or worker already compiled is loaded, not compiled again.

    A flag or folder the caller set is left as it is.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="jcnn-tests-xla-cache-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.25")


_compile_faster()

import jax  # noqa: E402  (after the environment above: JAX reads it on import)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# No silent broadcasting anywhere in the suite: a rank mismatch is an error.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each XLA CPU program maps its code into the process (three mappings), and a process may
    hold at most ``vm.max_map_count`` of them (65,530 by default): a worker that kept every
    program of its half of the suite neared that and crashed inside the compiler. A module's
    programs are released after it; the compilation cache above still saves compiling them
    again."""
    yield
    jax.clear_caches()


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
