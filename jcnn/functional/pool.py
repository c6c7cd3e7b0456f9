"""Pooling over 1, 2 or 3 spatial dims: max, average, L^p, global, adaptive and pick-one.

Arrays are channels-last, ``(N, *spatial, C)``; every op pools each channel of each example on its
own. The spatial rank comes from the length of ``window`` (or ``stride``, ``output_size``); an int
there means "the same in every spatial dim" and the rank is then ``x.ndim - 2``.

Windows, strides, padding, ``dilation``, ``ceil_mode`` and ``count_include_pad`` mean what they
mean in ``torch.nn.functional`` (max pooling pads with ``-inf``; in ``ceil_mode`` a last window
that would start in the right padding is dropped; the average never counts the ``ceil_mode``
overhang past the right padding), and the results agree with PyTorch's to float rounding.
A window wider than the padded input is an error, as in PyTorch, except in ``ceil_mode`` when it
is wider by less than the stride: it overhangs the right edge as in PyTorch (``max_pool1d`` of
length 3 with window 4, stride 2).
Differences: padding may also be ``"SAME"``/``"VALID"`` or ``(lo, hi)`` pairs, and a window that
sees only padding (possible with a large ``dilation``) is an error where PyTorch returns ``-inf``.

Gradients follow the course notes: a max pool sends each output's gradient to the winning input
only (the first one in window order on ties, as PyTorch does, and for a window of ``-inf`` its
first pixel inside the input, never the padding), and an average pool sends to every input the
gradient of each window it is in divided by that window's size.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jcnn.functional._checks import (
    PaddingLike,
    as_int_tuple,
    check_array,
    check_bool,
    check_extent,
    check_real,
    float32_or_wider,
    is_int,
    normalize_padding,
    plain_ints,
    window_count,
)

__all__ = [
    "max_pool",
    "avg_pool",
    "lp_pool",
    "global_avg_pool",
    "global_max_pool",
    "adaptive_avg_pool",
    "adaptive_max_pool",
    "subsample",
]

_LAYOUTS = {1: "(N, L, C)", 2: "(N, H, W, C)", 3: "(N, D, H, W, C)"}


def _spatial_rank(x, spec, name: str) -> int:
    """Spatial rank given by ``spec`` (an int: ``x.ndim - 2``; a sequence: its length), checked."""
    check_array(x, "x")
    spec = plain_ints(spec)
    if is_int(spec) or (getattr(spec, "ndim", None) == 0 and not isinstance(spec, jax.core.Tracer)):
        rank = x.ndim - 2
        if rank not in _LAYOUTS:
            expected = ", ".join(f"{r + 2} {layout}" for r, layout in _LAYOUTS.items())
            raise ValueError(
                f"x: expected rank {expected}, got rank {x.ndim} with shape {tuple(x.shape)}"
            )
        return rank
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        rank = len(spec)
        if rank not in _LAYOUTS:
            raise ValueError(
                f"{name}: expected an int or 1 to 3 entries (one per spatial dim), got {spec!r}"
            )
        if x.ndim != rank + 2:
            raise ValueError(
                f"x: expected rank {rank + 2} {_LAYOUTS[rank]} for a {rank}-D {name}, "
                f"got rank {x.ndim} with shape {tuple(x.shape)}"
            )
        return rank
    raise TypeError(f"{name}: expected an int or a sequence of ints, got {spec!r}")


def _window_geometry(
    in_sizes: Sequence[int],
    window: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    padding: PaddingLike,
    ceil_mode: bool,
) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...], tuple[int, ...]]:
    """Checked ``(padding pairs, padding that yields exactly the output, output sizes)``.

    The second padding differs from the first where ``ceil_mode`` adds an overhang on the right
    (more padding) or where the floor leaves input pixels unused on the right (less, >= 0).
    """
    check_bool(ceil_mode, "ceil_mode")
    pads = normalize_padding(padding, in_sizes, window, stride, dilation)
    if not isinstance(padding, str):
        for dim, (k, pair) in enumerate(zip(window, pads, strict=True)):
            if max(pair) > k // 2:
                raise ValueError(
                    f"padding: expected at most half the window (window // 2 = {k // 2}) on each "
                    f"side of spatial dim {dim}, got {pair}"
                )
    exact_pads, out_sizes = [], []
    for dim, (size, k, s, d, (lo, hi)) in enumerate(
        zip(in_sizes, window, stride, dilation, pads, strict=True)
    ):
        span = (k - 1) * d + 1
        out = window_count(size, span, s, lo, hi, ceil_mode)
        if out < 1:  # in ceil_mode a window may overhang the right edge by less than the stride
            over = span - (size + lo + hi)
            raise ValueError(
                f"window: the window spans {span} pixels (window {k}, dilation {d}) in spatial dim "
                f"{dim}, larger than the padded input {size + lo + hi} (size {size}, padding "
                f"{(lo, hi)})" + (f" by {over}, not less than the stride {s}" if ceil_mode else "")
            )
        pixels = np.arange(out)[:, None] * s - lo + np.arange(k)[None, :] * d
        blind = ~((pixels >= 0) & (pixels < size)).any(axis=1)
        if blind.any():
            raise ValueError(
                f"window: output {int(np.argmax(blind))} of spatial dim {dim} sees only padding "
                f"(size {size}, window {k}, dilation {d}, padding {(lo, hi)}); reduce the padding "
                f"or the dilation"
            )
        exact_pads.append((lo, max((out - 1) * s + span - size - lo, 0)))
        out_sizes.append(out)
    return pads, tuple(exact_pads), tuple(out_sizes)


def _full_window(spatial: Sequence[int]) -> tuple[int, ...]:
    """Per-axis window/stride/shape of ``(N, *spatial, C)``: 1 on the batch and channel axes."""
    return (1, *spatial, 1)


def max_pool(
    x: jax.Array,
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: PaddingLike = 0,
    *,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
) -> jax.Array:
    """Max pooling over 1, 2 or 3 spatial dims, as ``torch.nn.functional.max_pool{1,2,3}d``.

    Args:
      x: ``(N, *spatial, C)`` floating array.
      window: window size, an int or one per spatial dim (its length sets the spatial rank).
      stride: step between windows; defaults to ``window`` (non-overlapping windows).
      padding: an int or one per dim (at most ``window // 2``, PyTorch's rule), ``(lo, hi)``
        pairs, or ``"SAME"``/``"VALID"``. Padded pixels hold ``-inf`` and never win.
      dilation: spacing between the pixels of a window.
      ceil_mode: round the output size up instead of down (a last, partial window).

    Returns:
      ``(N, *out_spatial, C)`` array, the maximum of each window (NaN where the window holds a
      NaN, as in PyTorch). The gradient of a window goes to its first maximum in row-major
      order, as in PyTorch. Where the window holds a NaN, the gradient goes to a NaN: PyTorch's
      last NaN of the window for non-overlapping windows on CPU, else the first NaN (the same
      where a window holds one; a ``+inf`` before the NaN takes it instead).

    The 2x2 max pool with stride 1 of the course notes:

    >>> x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    >>> max_pool(x, (2, 2), stride=1)[0, :, :, 0].tolist()
    [[4.0, 5.0], [7.0, 8.0]]
    """
    rank = _spatial_rank(x, window, "window")
    window = as_int_tuple(window, rank, "window", minimum=1)
    stride = window if stride is None else as_int_tuple(stride, rank, "stride", minimum=1)
    dilation = as_int_tuple(dilation, rank, "dilation", minimum=1)
    _, pads, out_sizes = _window_geometry(
        x.shape[1:-1], window, stride, dilation, padding, ceil_mode
    )
    if all(d == 1 for d in dilation) and stride == window:

        def pool(x):
            return lax.platform_dependent(
                x,
                cpu=lambda x: _tiled_max_pool(x, window, pads, out_sizes),
                default=lambda x: _route_nan_windows(
                    lambda x: _reduce_window_max(x, window, window, pads), x
                ),
            )
    elif all(d == 1 for d in dilation):

        def pool(x):
            return _route_nan_windows(lambda x: _reduce_window_max(x, window, stride, pads), x)
    else:

        def pool(x):
            return _route_nan_windows(
                lambda x: _dilated_max_pool(
                    x, _lowest(x.dtype), window, stride, dilation, pads, out_sizes
                ),
                x,
            )

    def padded_pool(x):
        if not any(lo or hi for lo, hi in pads):  # every window inside: its first pixel wins ties
            return pool(x)
        return _route_minus_inf_windows(pool, x)

    accumulate = float32_or_wider(x.dtype)
    if accumulate != x.dtype and any(
        s < (k - 1) * d + 1 for k, s, d in zip(window, stride, dilation, strict=True)
    ):
        # Overlapping windows: a pixel's gradient sums the cotangents of every window it wins,
        # summed in half precision up to 640 ulps from the float32 gradient rounded. The same
        # maxima in float32, the gradient rounded once.
        return padded_pool(x.astype(accumulate)).astype(x.dtype)
    return padded_pool(x)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _route_minus_inf_windows(pool, x):
    """``pool(x)``, a max pool padding with ``-inf``, whose derivative sends the gradient of a
    window holding only ``-inf`` to its first pixel inside the input, as PyTorch does.

    Every path breaks ties in favour of the first pixel of the window, and a padded pixel, also
    ``-inf``, may come first: the gradient of such a window went to the padding, i.e. was lost.
    The derivative is taken at ``x`` with ``-inf`` raised to the lowest finite value, which beats
    the padding and changes no other winner, except in a window whose maximum is that very value
    with a ``-inf`` before it (then a tie the first pixel wins)."""
    return pool(x)


@_route_minus_inf_windows.defjvp
def _route_minus_inf_windows_jvp(pool, primals, tangents):
    (x,), (x_tangent,) = primals, tangents
    lowest_finite = np.array(jnp.finfo(x.dtype).min, x.dtype)
    raised = jnp.where(x == -np.inf, lowest_finite, x)
    return pool(x), jax.jvp(pool, (raised,), (x_tangent,))[1]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _route_nan_windows(pool, x):
    """``pool(x)``, a ``reduce_window`` max pool, whose derivative sends the gradient of a window
    holding a NaN to its first NaN, near PyTorch, which sends it to the last (the only one where
    a window holds one). ``reduce_window``'s own derivative compares with ``>=``, false for a
    NaN, and sent it to a pixel that is not the output. The derivative is taken at ``x`` with NaN
    raised to ``+inf``: the window's first NaN wins, unless a ``+inf`` comes before it."""
    return pool(x)


@_route_nan_windows.defjvp
def _route_nan_windows_jvp(pool, primals, tangents):
    (x,), (x_tangent,) = primals, tangents
    raised = jnp.where(jnp.isnan(x), np.array(np.inf, x.dtype), x)
    return pool(x), jax.jvp(pool, (raised,), (x_tangent,))[1]


def _lowest(dtype) -> np.ndarray:
    """``-inf`` as a concrete (NumPy) init value: lax then picks its differentiable max-pool
    primitive."""
    return np.array(-np.inf, dtype)


def _reduce_window_max(x, window, stride, pads):
    full_pads = ((0, 0), *pads, (0, 0))
    return lax.reduce_window(
        x, _lowest(x.dtype), lax.max, _full_window(window), _full_window(stride), full_pads
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _tiled_max_pool(x, window, pads, out_sizes):
    """Max pool with ``stride == window`` on CPU: its values from ``reduce_window`` (which XLA's
    CPU backend runs in one YNNPACK graph with the convolutions and matrix products around it:
    LeNet-5's inference with XLA's convolutions 1.8x faster than with the selects), its
    derivatives from ``_max_over_tiles``' selects over the input padded or cropped to whole
    tiles. Other platforms keep ``reduce_window``'s own derivatives: on a GPU its window scatter
    is the faster (AirbenchNet's training step on an H200 7% faster,
    ``experiments/benchmarks/README.md``, run AA)."""
    return _reduce_window_max(x, window, window, pads)


@_tiled_max_pool.defjvp
def _tiled_max_pool_jvp(window, pads, out_sizes, primals, tangents):
    fit = tuple(
        (lo, out * k - size - lo)
        for size, k, (lo, _), out in zip(
            primals[0].shape[1:-1], window, pads, out_sizes, strict=True
        )
    )
    return jax.jvp(lambda x: _max_over_tiles(x, window, fit), primals, tangents)


def _split_tiles(x, window):
    """``(N, *spatial, C)`` as ``(N, out_0, k_0, out_1, k_1, ..., C)``, and the tile axes."""
    split_shape = [x.shape[0]]
    for size, k in zip(x.shape[1:-1], window, strict=True):
        split_shape += [size // k, k]
    tile_axes = tuple(range(2, 2 * len(window) + 1, 2))
    return x.reshape(*split_shape, x.shape[-1]), tile_axes


def _max_over_tiles(x, window, fit):
    """Max over the non-overlapping ``window`` tiles of ``x`` padded by ``fit`` (``(lo, hi)`` per
    spatial axis, padding with ``-inf``; ``hi < 0`` crops the pixels a floor-mode pool leaves
    unused).

    The tiles are split into their own axes (a free reshape) and reduced one window axis at a
    time, last first, by a chain of selects that keeps the running maximum unless the next element
    is larger or NaN: per axis that keeps the first maximum (or the last NaN), so overall the first
    in window (row-major) order. The derivative of a chain of selects goes to the element
    selected, exactly as PyTorch and ``reduce_window``'s gradient (where ``jnp.max`` would split it
    among tied maxima, and ReLU zeros tie often). It is elementwise in both directions, which every
    XLA backend fuses: XLA compiles the gradient of ``reduce_window`` max to ``select_and_scatter``,
    a window scatter many times slower on CPU (13x on a 2x2 pool of ``(128, 24, 24, 16)``, forward
    and backward).
    """
    config = [(0, 0, 0), *((lo, hi, 0) for lo, hi in fit), (0, 0, 0)]
    tiles, axes = _split_tiles(lax.pad(x, _lowest(x.dtype), config), window)
    for axis in reversed(axes):
        best = lax.index_in_dim(tiles, 0, axis, keepdims=False)
        for offset in range(1, tiles.shape[axis]):
            element = lax.index_in_dim(tiles, offset, axis, keepdims=False)
            best = jnp.where((element > best) | jnp.isnan(element), element, best)
        tiles = best
    return tiles


def _dilated_max_pool(x, lowest, window, stride, dilation, pads, out_sizes):
    """Dilated max pool from an undilated ``reduce_window`` (JAX has no VJP for window dilation).

    With the padded length a multiple of ``d``, row ``r`` of ``x.reshape(L // d, d)`` holds pixels
    ``r*d .. r*d + d-1``, so an undilated window of ``k`` rows at row ``r``, column ``c`` covers the
    dilated window that starts at pixel ``r*d + c``: the stride-1 dilated pool is the plain pool
    of the reshaped array, flattened back; striding is then a slice.
    """
    batch, channels = x.shape[0], x.shape[-1]
    sizes = x.shape[1:-1]
    config = [(0, 0, 0)]
    for size, d, (lo, hi) in zip(sizes, dilation, pads, strict=True):
        config.append((lo, hi + (-(size + lo + hi)) % d, 0))
    config.append((0, 0, 0))
    padded = lax.pad(x, lowest, config)
    split_shape, split_window = [batch], [1]
    for length, k, d in zip(padded.shape[1:-1], window, dilation, strict=True):
        split_shape += [length // d, d]
        split_window += [k, 1]
    split = padded.reshape(*split_shape, channels)
    pooled = lax.reduce_window(
        split, lowest, lax.max, (*split_window, 1), (1,) * split.ndim, "VALID"
    )
    every_start = pooled.reshape(
        batch, *(p * d for p, d in zip(pooled.shape[1:-1:2], dilation, strict=True)), channels
    )
    limits = [(out - 1) * s + 1 for out, s in zip(out_sizes, stride, strict=True)]
    return lax.slice(
        every_start, (0,) * every_start.ndim, (batch, *limits, channels), _full_window(stride)
    )


def _window_counts(size, k, s, lo, hi, out, count_include_pad) -> np.ndarray:
    """PyTorch's average-pool divisor along one dim for each of the ``out`` windows."""
    start = np.arange(out) * s - lo
    stop = np.minimum(start + k, size + hi)
    if count_include_pad:
        return stop - start
    return np.minimum(stop, size) - np.maximum(start, 0)


def avg_pool(
    x: jax.Array,
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: PaddingLike = 0,
    *,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
) -> jax.Array:
    """Average pooling over 1, 2 or 3 spatial dims, as ``torch.nn.functional.avg_pool{1,2,3}d``.

    Args:
      x: ``(N, *spatial, C)`` floating array.
      window: window size, an int or one per spatial dim (its length sets the spatial rank).
      stride: step between windows; defaults to ``window``.
      padding: an int or one per dim (at most ``window // 2``), ``(lo, hi)`` pairs, or
        ``"SAME"``/``"VALID"``. Padded pixels are zeros.
      ceil_mode: round the output size up instead of down (a last, partial window).
      count_include_pad: divide by the window size including the zero padding (but never the
        ``ceil_mode`` overhang past it, as PyTorch); if False, by the input pixels in the window
        (TensorFlow's ``"SAME"`` average pooling is ``padding="SAME", count_include_pad=False``).

    Returns:
      ``(N, *out_spatial, C)`` array, the mean of each window (half precision sums in float32).

    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> avg_pool(x, 2)[0, :, :, 0].tolist()
    [[2.5, 4.5], [10.5, 12.5]]
    """
    rank = _spatial_rank(x, window, "window")
    window = as_int_tuple(window, rank, "window", minimum=1)
    stride = window if stride is None else as_int_tuple(stride, rank, "stride", minimum=1)
    check_bool(count_include_pad, "count_include_pad")
    sizes = x.shape[1:-1]
    pads, exact_pads, out_sizes = _window_geometry(
        sizes, window, stride, (1,) * rank, padding, ceil_mode
    )
    accumulate = float32_or_wider(x.dtype)
    sums = lax.reduce_window(
        x.astype(accumulate),
        np.array(0, accumulate),
        lax.add,
        _full_window(window),
        _full_window(stride),
        ((0, 0), *exact_pads, (0, 0)),
    )
    counts = np.ones((), np.int64)
    for size, k, s, (lo, hi), out in zip(sizes, window, stride, pads, out_sizes, strict=True):
        counts = np.multiply.outer(
            counts, _window_counts(size, k, s, lo, hi, out, count_include_pad)
        )
    return (sums / counts.reshape(_full_window(out_sizes)).astype(accumulate)).astype(x.dtype)


def lp_pool(
    x: jax.Array, p: float, window: int | Sequence[int], stride: int | Sequence[int] | None = None
) -> jax.Array:
    """L^p pooling ``(sum of x**p over the window) ** (1/p)``, as ``F.lp_pool{1,2,3}d``.

    ``p = 1`` is sum pooling and a large ``p`` approaches max pooling. As in PyTorch, ``x**p`` is
    not ``|x|**p``: a negative sum with a fractional root gives NaN (use non-negative inputs, e.g.
    after a ReLU, or an even integer ``p``). No padding. A window of zeros has output 0 and, for
    ``p >= 1``, gradient 0 as in PyTorch; for ``p < 1`` its gradient is NaN, as in PyTorch
    (``x**p`` has an infinite slope at 0).

    Args:
      x: ``(N, *spatial, C)`` floating array.
      p: the positive, finite power.
      window: window size, an int or one per spatial dim (its length sets the spatial rank).
      stride: step between windows; defaults to ``window``.

    Returns:
      ``(N, *out_spatial, C)`` array.

    >>> x = jnp.array([3.0, 4.0, 6.0, 8.0]).reshape(1, 4, 1)
    >>> lp_pool(x, 2, (2,))[0, :, 0].tolist()
    [5.0, 10.0]
    """
    p = check_real(p, "p", low=0, low_open=True)
    rank = _spatial_rank(x, window, "window")
    window = as_int_tuple(window, rank, "window", minimum=1)
    stride = window if stride is None else as_int_tuple(stride, rank, "stride", minimum=1)
    _window_geometry(x.shape[1:-1], window, stride, (1,) * rank, 0, False)
    accumulate = float32_or_wider(x.dtype)
    power = int(p) if float(p).is_integer() else float(p)
    sums = lax.reduce_window(
        x.astype(accumulate) ** power,
        np.array(0, accumulate),
        lax.add,
        _full_window(window),
        _full_window(stride),
        "VALID",
    )
    # A window of zeros (after a ReLU, say) has output 0 and, as in PyTorch, gradient 0 rather
    # than the NaN of the root's infinite slope times the power's zero slope (p >= 1; below 1
    # the power's own slope at 0 is infinite).
    nonzero = sums != 0
    root = jnp.where(nonzero, jnp.where(nonzero, sums, 1) ** (1.0 / float(p)), 0)
    return root.astype(x.dtype)


def _check_global(x) -> tuple[int, ...]:
    check_array(x, "x", ndim=(3, 4, 5))
    if 0 in x.shape[1:-1]:
        raise ValueError(
            f"x: expected at least one pixel in every spatial dim to pool, got shape "
            f"{tuple(x.shape)}"
        )
    return tuple(range(1, x.ndim - 1))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _first_max(x, axis: int):
    """``jnp.max(x, axis)`` whose derivative goes to one winner per output, as ``max_pool``'s: the
    first maximum along ``axis`` (the last NaN where there are NaNs), not split among ties."""
    return jnp.max(x, axis=axis)


@_first_max.defjvp
def _first_max_jvp(axis, primals, tangents):
    (x,), (x_tangent,) = primals, tangents
    peak = jnp.max(x, axis=axis)
    length = x.shape[axis]
    order_shape = [1] * x.ndim
    order_shape[axis] = length
    order = np.arange(length, dtype=np.int32).reshape(order_shape)
    rank = jnp.where(
        jnp.isnan(x), -1 - order, jnp.where(x == jnp.expand_dims(peak, axis), order, length)
    )
    wins = order == jnp.argmin(rank, axis=axis, keepdims=True)
    # The primal output through _first_max itself, not jnp.max: differentiating this rule (second
    # derivatives) must route to the same winner, where jnp.max's derivative splits among ties.
    tangent = jnp.sum(jnp.where(wins, x_tangent, jnp.zeros((), x_tangent.dtype)), axis=axis)
    return _first_max(x, axis), tangent


def _first_max_over(x, axes: Sequence[int]):
    """Max over ``axes`` whose derivative reaches the first maximum in row-major order over them:
    reducing the innermost axis first, each row keeps its first maximum, then the first row
    holding the overall maximum wins."""
    for axis in sorted(axes, reverse=True):
        x = _first_max(x, axis)
    return x


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over all spatial dims: ``(N, *spatial, C) -> (N, C)``.

    >>> global_avg_pool(jnp.arange(8.0).reshape(1, 2, 2, 2)).tolist()
    [[3.0, 4.0]]
    """
    axes = _check_global(x)
    return jnp.mean(x.astype(float32_or_wider(x.dtype)), axis=axes).astype(x.dtype)


def global_max_pool(x: jax.Array) -> jax.Array:
    """Maximum over all spatial dims: ``(N, *spatial, C) -> (N, C)``.

    The gradient goes to the first maximum in row-major order (as ``max_pool``'s and PyTorch's
    ``adaptive_max_pool(x, 1)``), not split among tied maxima.

    >>> global_max_pool(jnp.arange(8.0).reshape(1, 2, 2, 2)).tolist()
    [[6.0, 7.0]]
    """
    return _first_max_over(x, _check_global(x))


def _adaptive_sizes(x, output_size) -> tuple[int, ...]:
    rank = _spatial_rank(x, output_size, "output_size")
    if 0 in x.shape[1:-1]:
        raise ValueError(
            f"x: expected at least one pixel in every spatial dim to pool, got shape "
            f"{tuple(x.shape)}"
        )
    if isinstance(output_size, (np.ndarray, jax.Array)):  # concrete, as _spatial_rank checked
        output_size = np.asarray(output_size).tolist()  # 0-d: a number; 1-d: a list of them
    entries = tuple(output_size) if isinstance(output_size, Sequence) else (output_size,) * rank
    sizes = []
    for entry, in_size in zip(entries, x.shape[1:-1], strict=True):
        if entry is None:
            sizes.append(in_size)
        elif is_int(entry) and entry >= 1:
            sizes.append(int(entry))
        elif not is_int(entry):
            raise TypeError(
                f"output_size: expected positive ints (or None to keep an input size), "
                f"got {output_size!r}"
            )
        else:
            raise ValueError(
                f"output_size: expected positive ints (or None to keep an input size), "
                f"got {output_size!r}"
            )
    # a huge size (2**31 per dim) built its bin tables in NumPy until the process was killed
    out_shape = (x.shape[0], *sizes, x.shape[-1])
    check_extent(out_shape, float32_or_wider(x.dtype), "output_size", "output")
    return tuple(sizes)


def adaptive_avg_pool(x: jax.Array, output_size: int | Sequence[int | None]) -> jax.Array:
    """Average pooling to a fixed output size, with PyTorch's bins.

    Output ``i`` of a dim of size ``n`` pooled to ``m`` averages input pixels
    ``floor(i * n / m)`` to ``ceil((i + 1) * n / m) - 1``; neighbouring bins may overlap.

    Args:
      x: ``(N, *spatial, C)`` floating array.
      output_size: an int or one per spatial dim (``None`` keeps that dim's size).

    Returns:
      ``(N, *output_size, C)`` array.

    >>> x = jnp.arange(5.0).reshape(1, 5, 1)
    >>> adaptive_avg_pool(x, (3,))[0, :, 0].tolist()
    [0.5, 2.0, 3.5]
    """
    out_sizes = _adaptive_sizes(x, output_size)
    accumulate = float32_or_wider(x.dtype)
    pooled = x.astype(accumulate)
    for axis, (size, out) in enumerate(zip(x.shape[1:-1], out_sizes, strict=True), start=1):
        pooled = _adaptive_axis(pooled, axis, size, out, average=True)
    return pooled.astype(x.dtype)


def adaptive_max_pool(x: jax.Array, output_size: int | Sequence[int | None]) -> jax.Array:
    """Max pooling to a fixed output size, with PyTorch's bins (see ``adaptive_avg_pool``).

    The gradient of each output goes to the first maximum of its bin in row-major order (the last
    NaN where there are NaNs), as in PyTorch.

    Args:
      x: ``(N, *spatial, C)`` floating array.
      output_size: an int or one per spatial dim (``None`` keeps that dim's size).

    Returns:
      ``(N, *output_size, C)`` array.

    >>> x = jnp.array([1.0, 5.0, 2.0, 0.0, 3.0]).reshape(1, 5, 1)
    >>> adaptive_max_pool(x, 3)[0, :, 0].tolist()
    [5.0, 5.0, 3.0]
    """
    out_sizes = _adaptive_sizes(x, output_size)
    pooled = x
    # Innermost axis first, so that the gradient reaches the first maximum of each bin in
    # row-major order (see _first_max_over).
    dims = list(enumerate(zip(x.shape[1:-1], out_sizes, strict=True), start=1))
    for axis, (size, out) in reversed(dims):
        pooled = _adaptive_axis(pooled, axis, size, out, average=False)
    return pooled


def _adaptive_axis(x, axis: int, size: int, out: int, *, average: bool):
    """Pool one spatial axis into PyTorch's adaptive bins (boxes are separable, so axis by axis)."""
    if size == out:
        return x
    if size % out == 0:
        grouped = x.reshape(*x.shape[:axis], out, size // out, *x.shape[axis + 1 :])
        return jnp.mean(grouped, axis=axis + 1) if average else _first_max(grouped, axis + 1)
    starts = np.arange(out) * size // out
    stops = -(-(np.arange(out) + 1) * size // out)
    widths = stops - starts
    offsets = np.arange(int(widths.max()))
    index = np.minimum(starts[:, None] + offsets, stops[:, None] - 1)
    trailing = (1,) * (x.ndim - axis - 1)
    inside = (offsets < widths[:, None]).reshape((1,) * axis + index.shape + trailing)
    gathered = jnp.take(x, index, axis=axis, mode="clip")
    if average:
        sums = jnp.sum(jnp.where(inside, gathered, 0), axis=axis + 1)
        return sums / widths.reshape((1,) * axis + (out,) + trailing).astype(x.dtype)
    return _first_max(jnp.where(inside, gathered, -jnp.inf), axis + 1)


def subsample(x: jax.Array, stride: int | Sequence[int]) -> jax.Array:
    """Pick-one pooling: keep every ``stride``-th pixel of each spatial dim, starting at the first.

    Equivalent to a strided 1x1 window; the gradient reaches only the kept pixels.

    Args:
      x: ``(N, *spatial, C)`` floating array.
      stride: an int or one per spatial dim (its length sets the spatial rank).

    Returns:
      ``(N, *ceil(spatial / stride), C)`` array.

    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> subsample(x, 2)[0, :, :, 0].tolist()
    [[0.0, 2.0], [8.0, 10.0]]
    """
    rank = _spatial_rank(x, stride, "stride")
    stride = as_int_tuple(stride, rank, "stride", minimum=1)
    return x[(slice(None), *(slice(None, None, s) for s in stride), slice(None))]
