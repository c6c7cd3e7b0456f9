"""Whether memory freed on the CPU is kept by the process for reuse or returned to the OS at once.

Each call of a compiled XLA:CPU program allocates its working memory (for a training step, the
activations kept for the backward pass: about 600 MB for ResNet-20 at batch 256) as one block and
frees it when the call ends. glibc's ``malloc`` serves a block that large with ``mmap`` and gives it
back with ``munmap``, so every call faults the whole block in again, 4 KiB at a time: 145,000 page
faults and about 0.3 s of system time per ResNet-20 training step on a 2-core machine.

``keep`` (the default where the C library is glibc) asks ``malloc``, when jcnn is imported, to
serve every block from its heap through one arena and never to trim that heap, so the next call
reuses pages already mapped. The process then holds on to its peak memory (as PyTorch's and JAX's
GPU allocators do) and somewhat more, since a freed block that small allocations have split no
longer fits the next call: ResNet-20's training at batch 256 settles at 1.6 GB resident against
1.05 GB between steps otherwise. One arena also slows XLA's compilation, whose threads allocate
at once (ResNet-20's training step: 1.8 s against 1.3 s), so a short run of a small network is a
second slower, while ResNet-20's first epoch on 12,800 CIFAR-10 images took 34 s against 39 s.
``release`` leaves ``malloc`` as it is; choose it with the environment variable
``JCNN_HOST_MEMORY=release``, read once, when jcnn is imported.

The setting reaches only threads that have not allocated yet, and JAX starts its CPU threads at
its first computation: imported after that, jcnn leaves ``malloc`` as it is (``release``) and
says so in a ``RuntimeWarning``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import warnings

__all__ = ["MODES", "host_memory"]

MODES = ("keep", "release")
"""The values of ``JCNN_HOST_MEMORY``: see :func:`host_memory`."""
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER_TRIM = -1  # read by glibc as the largest size_t: blocks above 2 GiB are kept too

_in_effect: list[str] = []


def host_memory() -> str:
    """``"keep"`` or ``"release"``: what this process does with freed memory (see the module).

    ``"keep"`` only where it was asked for, the C library accepted it (glibc on Linux) and jcnn
    was imported before JAX's first computation on the CPU.

    >>> host_memory() in MODES
    True
    """
    if not _in_effect:
        _in_effect.append(_configure(os.environ.get("JCNN_HOST_MEMORY", "keep")))
    return _in_effect[0]


def _configure(requested: str) -> str:
    if requested not in MODES:
        raise ValueError(f"JCNN_HOST_MEMORY: expected one of {', '.join(MODES)}, got {requested!r}")
    if requested == "release" or not sys.platform.startswith("linux"):
        return "release"
    if platform.libc_ver()[0] != "glibc":
        return "release"
    if _jax_started_on_cpu():
        warnings.warn(
            "jcnn was imported after JAX's first computation on the CPU, whose threads keep "
            "glibc's defaults: freed memory is returned to the system (JCNN_HOST_MEMORY=release), "
            "so XLA maps its working memory afresh at every call. Import jcnn before computing "
            "with JAX, or set JCNN_HOST_MEMORY=release to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return "release"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # One arena: a thread's own arena would still map any block larger than its 64 MB heap.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    return "keep" if all(mallopt(name, value) == 1 for name, value in settings) else "release"


def _jax_started_on_cpu() -> bool:
    if "jax" not in sys.modules:
        return False
    import jax
    from jax._src import xla_bridge

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started is not None and started() and jax.default_backend() == "cpu")
