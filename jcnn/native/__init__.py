"""Optional native CPU backend: oneDNN convolutions called from jitted code as XLA FFI custom calls,
batch norm's per-channel reductions (its statistics, its derivative's sums) in one pass each
(``channel_moments.cc``), and the weight gradient of depthwise convolutions
(``depthwise_weight_grad.cc``).

jcnn runs everywhere without it: when the library is not built, ``F.conv`` uses its pure-XLA
formulations. To enable it on a CPU machine (needs a C++17 compiler)::

    pip install "jcnn[native]"   # oneDNN 3.2 (GNU OpenMP) from PyPI, Linux x86-64
    jcnn-build-native            # compiles the three .cc files against jaxlib's FFI headers, checks

The library lands in a cache directory (``JCNN_NATIVE_DIR``, default ``~/.cache/jcnn``) under a
name that hashes the source, the jaxlib version, the oneDNN location and the compiler, so an
upgrade of any of them simply needs a rebuild and never loads a stale build.

Which backend float32 and bfloat16 convolutions on CPU use is read when a function is traced,
from the environment variable ``JCNN_CONV_BACKEND``: ``auto`` (default: oneDNN when built, else
XLA), ``onednn`` (an error when the library is missing) or ``xla``; ``conv_backend_scope``
overrides it for the functions traced inside a block. Whatever the choice, a convolution that
oneDNN does not implement on this CPU (bfloat16 without AVX-512 or AVX2-VNNI-2: oneDNN is asked,
:func:`unsupported_reason`) runs on XLA. The same choice decides where float32 batch and instance
norm compute their training statistics and their derivative's sums: in the library's one-pass
kernels, or in XLA's passes. ``jax.export`` needs :func:`portable`.

Grouped convolutions that are not depthwise run in oneDNN's blocked activation layout (reordered
in and out) on AMD CPUs, where that measured faster, and channels-last on others (an Intel Xeon:
channels-last 1.2-1.65x faster); ``JCNN_ONEDNN_GROUPED_LAYOUT=blocked`` or ``channels_last``,
set before the library loads, overrides that choice.

:func:`host_memory` says whether freed CPU memory is kept for XLA's next call
(``jcnn.native.memory``).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ParamSpec, TypeVar

from jcnn.native.memory import host_memory

__all__ = [
    "NativeBuildError",
    "available",
    "build",
    "conv_backend",
    "conv_backend_scope",
    "host_memory",
    "implementation",
    "library_path",
    "load",
    "main",
    "onednn_root",
    "portable",
    "unsupported_reason",
]

SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in ("onednn_conv.cc", "channel_moments.cc", "depthwise_weight_grad.cc")
)
TARGETS = (
    "jcnn_conv_forward",
    "jcnn_conv_backward_data",
    "jcnn_conv_backward_weights",
    "jcnn_channel_moments",
    "jcnn_centered_sums",
    "jcnn_depthwise_weight_grad",
)
BACKENDS = ("auto", "onednn", "xla")
GROUPED_LAYOUTS = ("blocked", "channels_last")
_SCOPED_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "jcnn_conv_backend", default=None
)

_P = ParamSpec("_P")
_R = TypeVar("_R")


class NativeBuildError(RuntimeError):
    """The native library could not be built (no compiler, no oneDNN, a compile error)."""


def onednn_root() -> Path:
    """Where oneDNN's ``include/`` and ``lib/`` are: ``JCNN_ONEDNN_ROOT``, else this Python's prefix
    (where ``pip install onednn-devel-cpu-gomp`` puts them).

    Raises:
      ValueError: ``JCNN_ONEDNN_ROOT`` is set but empty.
    """
    root = os.environ.get("JCNN_ONEDNN_ROOT")
    if root == "":
        raise ValueError(
            f"JCNN_ONEDNN_ROOT: expected a oneDNN installation folder (or unset: {sys.prefix}), "
            "got ''"
        )
    return Path(sys.prefix if root is None else root).expanduser()


def _compiler() -> list[str]:
    """The C++ compiler command: ``CXX`` split as a shell would, ``c++`` where it is unset or blank.

    Raises:
      ValueError: ``CXX`` cannot be split (an unclosed quote).
    """
    value = os.environ.get("CXX", "")
    try:
        command = shlex.split(value)
    except ValueError as error:
        raise ValueError(
            f"CXX: expected a compiler command such as g++ or 'ccache g++' (or unset: c++), got "
            f"{value!r} ({error})"
        ) from None
    return command or ["c++"]


def library_path() -> Path:
    """Where the library for this source, jaxlib, oneDNN and compiler is built and loaded from.

    Raises:
      ValueError: ``JCNN_NATIVE_DIR`` is set but empty or names something that is not a folder,
        or ``JCNN_ONEDNN_ROOT`` is set but empty.
    """
    import jaxlib

    digest = hashlib.sha256()
    sources = (source.read_bytes() for source in SOURCES)
    for part in (*sources, jaxlib.__version__, str(onednn_root()), *_compiler()):
        digest.update(part if isinstance(part, bytes) else part.encode())
    default = Path.home() / ".cache" / "jcnn"
    cache = Path(os.environ.get("JCNN_NATIVE_DIR", default)).expanduser()
    if os.environ.get("JCNN_NATIVE_DIR") == "" or (cache.exists() and not cache.is_dir()):
        given = os.environ["JCNN_NATIVE_DIR"]
        raise ValueError(
            f"JCNN_NATIVE_DIR: expected a folder for the built library (or unset: {default}), "
            f"got {given!r}{' (not a folder)' if given else ''}"
        )
    return cache / f"libjcnn_onednn-{digest.hexdigest()[:16]}.so"


def build(*, verbose: bool = False) -> Path:
    """Compile the oneDNN convolution library (if not already built) and return its path.

    Raises:
      NativeBuildError: oneDNN's headers or library are missing, the library's folder cannot be
        written, or the compiler failed (its output is in the message).
      ValueError: a ``JCNN_*`` variable it reads is set to something it cannot use (see
        :func:`library_path`).
    """
    import jax

    root = onednn_root()
    header = root / "include" / "oneapi" / "dnnl" / "dnnl.hpp"
    libdir = root / "lib"
    if not header.is_file() or not any(libdir.glob("libdnnl.so*")):
        raise NativeBuildError(
            f"oneDNN not found: expected {header} and {libdir}/libdnnl.so; install it with "
            "`pip install 'jcnn[native]'` or point JCNN_ONEDNN_ROOT at a oneDNN 3.x installation"
        )
    target = library_path()
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch_folder = tempfile.TemporaryDirectory(dir=target.parent)
    except OSError as error:
        raise NativeBuildError(
            f"cannot write the library to {target.parent} ({error.strerror or error}); point "
            "JCNN_NATIVE_DIR at a writable folder"
        ) from error
    with scratch_folder as scratch:
        partial_build = Path(scratch) / target.name
        command = [
            *_compiler(),
            "-O2",
            "-std=c++17",
            "-shared",
            "-fPIC",
            "-fopenmp",  # the runtime oneDNN's pip build uses (GNU OpenMP)
            *map(str, SOURCES),
            f"-I{jax.ffi.include_dir()}",
            f"-I{root / 'include'}",
            f"-L{libdir}",
            "-ldnnl",
            f"-Wl,-rpath,{libdir}",
            *(["-Wl,--no-undefined"] if sys.platform.startswith("linux") else []),
            "-o",
            str(partial_build),
        ]
        if verbose:
            print(shlex.join(command), flush=True)
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except FileNotFoundError as error:
            raise NativeBuildError(
                f"no C++ compiler: {command[0]!r} was not found (set CXX to choose one)"
            ) from error
        if result.returncode != 0:
            names = ", ".join(source.name for source in SOURCES)
            raise NativeBuildError(
                f"compiling {names} failed (exit {result.returncode}):\n{result.stderr}"
            )
        os.replace(partial_build, target)  # atomic: a concurrent loader never sees half a file
    with _LOAD_LOCK:
        if _load_once.cache_info().currsize and _load_once() is not None:
            _load_once.cache_clear()  # a failed load earlier in this process may now succeed
    return target


_LOAD_LOCK = threading.Lock()


def _check_grouped_layout() -> None:
    """Refuse a ``JCNN_ONEDNN_GROUPED_LAYOUT`` the library would ignore (it reads only the two
    values it knows, once)."""
    layout = os.environ.get("JCNN_ONEDNN_GROUPED_LAYOUT")
    if layout not in (None, *GROUPED_LAYOUTS):
        raise ValueError(
            f"JCNN_ONEDNN_GROUPED_LAYOUT: expected one of {', '.join(GROUPED_LAYOUTS)} (or unset: "
            f"the measured choice for this CPU), got {layout!r}"
        )


def _load() -> str | None:
    """Load and register the library once per process (thread-safe: XLA refuses a second
    registration); the reason it is unavailable, or None.

    Raises:
      ValueError: ``JCNN_ONEDNN_GROUPED_LAYOUT`` is set to neither ``blocked`` nor
        ``channels_last``.
    """
    _check_grouped_layout()
    with _LOAD_LOCK:
        return _load_once()


@functools.cache
def _load_once() -> str | None:
    import jax

    try:
        path = library_path()
    except OSError as error:
        return f"cannot locate the library: {error}"
    if not path.is_file():
        return f"not built ({path} does not exist): run `jcnn-build-native`"
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:
        return f"{path} does not load: {error}"
    for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
    probe = library.jcnn_conv_supported
    probe.restype = ctypes.c_int
    probe.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.POINTER(ctypes.c_int64),
        ctypes.c_char_p,
        ctypes.c_int64,
    ]
    _PROBE[:] = [probe]
    return None


_PROBE: list = []  # the library's jcnn_conv_supported, once loaded


def unsupported_reason(op: int, bfloat16: bool, dims: tuple[int, ...], spatial: int) -> str | None:
    """Why oneDNN cannot run one convolution product on this CPU, or ``None`` when it can.

    oneDNN's implementations depend on the instruction set (bfloat16 needs AVX-512 or AVX2-VNNI-2;
    ``ONEDNN_MAX_CPU_ISA`` caps it), so the answer is oneDNN's own: it creates the primitive (then
    cached for the call) or says why not. ``op`` is 0 (forward), 1 (input gradient) or 2 (weight
    gradient); ``dims`` is the flattened problem described in ``onednn_conv.cc``.

    Raises:
      RuntimeError: the library is not loaded (see :func:`load`).
    """
    problem = _check_problem(op, bfloat16, dims, spatial)
    load()
    supported, text = _probe(*problem)
    return None if supported else text or "no implementation"


def implementation(op: int, bfloat16: bool, dims: tuple[int, ...], spatial: int) -> str | None:
    """oneDNN's name for the kernel it runs one convolution product with on this CPU (such as
    ``"jit:avx512_core"``, ``"brgconv:avx512_core"`` or ``"x64:gemm:jit"``, followed by
    ``" (activations reordered)"`` when the activations are reordered into a layout of oneDNN's
    for it: grouped convolutions on AMD CPUs (or as ``JCNN_ONEDNN_GROUPED_LAYOUT`` says); 1-D
    weight gradients without AVX-512; with AVX-512, float32
    forward products and input gradients of layers with at least 256 input and output channels,
    outputs 2 to 5 pixels wide and a window larger than 1x1), or ``None`` when it
    has none (:func:`unsupported_reason`). Arguments as there.

    Raises:
      RuntimeError: the library is not loaded (see :func:`load`).
    """
    problem = _check_problem(op, bfloat16, dims, spatial)
    load()
    supported, text = _probe(*problem)
    return text if supported else None


def _check_problem(op, bfloat16, dims, spatial) -> tuple[int, bool, tuple[int, ...], int]:
    """The arguments of :func:`unsupported_reason` checked: the library reads ``4 + 7 * spatial``
    values from ``dims`` whatever its length, trusts ``op`` and ``spatial``, divides by the groups
    (``dims[3]``), and ctypes wraps ints outside int64 silently."""
    from jcnn.functional._checks import _describe, check_bool, check_int

    op = check_int(op, "op", low=0, high=2)
    bfloat16 = check_bool(bfloat16, "bfloat16")
    spatial = check_int(spatial, "spatial", low=1, high=3)
    length = 4 + 7 * spatial
    if not isinstance(dims, (tuple, list)) or len(dims) != length:
        raise ValueError(
            f"dims: expected a tuple of {length} ints (batch, channels, output channels, groups, "
            f"then {spatial} each of input size, output size, window, stride, dilation, padding "
            f"low and high), got {dims if isinstance(dims, (tuple, list)) else _describe(dims)}"
        )
    dims = tuple(check_int(d, f"dims[{i}]") for i, d in enumerate(dims))
    for i, d in enumerate(dims):
        low = 1 if i == 3 else -(2**63)
        if not low <= d < 2**63:
            raise ValueError(f"dims[{i}]: expected an int in [{low}, {2**63 - 1}], got {d}")
    return op, bfloat16, dims, spatial


@functools.cache
def _probe(op, bfloat16, dims, spatial) -> tuple[bool, str]:
    text = ctypes.create_string_buffer(512)
    packed = (ctypes.c_int64 * len(dims))(*dims)
    supported = bool(_PROBE[0](op, int(bfloat16), spatial, packed, text, len(text)))
    return supported, text.value.decode(errors="replace")


def available() -> bool:
    """Whether the oneDNN library is built, loads, and its FFI targets are registered.

    Raises:
      ValueError: ``JCNN_ONEDNN_GROUPED_LAYOUT`` is set to neither ``blocked`` nor
        ``channels_last``.
    """
    return _load() is None


def load() -> None:
    """Load the library and register its FFI targets (once).

    Raises:
      RuntimeError: the library is not built or does not load; the message says why.
      ValueError: ``JCNN_ONEDNN_GROUPED_LAYOUT`` is set to neither ``blocked`` nor
        ``channels_last``.
    """
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"the oneDNN library is {reason}")


def conv_backend() -> str:
    """``"onednn"`` or ``"xla"``: what float32 and bfloat16 CPU convolutions traced now use.

    Raises:
      ValueError: ``JCNN_CONV_BACKEND`` is not one of ``auto``, ``onednn``, ``xla``, or
        ``JCNN_ONEDNN_GROUPED_LAYOUT`` is set to neither ``blocked`` nor ``channels_last``.
      RuntimeError: ``JCNN_CONV_BACKEND=onednn`` but the library is unavailable.
    """
    choice = os.environ.get("JCNN_CONV_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(
            f"JCNN_CONV_BACKEND: expected one of {', '.join(BACKENDS)}, got {choice!r}"
        )
    choice = _SCOPED_BACKEND.get() or choice
    _check_grouped_layout()
    if choice == "xla":
        return "xla"
    reason = _load()
    if reason is None:
        return "onednn"
    if choice == "onednn":
        raise RuntimeError(f"JCNN_CONV_BACKEND=onednn but the oneDNN library is {reason}")
    return "xla"


@contextlib.contextmanager
def conv_backend_scope(backend: str | None) -> Iterator[None]:
    """Within the block, functions traced use ``backend`` (one of ``auto``, ``onednn``, ``xla``)
    instead of ``JCNN_CONV_BACKEND``; ``None`` leaves the choice as it is.

    Only tracing reads it, and the scope is part of ``jax.jit``'s cache key: a function jitted
    and traced before the block is traced again inside it (on JAX versions with
    ``jax.make_user_context``; before them, it keeps the backend it was traced with).

    >>> with conv_backend_scope("xla"):
    ...     print(conv_backend())
    xla
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)} or None, got {backend!r}")
    if backend is None:
        yield
        return
    token = _SCOPED_BACKEND.set(backend)
    jit_key = (
        contextlib.nullcontext() if _backend_jit_key() is None else _backend_jit_key()(backend)
    )
    try:
        with jit_key:
            yield
    finally:
        _SCOPED_BACKEND.reset(token)


