"""The locally connected layer (lecture 004): a convolution whose weights are not shared, each
output position having its own filter.

Inputs are ``(N, *spatial, C_in)`` (1-, 2- or 3-D); the kernel is
``(*out_spatial, *window, C_in, C_out)``: one ``(*window, C_in, C_out)`` filter bank per output
position, so the parameter count is ``prod(out_spatial)`` times that of the convolution with the
same window. The spatial rank comes from the kernel's rank (``2 * rank + 2``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jcnn.functional._checks import (
    PaddingLike,
    add_bias,
    as_int_tuple,
    check_array,
    check_size_sequence,
    float32_or_wider,
    normalize_padding,
    window_padding,
)

__all__ = ["locally_connected", "locally_connected_output_shape"]


def locally_connected_output_shape(
    in_spatial: Sequence[int],
    window: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: PaddingLike = 0,
    dilation: int | Sequence[int] = 1,
) -> tuple[int, ...]:
    """The output's spatial shape of :func:`locally_connected` (as for a convolution).

    Args:
        in_spatial: the input's spatial sizes, e.g. ``(H, W)``.
        window: the window per spatial axis (an int for every axis, or one per axis).
        stride, padding, dilation: as for :func:`locally_connected`.

    Returns:
        ``out_spatial``, a tuple of ints; the kernel is ``(*out_spatial, *window, C_in, C_out)``.

    >>> locally_connected_output_shape((7, 6), 3, stride=2, padding=1)
    (4, 3)
    """
    in_spatial = check_size_sequence(in_spatial, "in_spatial", example="(H, W)")
    rank = len(in_spatial)
    if rank > 3:  # locally_connected takes 1-, 2- or 3-D inputs
        raise ValueError(
            f"in_spatial: expected 1 to 3 spatial sizes such as (H, W), got {in_spatial!r}"
        )
    window = as_int_tuple(window, rank, "window", minimum=1)
    stride = as_int_tuple(stride, rank, "stride", minimum=1)
    dilation = as_int_tuple(dilation, rank, "dilation", minimum=1)
    pads = window_padding(in_spatial, window, padding, stride, dilation, "window")
    return tuple(
        (size + lo + hi - d * (k - 1) - 1) // s + 1
        for size, k, s, d, (lo, hi) in zip(in_spatial, window, stride, dilation, pads, strict=True)
    )


def locally_connected(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    *,
    stride: int | Sequence[int] = 1,
    padding: PaddingLike = 0,
    dilation: int | Sequence[int] = 1,
) -> jax.Array:
    """Locally connected layer, ``y[n, p, o] = sum_{k,c} x[n, p*s + k*d, c] w[p, k, c, o]``.

    Like :func:`jcnn.functional.conv` (cross-correlation), but the filter at every output position
    ``p`` is its own parameter (unshared weights, e.g. DeepFace's layers; lecture 004). It is
    computed exactly as a gather of the windows and one batched matrix product per position.

    Args:
        x: input ``(N, *spatial, C_in)``.
        w: kernel ``(*out_spatial, *window, C_in, C_out)``, where ``out_spatial`` is
            :func:`locally_connected_output_shape` of the input.
        b: optional unshared bias ``(*out_spatial, C_out)``.
        stride: int or one per spatial axis (>= 1).
        padding: int, one per axis, ``((lo, hi), ...)``, ``"SAME"`` or ``"VALID"`` (zeros).
        dilation: spacing of the window's taps, int or one per axis (>= 1).

    Returns:
        ``(N, *out_spatial, C_out)``.

    Example:
        >>> import jcnn.functional as F
        >>> x = jnp.arange(5.0).reshape(1, 5, 1)                # one 1-D signal
        >>> w = jnp.ones((4, 2, 1, 1)) * jnp.arange(4.0).reshape(4, 1, 1, 1)
        >>> F.locally_connected(x, w)[0, :, 0].tolist()       # position p sums (x_p + x_p+1) * p
        [0.0, 3.0, 10.0, 21.0]
    """
    check_array(x, "x")
    check_array(w, "w")
    if w.ndim not in (4, 6, 8):
        raise ValueError(
            "w: expected rank 4, 6 or 8 (*out_spatial, *window, C_in, C_out) for 1-, 2- or 3-D "
            f"inputs, got rank {w.ndim} with shape {tuple(w.shape)}"
        )
    rank = (w.ndim - 2) // 2
    if x.ndim != rank + 2:
        raise ValueError(
            f"x: expected rank {rank + 2} (N, *spatial, C) for a kernel of rank {w.ndim}, got "
            f"rank {x.ndim} with shape {tuple(x.shape)}"
        )
    window = tuple(w.shape[rank : 2 * rank])
    c_in, c_out = w.shape[-2], w.shape[-1]
    if x.shape[-1] != c_in:
        raise ValueError(
            f"w: expected C_in = {x.shape[-1]} (the input's channels) in axis {w.ndim - 2}, got "
            f"kernel shape {tuple(w.shape)}"
        )
    stride = as_int_tuple(stride, rank, "stride", minimum=1)
    dilation = as_int_tuple(dilation, rank, "dilation", minimum=1)
    spatial = tuple(x.shape[1:-1])
    out = locally_connected_output_shape(
        spatial, window, stride=stride, padding=padding, dilation=dilation
    )
    if tuple(w.shape[:rank]) != out:
        raise ValueError(
            f"w: expected out_spatial {out} in its first {rank} axes for input {tuple(x.shape)} "
            f"(window {window}, stride {stride}, padding {padding!r}, dilation {dilation}), got "
            f"kernel shape {tuple(w.shape)}"
        )
    if b is not None:
        check_array(b, "b")
        if tuple(b.shape) != (*out, c_out):
            raise ValueError(f"b: expected shape {(*out, c_out)}, got {tuple(b.shape)}")
    dtype = jnp.result_type(x, w) if b is None else jnp.result_type(x, w, b)
    # Computed in float32 or wider and rounded once: each pixel's gradient sums its cotangents
    # from every window holding it (summed in bfloat16, up to 220 ulps from the float32 result),
    # and the bias is added to the unrounded product.
    wide = float32_or_wider(dtype)
    x, w = x.astype(wide), w.astype(wide)
    pads = normalize_padding(padding, spatial, window, stride, dilation)
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    taps = []
    for offset in itertools.product(*(range(k) for k in window)):
        start = (0, *(o * d for o, d in zip(offset, dilation, strict=True)), 0)
        limit = (
            x.shape[0],
            *(s0 + (n - 1) * s + 1 for s0, n, s in zip(start[1:-1], out, stride, strict=True)),
            c_in,
        )
        taps.append(jax.lax.slice(x, start, limit, (1, *stride, 1)))
    positions = math.prod(out)
    taps_per_window = len(taps)
    patches = jnp.stack(taps, axis=-2).reshape(x.shape[0], positions, taps_per_window, c_in)
    kernel = w.reshape(positions, taps_per_window, c_in, c_out)
    y = jnp.einsum("npkc,pkco->npo", patches, kernel)
    y = y.reshape(x.shape[0], *out, c_out)
    return add_bias(y, b).astype(dtype)
