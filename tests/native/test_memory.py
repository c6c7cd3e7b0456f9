"""Keeping freed CPU memory for XLA's next call (jcnn/native/memory.py).

The setting is process-wide and made once, so each case runs in a fresh interpreter."""

import json
import os
import platform
import subprocess
import sys

import pytest

from jcnn.native import memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# A jitted call whose working memory is one 128 MiB temporary (sin(x) materialized for the
# matmul); mallinfo2 reports what glibc's heap holds, getrusage the pages faulted in per call
# (the median call's: a machine under load may map a block afresh once in a while).
PROBE = """
import ctypes, json, resource
import jcnn
import jax, jax.numpy as jnp

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Mallinfo2
f = jax.jit(lambda x: (jnp.sin(x).reshape(4096, 8192) @ jnp.ones((8192, 4))).sum())
x = jnp.ones(2**25)
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
for _ in range(15):
    f(x).block_until_ready()
faults = []
for _ in range(11):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"mode": jcnn.native.host_memory(), "temp": temp,
                  "heap": mallinfo2().arena, "faults_per_call": sorted(faults)[5]}))
"""


def _probe(mode, *, jax_first=False):
    env = {key: value for key, value in os.environ.items() if key != "JCNN_HOST_MEMORY"}
    if mode is not None:
        env["JCNN_HOST_MEMORY"] = mode
    script = "import jax.numpy\njax.numpy.ones(3).block_until_ready()\n" * jax_first + PROBE
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1]), result.stderr


@pytest.mark.skipif(not GLIBC, reason="the setting applies to glibc's malloc only")
def test_keep_is_the_default_and_reuses_xla_working_memory():
    kept, warned = _probe(None)
    assert kept["mode"] == "keep" and "RuntimeWarning" not in warned
    assert kept["temp"] >= 2**27
    pages = kept["temp"] / 4096
    assert kept["heap"] >= kept["temp"]  # the freed block stays in the heap for the next call
    # Released, every call faults the whole block in again (fewer faults only where the kernel
    # backs it with huge pages); kept, the median call faults almost nothing.
    assert kept["faults_per_call"] < pages / 4, kept


# A block above 2 GiB, the largest int mallopt takes, freed and allocated again.
ABOVE_INT_MAX = """
import resource, numpy as np, jcnn
n = (2**31 + 2**27) // 8
np.ones(n)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(n)
print(jcnn.native.host_memory(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not GLIBC, reason="the setting applies to glibc's malloc only")
def test_keep_holds_blocks_larger_than_2_gib():
    env = {**os.environ, "NUMPY_MADVISE_HUGEPAGE": "0"}
    env.pop("JCNN_HOST_MEMORY", None)
    result = subprocess.run(
        [sys.executable, "-c", ABOVE_INT_MAX], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    mode, faults = result.stdout.split()
    assert mode == "keep"
    # The heap kept the first block's pages: fewer faults than even 2 MiB pages of a new block.
    assert int(faults) < 2**31 / 2**21 / 4, faults


@pytest.mark.skipif(not GLIBC, reason="the setting applies to glibc's malloc only")
def test_release_leaves_malloc_returning_large_blocks():
    released, warned = _probe("release")
    assert released["mode"] == "release" and "RuntimeWarning" not in warned
    assert released["heap"] < released["temp"], released  # mapped per call, never in the heap


@pytest.mark.skipif(not GLIBC, reason="the setting applies to glibc's malloc only")
def test_imported_after_jax_computed_it_says_so_and_changes_nothing():
    late, warned = _probe(None, jax_first=True)
    assert late["mode"] == "release"
    assert "RuntimeWarning: jcnn was imported after JAX's first computation" in warned
    assert "Import jcnn before computing with JAX" in warned
    assert late["heap"] < late["temp"], late
    _, silenced = _probe("release", jax_first=True)
    assert "RuntimeWarning" not in silenced


def test_an_unknown_mode_stops_the_import_with_the_choices():
    env = {**os.environ, "JCNN_HOST_MEMORY": "forever"}
    result = subprocess.run(
        [sys.executable, "-c", "import jcnn"], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "JCNN_HOST_MEMORY: expected one of keep, release, got 'forever'" in result.stderr


@pytest.mark.parametrize(
    ("system", "libc"), [("linux", ("musl", "")), ("darwin", ("", "")), ("win32", ("", ""))]
)
def test_keep_falls_back_to_release_without_glibc(monkeypatch, system, libc):
    monkeypatch.setattr(sys, "platform", system)
    monkeypatch.setattr(platform, "libc_ver", lambda: libc)
    monkeypatch.setattr(memory.ctypes, "CDLL", _refuse_loading)
    assert memory._configure("keep") == "release"
    assert memory._configure("release") == "release"


def _refuse_loading(*args, **kwargs):
    raise AssertionError("mallopt must not be looked up without glibc")


def test_host_memory_reports_the_setting_of_this_process():
    assert memory.host_memory() in memory.MODES
    if GLIBC and os.environ.get("JCNN_HOST_MEMORY", "keep") == "keep":
        assert memory.host_memory() == "keep"