@functools.cache
def _backend_jit_key():
    """Part of jit's cache key: a function jitted and traced outside a ``conv_backend_scope`` is
    traced again inside it, not run with the other backend (``None`` before
    ``jax.make_user_context``)."""
    import jax

    return jax.make_user_context(None) if hasattr(jax, "make_user_context") else None


def portable(fun: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fun`` with every convolution it traces on XLA's own path, never a oneDNN custom call.

    For ``jax.export``, which refuses custom calls without a compatibility guarantee (an artifact
    holding one would also need jcnn's library wherever it is loaded)::

        exported = jax.export.export(jax.jit(native.portable(f)))(x, w)

    A function already jitted is traced again on XLA's path (on JAX versions with
    ``jax.make_user_context``; before them it keeps its cached trace: pass the plain function).
    Calling the result directly works too and runs the XLA path.

    >>> portable(conv_backend)()
    'xla'
    """
    if not callable(fun):
        raise TypeError(f"fun: expected a function to run on XLA's path, got {fun!r}")

    @functools.wraps(fun)
    def on_xla(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with conv_backend_scope("xla"):
            return fun(*args, **kwargs)

    return on_xla


def main(argv: list[str] | None = None) -> int:
    """``jcnn-build-native``: build the library, load it and check it against XLA's convolution."""
    from jcnn._cli import OneLineParser

    parser = OneLineParser(prog="jcnn-build-native", description=main.__doc__)
    parser.add_argument("--verbose", action="store_true", help="print the compiler command")
    args = parser.parse_args(argv)
    try:
        path = build(verbose=args.verbose)
        reason = _load()
    except NativeBuildError as error:
        print(f"jcnn-build-native: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # a bad JCNN_* variable
        print(f"jcnn-build-native: {error}", file=sys.stderr)
        return 2
    if reason is not None:
        print(f"jcnn-build-native: built {path} but it is {reason}", file=sys.stderr)
        return 1
    error = _self_check()
    print(f"jcnn-build-native: {path} (oneDNN convolution vs XLA, max relative error {error:.1e})")
    return 0 if error < 1e-5 else 1


def _self_check() -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jcnn.functional import _conv_onednn
    from jcnn.functional._conv_cpu import native_conv

    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (2, 9, 8, 6))
    w = jax.random.normal(keys[1], (3, 3, 3, 4))
    options = ((2, 1), ((1, 1), (0, 2)), (1, 2), 2)
    config = _conv_onednn.config(x, w, *options)
    reference = native_conv(x, w, config)
    got = _conv_onednn.conv_general(x, w, *options)
    return float(jnp.max(jnp.abs(got - reference)) / np.max(np.abs(reference)))
