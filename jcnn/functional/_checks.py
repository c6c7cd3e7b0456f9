"""Argument normalization and trace-time input checks shared by the functional ops.

Every check runs on static shapes and dtypes, so it costs nothing under ``jit`` and raises at trace
time with a message naming the argument, what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PaddingLike = int | str | Sequence[int] | Sequence[tuple[int, int]]


def as_int_tuple(value, n: int, name: str, *, minimum: int | None = None) -> tuple[int, ...]:
    """``value`` (an int or a sequence of ``n`` ints) as a tuple of ``n`` Python ints.

    >>> as_int_tuple(2, 3, "stride")
    (2, 2, 2)
    >>> as_int_tuple((1, 2), 3, "stride")
    Traceback (most recent call last):
    ...
    ValueError: stride: expected an int or a sequence of 3 ints, got (1, 2)
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        values = (int(value),) * n
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value
        ):
            raise ValueError(f"{name}: expected an int or a sequence of {n} ints, got {value!r}")
        values = tuple(int(v) for v in value)
    else:
        raise TypeError(f"{name}: expected an int or a sequence of {n} ints, got {value!r}")
    if minimum is not None and any(v < minimum for v in values):
        raise ValueError(f"{name}: every entry must be >= {minimum}, got {value!r}")
    return values


def check_positive_int(value, name: str) -> int:
    """``value`` as a Python int, raising unless it is an int (not a bool) >= 1.

    >>> check_positive_int(0, "groups")
    Traceback (most recent call last):
    ...
    ValueError: groups: expected a positive int, got 0
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def check_array(x, name: str, *, ndim: int | Sequence[int] | None = None) -> None:
    """Raise unless ``x`` is a floating array (optionally of one of the ranks ``ndim``)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            expected = " or ".join(str(a) for a in allowed)
            raise ValueError(
                f"{name}: expected rank {expected}, got rank {x.ndim} with shape {tuple(x.shape)}"
            )


def check_min_rank(x, name: str, min_rank: int, layout: str) -> None:
    """Raise unless ``x`` is a floating array of rank >= ``min_rank``; ``layout`` names its axes.

    >>> check_min_rank(jnp.ones(3), "x", 2, "(N, ..., C)")
    Traceback (most recent call last):
    ...
    ValueError: x: expected rank >= 2 (N, ..., C), got rank 1 with shape (3,)
    """
    check_array(x, name)
    if x.ndim < min_rank:
        raise ValueError(
            f"{name}: expected rank >= {min_rank} {layout}, got rank {x.ndim} "
            f"with shape {tuple(x.shape)}"
        )


def normalize_padding(
    padding: PaddingLike,
    in_sizes: Sequence[int],
    window: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    name: str = "padding",
) -> tuple[tuple[int, int], ...]:
    """Explicit ``((lo, hi), ...)`` padding for each spatial dim.

    Accepts an int (same on both sides of every dim), one int per dim, one ``(lo, hi)`` pair per
    dim, ``"VALID"`` (no padding) or ``"SAME"`` (output size ``ceil(in / stride)``, the extra pixel
    going to the high side, as in TensorFlow and ``lax``).

    >>> normalize_padding("SAME", (5, 6), (3, 2), (1, 2), (1, 1))
    ((1, 1), (0, 0))
    >>> normalize_padding(((0, 1), (2, 3)), (5, 6), (3, 2), (1, 1), (1, 1))
    ((0, 1), (2, 3))
    """
    n = len(in_sizes)
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0),) * n
        if mode == "SAME":
            pads = []
            for size, k, s, d in zip(in_sizes, window, stride, dilation, strict=True):
                effective = (k - 1) * d + 1
                out = -(-size // s)
                total = max((out - 1) * s + effective - size, 0)
                pads.append((total // 2, total - total // 2))
            return tuple(pads)
        raise ValueError(f"{name}: expected 'SAME', 'VALID', or ints, got {padding!r}")
    if (
        isinstance(padding, Sequence)
        and padding
        and all(isinstance(p, Sequence) and not isinstance(p, str) for p in padding)
    ):
        if len(padding) != n or not all(
            len(p) == 2 and all(isinstance(v, (int, np.integer)) for v in p) for p in padding
        ):
            raise ValueError(
                f"{name}: expected {n} (lo, hi) pairs of ints, one per spatial dim, got {padding!r}"
            )
        pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
    else:
        pairs = tuple((p, p) for p in as_int_tuple(padding, n, name))
    if any(v < 0 for pair in pairs for v in pair):
        raise ValueError(f"{name}: padding must be non-negative, got {padding!r}")
    return pairs


def check_key(key, name: str = "key") -> None:
    """Raise unless ``key`` is a ``jax.random`` key: typed (``jax.random.key``) or raw uint32."""
    dtype = getattr(key, "dtype", None)
    if dtype is None or not (
        jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or dtype == jnp.uint32
    ):
        described = f"dtype {dtype}" if dtype is not None else type(key).__name__
        raise TypeError(
            f"{name}: expected a jax.random key (jax.random.key(seed) or "
            f"jax.random.PRNGKey(seed)), got {described}"
        )
