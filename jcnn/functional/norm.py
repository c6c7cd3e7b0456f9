"""Normalization layers as pure functions: batch, layer, group, instance, local contrast and local
response normalization, and the folding of an inference-mode batch norm into the preceding conv.

All arrays are channels-last, ``(N, *spatial, C)``. Per-channel parameters (``scale``, ``bias``, the
running statistics) have shape ``(C,)``; ``scale`` or ``bias`` may be ``None`` (no affine part).
Statistics are computed in at least float32 (so float16/bfloat16 inputs are normalized accurately)
and in two passes, the variance as the mean squared deviation from the mean, never as
``E[x**2] - E[x]**2``, which cancels catastrophically for inputs with a large common offset. The
second pass also corrects the mean by the mean of the deviations (the corrected two-pass algorithm
of Chan, Golub and LeVeque), since a float32 mean of values near 1e4 can be off by ~1e-3. With the
native library (``jcnn.native``), float32 batch and instance norm in training read their input
once instead, summing in float64 (``_one_pass_moments``), and so do their derivative's two
reductions (``_norm_native``). Outputs keep the input's dtype; running
statistics keep the state's dtype.

Running averages follow the course notes and Flax:
``new = momentum * old + (1 - momentum) * batch``, so PyTorch's ``momentum=m`` is jcnn's ``1 - m``.
By default the running variance stores the biased batch variance (divided by the count, as in the
notes and Flax); ``unbiased_running_var=True`` stores the unbiased one (divided by count - 1), as
PyTorch does. Normalization itself always uses the biased batch variance, as every library does.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jcnn import native
from jcnn.functional import _norm_native
from jcnn.functional._checks import (
    as_int_tuple,
    check_array,
    check_bool,
    check_count,
    check_min_rank,
    check_real,
    float32_or_wider,
)

# While jcnn.analysis traces a per-example function (each example a batch of one), this holds the
# error message to raise if batch statistics are computed (they would be one example's own), also
# added to the error of an axis_name that no enclosing map binds.
PER_EXAMPLE_TRACE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "jcnn_per_example_trace", default=None
)

__all__ = [
    "BatchNormState",
    "batch_norm",
    "layer_norm",
    "group_norm",
    "instance_norm",
    "local_contrast_norm",
    "local_response_norm",
    "fold_batch_norm",
]


class BatchNormState(NamedTuple):
    """Running statistics of a batch (or instance) norm: per-channel ``mean`` and ``var`` (C,).

    >>> state = BatchNormState(jnp.zeros(3), jnp.ones(3))
    >>> state.var.shape
    (3,)
    """

    mean: jax.Array
    var: jax.Array


def batch_norm(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    state: BatchNormState,
    *,
    train: bool,
    momentum: float = 0.99,
    eps: float = 1e-5,
    axis_name: str | tuple[str, ...] | None = None,
    unbiased_running_var: bool = False,
) -> tuple[jax.Array, BatchNormState]:
    """Batch normalization over every axis but the last (channels), for inputs of any rank >= 2.

    In training, ``x`` is normalized with the statistics of the batch (mean and biased variance per
    channel) and the running statistics move toward them:
    ``new = momentum * old + (1 - momentum) * batch``; an empty batch leaves them unchanged, as in
    PyTorch. In evaluation, ``x`` is normalized with the running statistics and ``state`` comes
    back unchanged.

    Args:
      x: ``(N, *spatial, C)`` floating array.
      scale: ``(C,)`` multiplier (gamma), or ``None`` for 1.
      bias: ``(C,)`` offset (beta), or ``None`` for 0.
      state: ``BatchNormState(mean, var)`` of shape ``(C,)`` each: the running statistics.
      train: use (and update with) batch statistics if ``True``, running statistics if ``False``.
      momentum: decay of the running average, in [0, 1]; PyTorch's ``momentum=m`` is ``1 - m`` here.
      eps: added to the variance before the square root; must be > 0.
      axis_name: name (a str, or a tuple of them) of a mapped axis (``jax.vmap``, ``shard_map``,
        ``pmap``) over which the batch is split; the statistics are then those of the whole
        batch, averaged with ``lax.pmean`` in two passes (mean first, then the deviations from it).
        Every shard must hold the same number of examples.
      unbiased_running_var: store the unbiased batch variance (count / (count - 1) times the biased
        one, count over all shards) in the running average, as PyTorch does. Default ``False``: the
        biased variance, as in the course notes and Flax.

    Returns:
      ``(y, new_state)``: ``y`` has the shape and dtype of ``x``.

    >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
    >>> state = BatchNormState(jnp.zeros(2), jnp.ones(2))
    >>> y, state = batch_norm(x, None, None, state, train=True, momentum=0.9)
    >>> print(np.round(y, 3).tolist(), np.round(state.mean, 3).tolist())
    [[-1.0, -1.0], [1.0, 1.0]] [0.2, 2.0]
    """
    check_min_rank(x, "x", 2, "(N, ..., C)")
    channels = x.shape[-1]
    _check_channel_param(scale, "scale", channels)
    _check_channel_param(bias, "bias", channels)
    state = _check_state(state, "state", channels, required=True)
    momentum, eps = _check_running_options(train, momentum, eps, unbiased_running_var)
    _check_axis_name(axis_name)

    compute_dtype = float32_or_wider(x.dtype)
    xf = x.astype(compute_dtype)
    reduce_axes = tuple(range(x.ndim - 1))
    if train:
        if axis_name is None and (message := PER_EXAMPLE_TRACE.get()) is not None:
            raise ValueError(message)  # each example would be normalized by its own statistics
        count = math.prod(x.shape[:-1])
        if axis_name is not None:
            try:
                count *= lax.axis_size(axis_name)
            except NameError as error:  # JAX's "unbound axis name: b"
                # inside jcnn.analysis' per-example functions, say which of them map the axis
                ways_out = PER_EXAMPLE_TRACE.get()
                raise ValueError(
                    f"axis_name: expected the name of an axis mapped around this call (jax.vmap, "
                    f"shard_map or pmap with axis_name=...), got {axis_name!r} ({error})"
                    + (f"; {ways_out}" if ways_out else "")
                ) from None
        if count == 0:  # an empty batch, as in PyTorch: nothing to normalize, no statistics
            return _affine(xf, scale, bias).astype(x.dtype), state
        _check_batch_count(count, f"x has shape {tuple(x.shape)}")
        if axis_name is None:
            y, mean, var = _normalize(
                xf, *_channel_affine(scale, bias, x.ndim, compute_dtype), reduce_axes, eps
            )
        else:
            centered, mean, var = _moments(xf, reduce_axes, axis_name)
            y = _affine(centered * lax.rsqrt(var + eps), scale, bias)
        mean, var = mean.reshape(channels), var.reshape(channels)
        new_state = _update_running(
            state, mean, _running_var_sample(var, count, unbiased_running_var), momentum
        )
    else:
        mean, var = (s.astype(compute_dtype) for s in state)
        centered = xf - _expand_leading(mean, x.ndim)
        y = _affine(centered * _expand_leading(lax.rsqrt(var + eps), x.ndim), scale, bias)
        new_state = state
    return y.astype(x.dtype), new_state


def layer_norm(
    x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, *, eps: float = 1e-5
) -> jax.Array:
    """Layer normalization: each example normalized over all its axes (spatial and channels).

    This is the layer norm of the course notes and of Wu and He (2018): for images, statistics over
    ``(H, W, C)`` per example, i.e. ``torch.nn.LayerNorm([C, H, W])`` in PyTorch's layout (for
    ``(N, D)`` inputs it is the usual per-row normalization). Flax's ``nn.LayerNorm`` instead
    normalizes over the last axis only by default.

    Args:
      x: ``(N, *spatial, C)`` floating array (rank >= 2).
      scale: ``None``, a per-channel ``(C,)`` array (as in Wu and He, where it equals
        ``group_norm(..., num_groups=1)``), or an elementwise ``x.shape[1:]`` array (as in
        ``torch.nn.LayerNorm(normalized_shape)`` with ``elementwise_affine=True``).
      bias: ``None`` or an array of one of the same two shapes.
      eps: added to the variance before the square root; must be > 0.

    Returns:
      The normalized array, shape and dtype of ``x``.

    >>> y = layer_norm(jnp.array([[1.0, 2.0, 3.0]]), None, None)
    >>> print(np.round(y, 3).tolist())
    [[-1.225, 0.0, 1.225]]
    """
    check_min_rank(x, "x", 2, "(N, ..., C)")
    eps = _check_positive(eps, "eps")
    for value, name in ((scale, "scale"), (bias, "bias")):
        if value is None:
            continue
        check_array(value, name)
        if tuple(value.shape) not in {(x.shape[-1],), tuple(x.shape[1:])}:
            raise ValueError(
                f"{name}: expected shape (C,)=({x.shape[-1]},) or the per-example shape "
                f"{tuple(x.shape[1:])}, got {tuple(value.shape)}"
            )

    xf = x.astype(float32_or_wider(x.dtype))
    y = _standardize(xf, tuple(range(1, x.ndim)), eps)
    return _affine(y, scale, bias).astype(x.dtype)


def group_norm(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    num_groups: int,
    eps: float = 1e-5,
) -> jax.Array:
    """Group normalization (Wu and He, 2018): per example, over the spatial axes and each group of
    ``C // num_groups`` consecutive channels; matches ``torch.nn.functional.group_norm``.

    ``num_groups=1`` is the layer norm over ``(*spatial, C)``; ``num_groups=C`` is instance norm.

    Args:
      x: ``(N, *spatial, C)`` floating array (rank >= 2).
      scale: ``(C,)`` or ``None``.
      bias: ``(C,)`` or ``None``.
      num_groups: positive int dividing ``C``; each group must hold more than one value.
      eps: added to the variance before the square root; must be > 0.

    Returns:
      The normalized array, shape and dtype of ``x``.

    >>> y = group_norm(jnp.array([[1.0, 3.0, 10.0, 30.0]]), None, None, num_groups=2)
    >>> print(np.round(y, 3).tolist())
    [[-1.0, 1.0, -1.0, 1.0]]
    """
    check_min_rank(x, "x", 2, "(N, ..., C)")
    channels = x.shape[-1]
    _check_channel_param(scale, "scale", channels)
    _check_channel_param(bias, "bias", channels)
    eps = _check_positive(eps, "eps")
    num_groups = check_count(num_groups, "num_groups")
    if channels % num_groups:
        raise ValueError(
            f"num_groups: must divide the number of channels C={channels}, got {num_groups}"
        )

    group_size = math.prod(x.shape[1:-1]) * (channels // num_groups)
    if group_size == 1 and x.size:  # every output would be the bias (the value minus itself)
        raise ValueError(
            f"x: expected more than 1 value per group, got 1 (x has shape {tuple(x.shape)} and "
            f"num_groups={num_groups}); statistics over one value normalize it to 0"
        )
    xf = x.astype(float32_or_wider(x.dtype))
    grouped = xf.reshape(*x.shape[:-1], num_groups, channels // num_groups)
    reduce_axes = (*range(1, x.ndim - 1), x.ndim)
    y = _standardize(grouped, reduce_axes, eps).reshape(x.shape)
    return _affine(y, scale, bias).astype(x.dtype)


def instance_norm(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    state: BatchNormState | None = None,
    *,
    train: bool = True,
    momentum: float = 0.99,
    eps: float = 1e-5,
    unbiased_running_var: bool = False,
) -> jax.Array | tuple[jax.Array, BatchNormState]:
    """Instance normalization: each example and channel normalized over the spatial axes.

    Without ``state`` it always uses the statistics of each instance and returns ``y``. With a
    ``state`` (PyTorch's ``track_running_stats=True``) it returns ``(y, new_state)``: in training
    it uses the instance statistics and moves the running ones toward their average over the batch
    (``new = momentum * old + (1 - momentum) * batch``); in evaluation it normalizes every instance
    with the running statistics and returns ``state`` unchanged.

    Args:
      x: ``(N, *spatial, C)`` floating array (rank >= 3).
      scale: ``(C,)`` or ``None``.
      bias: ``(C,)`` or ``None``.
      state: ``None`` or ``BatchNormState(mean, var)`` of shape ``(C,)`` each.
      train: with a ``state``, whether to use instance statistics and update the running ones.
      momentum: decay of the running average, in [0, 1]; PyTorch's ``momentum=m`` is ``1 - m`` here.
      eps: added to the variance before the square root; must be > 0.
      unbiased_running_var: store the average of the instances' unbiased variances (divided by
        the number of spatial positions - 1), as PyTorch does; default ``False``: biased ones.

    Returns:
      ``y`` (shape and dtype of ``x``) when ``state`` is ``None``, else ``(y, new_state)``.

    >>> x = jnp.array([[[1.0], [3.0]], [[10.0], [30.0]]])
    >>> print(np.round(instance_norm(x, None, None)[..., 0], 3).tolist())
    [[-1.0, 1.0], [-1.0, 1.0]]
    """
    check_min_rank(x, "x", 3, "(N, *spatial, C)")
    channels = x.shape[-1]
    _check_channel_param(scale, "scale", channels)
    _check_channel_param(bias, "bias", channels)
    state = _check_state(state, "state", channels, required=False)
    momentum, eps = _check_running_options(train, momentum, eps, unbiased_running_var)

    compute_dtype = float32_or_wider(x.dtype)
    xf = x.astype(compute_dtype)
    spatial_axes = tuple(range(1, x.ndim - 1))
    if math.prod(x.shape[:-1]) == 0:  # an empty batch: no statistics, as in batch_norm
        y = _affine(xf, scale, bias).astype(x.dtype)
        return y if state is None else (y, state)
    if state is None or train:
        _check_batch_count(
            math.prod(x.shape[1:-1]),
            f"instance statistics over the spatial axes of {tuple(x.shape)}",
        )
    if state is not None and not train:
        mean, var = (_expand_leading(s.astype(compute_dtype), x.ndim) for s in state)
        y = (xf - mean) * lax.rsqrt(var + eps)
        return _affine(y, scale, bias).astype(x.dtype), state

    y, mean, var = _normalize(
        xf, *_channel_affine(scale, bias, x.ndim, compute_dtype), spatial_axes, eps
    )
    y = y.astype(x.dtype)
    if state is None:
        return y
    count = math.prod(x.shape[1:-1])
    instance_var = _running_var_sample(var, count, unbiased_running_var)
    batch_axes = (0, *spatial_axes)
    new_state = _update_running(
        state, jnp.mean(mean, axis=batch_axes), jnp.mean(instance_var, axis=batch_axes), momentum
    )
    return y, new_state


def local_contrast_norm(
    x: jax.Array,
    *,
    size: int | Sequence[int] = 9,
    sigma: float | None = None,
    eps: float = 1e-4,
) -> jax.Array:
    """Local contrast normalization of Jarrett et al. (2009): subtractive, then divisive.

    With ``i`` indexing channels, ``(j, k)`` positions and ``w`` a Gaussian window normalized so
    that ``sum_{i,p,q} w_pq = 1`` over space *and* channels (so the local mean and deviation are
    shared by all channels of a position):

    * subtractive: ``v_ijk = x_ijk - sum_{i,p,q} w_pq x_{i, j+p, k+q}``;
    * divisive: ``y_ijk = v_ijk / max(c, sigma_jk)`` with the local deviation
      ``sigma_jk = sqrt(sum_{i,p,q} w_pq v_{i, j+p, k+q}**2)`` and ``c = mean_{j,k}(sigma_jk)``
      per example, as in Jarrett et al. (the course notes call ``c`` a small constant; here that
      role is played by ``eps``, the floor of the divisor: ``max(c, sigma_jk, eps)``).

    Borders: a window reaching outside the image uses only the pixels inside, with the weights
    renormalized by the window mass inside the image (a zero-padded filtering divided by the
    filtering of ones), so the local mean of a constant image is that constant everywhere. The
    window may be larger than the image.

    Args:
      x: ``(N, *spatial, C)`` floating array with 1 to 3 spatial axes.
      size: odd window width, an int or one per spatial axis.
      sigma: standard deviation of the Gaussian in pixels (> 0); ``None``: a quarter of the width
        (``size / 4`` per axis).
      eps: floor of the divisor, > 0; avoids dividing by zero on flat inputs.

    Returns:
      The normalized array, shape and dtype of ``x``.

    >>> flat = jnp.full((1, 5, 5, 2), 7.0)  # no contrast at all: exactly zero
    >>> print(float(jnp.abs(local_contrast_norm(flat, size=3)).max()))
    0.0
    """
    check_min_rank(x, "x", 3, "(N, *spatial, C)")
    if x.ndim > 5:
        raise ValueError(
            f"x: expected 1 to 3 spatial axes (rank 3 to 5), got rank {x.ndim} "
            f"with shape {tuple(x.shape)}"
        )
    num_spatial = x.ndim - 2
    window = as_int_tuple(size, num_spatial, "size", minimum=1)
    if any(k % 2 == 0 for k in window):
        raise ValueError(f"size: expected odd window widths, got {size!r}")
    if sigma is None:
        sigmas = tuple(k / 4 for k in window)
    else:
        sigmas = (_check_positive(sigma, "sigma"),) * num_spatial
    eps = _check_positive(eps, "eps")

    spatial_shape = x.shape[1:-1]
    taps = [
        _gaussian_taps(k, s, max(n - 1, 0))
        for k, s, n in zip(window, sigmas, spatial_shape, strict=True)
    ]
    compute_dtype = float32_or_wider(x.dtype)
    xf = x.astype(compute_dtype)
    mass = _separable_filter(jnp.ones((1, *spatial_shape), compute_dtype), taps)

    # Removing the example's global mean first changes nothing mathematically (the renormalized
    # window sums to 1) but keeps the local mean exact for flat inputs and large offsets.
    spatial_axes = tuple(range(1, num_spatial + 1))
    xf = xf - jnp.mean(xf, axis=(*spatial_axes, x.ndim - 1), keepdims=True)
    local_mean = _separable_filter(jnp.mean(xf, axis=-1), taps) / mass
    centered = xf - local_mean[..., None]
    local_var = _separable_filter(jnp.mean(jnp.square(centered), axis=-1), taps) / mass
    local_std = _safe_sqrt(local_var)
    contrast = jnp.mean(local_std, axis=spatial_axes, keepdims=True)
    divisor = jnp.maximum(jnp.maximum(contrast, local_std), eps)
    return (centered / divisor[..., None]).astype(x.dtype)


def local_response_norm(
    x: jax.Array, size: int, *, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0
) -> jax.Array:
    """Local response normalization across channels (Krizhevsky et al., 2012, AlexNet).

    ``y_c = x_c / (k + alpha * sum_{c'} x_{c'}**2) ** beta`` with ``c'`` over the ``size`` channels
    ``c - size // 2, ..., c + (size - 1) // 2`` that exist (centred for odd ``size``).
    ``alpha`` multiplies the sum directly, as in the AlexNet paper (whose setting is ``size=5,
    alpha=1e-4, beta=0.75, k=2``). PyTorch divides its ``alpha`` by ``size``: jcnn's
    ``alpha`` equals PyTorch's ``alpha / size``.

    Args:
      x: ``(N, ..., C)`` floating array (rank >= 2).
      size: number of channels in the window, a positive int.
      alpha: scale of the sum of squares, >= 0.
      beta: exponent.
      k: additive constant, > 0 (so that the base of the power stays positive).

    Returns:
      The normalized array, shape and dtype of ``x``.

    >>> y = local_response_norm(jnp.ones((1, 3)), 3, alpha=1.0, beta=1.0, k=1.0)
    >>> print(np.round(y, 3).tolist())
    [[0.333, 0.25, 0.333]]
    """
    check_min_rank(x, "x", 2, "(N, ..., C)")
    size = check_count(size, "size")
    alpha = check_real(alpha, "alpha", low=0)
    beta = check_real(beta, "beta")
    k = _check_positive(k, "k")

    xf = x.astype(float32_or_wider(x.dtype))
    # a window reaching past every channel sums the same channels as one reaching just past
    # them: clipped there (exactly, the rest is zero padding), a size of 2**62 no longer sums
    # 2**62 zeros per output (it ran without end)
    reach = max(x.shape[-1] - 1, 0)
    before, after = min(size // 2, reach), min((size - 1) // 2, reach)
    window = (1,) * (x.ndim - 1) + (before + after + 1,)
    padding = ((0, 0),) * (x.ndim - 1) + ((before, after),)
    # A NumPy (concrete) init value: lax then picks its differentiable windowed-sum primitive. A
    # traced jnp zero, as under jit, selects the generic reduce_window, which has no JVP.
    sum_squares = lax.reduce_window(
        jnp.square(xf), np.zeros((), xf.dtype), lax.add, window, (1,) * x.ndim, padding
    )
    return (xf * (k + alpha * sum_squares) ** -beta).astype(x.dtype)


def fold_batch_norm(
    w: jax.Array,
    b: jax.Array | None,
    scale: jax.Array | None,
    bias: jax.Array | None,
    state: BatchNormState,
    *,
    eps: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
    """Fold an inference-mode batch norm into the conv (or dense layer) before it.

    ``batch_norm(conv(x, w, b), scale, bias, state, train=False)`` equals
    ``conv(x, w_folded, b_folded)`` with ``f = scale / sqrt(state.var + eps)``,
    ``w_folded = w * f`` along the output-channel (last) axis and
    ``b_folded = (b - state.mean) * f + bias``.

    Args:
      w: ``conv`` kernel ``(*window, C_in // groups, C_out)`` or dense kernel ``(D_in, C_out)``
        (not a ``conv_transpose`` kernel with groups, whose last axis is ``C_out // groups``).
      b: ``(C_out,)`` conv bias, or ``None`` for 0.
      scale: ``(C_out,)`` batch-norm multiplier, or ``None`` for 1.
      bias: ``(C_out,)`` batch-norm offset, or ``None`` for 0.
      state: ``BatchNormState`` with the running statistics, shape ``(C_out,)`` each.
      eps: the batch norm's ``eps``, > 0.

    Returns:
      ``(w_folded, b_folded)`` in the dtype of ``w``; ``b_folded`` is always an array.

    >>> state = BatchNormState(jnp.array([1.0, 2.0]), jnp.array([4.0, 16.0]))
    >>> w, b = fold_batch_norm(jnp.ones((1, 1, 1, 2)), None, None, jnp.array([0.5, 0.0]), state,
    ...                        eps=0.01)
    >>> print(np.round(w.ravel(), 3).tolist(), np.round(b, 3).tolist())
    [0.499, 0.25] [0.001, -0.5]
    """
    check_min_rank(w, "w", 2, "(*window, C_in // groups, C_out)")
    channels = w.shape[-1]
    for value, name in ((b, "b"), (scale, "scale"), (bias, "bias")):
        _check_channel_param(value, name, channels, label="C_out")
    state = _check_state(state, "state", channels, required=True, label="C_out")
    eps = _check_positive(eps, "eps")

    compute_dtype = float32_or_wider(w.dtype)
    mean, var = (s.astype(compute_dtype) for s in state)
    factor = lax.rsqrt(var + eps)
    if scale is not None:
        factor = factor * scale.astype(compute_dtype)
    w_folded = w.astype(compute_dtype) * _expand_leading(factor, w.ndim)
    b_folded = -mean if b is None else b.astype(compute_dtype) - mean
    b_folded = b_folded * factor
    if bias is not None:
        b_folded = b_folded + bias.astype(compute_dtype)
    return w_folded.astype(w.dtype), b_folded.astype(w.dtype)


def _expand_leading(values, ndim: int):
    """``values`` (e.g. a ``(C,)`` vector) with leading unit axes up to rank ``ndim``, so that it
    broadcasts against a channels-last array (explicitly: rank promotion is off)."""
    return values.reshape((1,) * (ndim - values.ndim) + values.shape)


def _channel_affine(scale, bias, ndim: int, dtype):
    """Per-channel ``scale`` and ``bias`` (``None``: 1 and 0) as rank-``ndim`` arrays."""
    scale = jnp.ones((), dtype) if scale is None else scale.astype(dtype)
    bias = jnp.zeros((), dtype) if bias is None else bias.astype(dtype)
    return _expand_leading(scale, ndim), _expand_leading(bias, ndim)


def _affine(y, scale, bias):
    if scale is not None:
        y = y * _expand_leading(scale.astype(y.dtype), y.ndim)
    if bias is not None:
        y = y + _expand_leading(bias.astype(y.dtype), y.ndim)
    return y


def _moments(x, axes: tuple[int, ...], axis_name=None):
    """``(x - mean, mean, biased variance)`` over ``axes`` (kept as unit dims), in two passes.

    The second pass averages the deviations ``d = x - mean`` and their squares: the mean of ``d``
    is the rounding error of the first mean (small, but squared it would bias the variance and
    shift every output), so it is added back to the mean and removed from the deviations.
    ``axis_name`` extends every average over the shards of a mapped axis.
    """
    mean = jnp.mean(x, axis=axes, keepdims=True)
    if axis_name is not None:
        mean = lax.pmean(mean, axis_name)
    deviation = x - mean
    correction = jnp.mean(deviation, axis=axes, keepdims=True)
    mean_square = jnp.mean(jnp.square(deviation), axis=axes, keepdims=True)
    if axis_name is not None:
        correction, mean_square = lax.pmean((correction, mean_square), axis_name)
    var = jnp.maximum(mean_square - jnp.square(correction), 0.0)
    return deviation - correction, mean + correction, var


class _Centered:
    """``x`` minus its mean over ``axes``, with the statistics and the two operations batch norm's
    derivative needs: ``sums(t) = (sum(t * centered), sum(t))`` and ``affine(a, b) = centered * a
    + b``. XLA's ``_moments`` and reductions, or, for float32 statistics over consecutive axes
    ending just before the channels (batch and instance norm) with the native backend chosen
    (``jcnn.native.conv_backend``), one pass each through jcnn's native library on CPU
    (``_norm_native``): the moments summed in float64, exact to float32 rounding."""

    def __init__(self, x, axes: tuple[int, ...]):
        self.axes = axes
        self.first_axis = None
        if (
            axes
            and axes == tuple(range(axes[0], x.ndim - 1))
            and x.dtype == jnp.float32
            and native.conv_backend() == "onednn"
        ):
            self.first_axis = axes[0]
            self.mean, self.mean_residual, self.var = _one_pass_moments(x, self.first_axis)
            self.values = (x - self.mean) - self.mean_residual
            self.native_operands = (x, self.mean, self.mean_residual)
        else:
            self.values, self.mean, self.var = _moments(x, axes)

    def sums(self, t):
        if self.first_axis is None:
            return tuple(jnp.sum(v, axis=self.axes, keepdims=True) for v in (t * self.values, t))
        return _norm_native.centered_sums(t, *self.native_operands, first_axis=self.first_axis)

    def affine(self, a, b):
        if self.first_axis is None:
            return self.values * a + b
        return _norm_native.centered_affine(a, b, *self.native_operands, first_axis=self.first_axis)


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _one_pass_moments(x, first_axis: int):
    """``(mean, mean_residual, var)`` over the axes from ``first_axis`` to the channels (kept as
    unit dims): the biased variance, and the mean as a float32 value plus what it misses of the
    exact one. From ``jcnn/native/channel_moments.cc`` on CPU, which reads ``x`` once and sums in
    float64 (XLA's ``_moments`` takes three or four passes; see
    ``experiments/benchmarks/README.md``), and ``_moments`` elsewhere."""
    axes = tuple(range(first_axis, x.ndim - 1))

    def elsewhere(x):
        _, mean, var = _moments(x, axes)
        return mean, jnp.zeros_like(mean), var

    return lax.platform_dependent(
        x, cpu=partial(_norm_native.moments_on_cpu, first_axis=first_axis), default=elsewhere
    )


@_one_pass_moments.defjvp
def _one_pass_moments_jvp(first_axis, primals, tangents):
    (x,), (dx,) = primals, tangents
    mean, mean_residual, var = moments = _one_pass_moments(x, first_axis)
    sum_centered, sum_plain = _norm_native.centered_sums(
        dx, x, mean, mean_residual, first_axis=first_axis
    )
    count = math.prod(x.shape[first_axis:-1])
    return moments, (sum_plain / count, jnp.zeros_like(mean_residual), 2 * sum_centered / count)


def _standardize(x, axes: tuple[int, ...], eps: float):
    """``(x - mean) / sqrt(var + eps)`` over ``axes``."""
    one = jnp.ones((1,) * x.ndim, x.dtype)
    return _normalize(x, one, jnp.zeros_like(one), axes, eps)[0]


@partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _normalize(x, scale, bias, axes: tuple[int, ...], eps: float):
    """``(scale * (x - mean) / sqrt(var + eps) + bias, mean, var)``, statistics over ``axes``.

    ``scale`` and ``bias`` broadcast against ``x`` and are constant along ``axes`` (per-channel
    for batch and instance norm; ones and zeros otherwise, the affine applied outside). The values
    are ``_moments``'. The derivative
    is given in closed form, ``dx_hat = (dx - mean(dx) - x_hat mean(x_hat dx)) / sqrt(var + eps)``,
    instead of being differentiated through the two-pass statistics: its transpose (the gradient)
    is then two reductions and one elementwise pass over ``x``, where autodiff of the statistics
    took several more (see ``experiments/benchmarks/README.md``). A JVP rule, not a VJP one, so
    forward mode (``jax.jvp``, Hessian-vector products) keeps working.
    """
    centered = _Centered(x, axes)
    y = centered.values * lax.rsqrt(centered.var + eps) * scale + bias
    return y, centered.mean, centered.var


@_normalize.defjvp
def _normalize_jvp(axes, eps, primals, tangents):
    x, scale, bias = primals
    dx, dscale, dbias = tangents
    centered = _Centered(x, axes)
    inverse_std = lax.rsqrt(centered.var + eps)
    count = math.prod(x.shape[axis] for axis in axes)
    # Written so that the transpose (the gradient) reduces the cotangent g itself: sum(g) and
    # sum(g * x_hat), the two sums dbias and dscale need too, then one elementwise pass. Both
    # reductions read dx (mean(x_hat) = 0 makes mean(x_hat * (dx - d_mean)) = mean(x_hat * dx)),
    # and the per-channel gain multiplies their results, which needs scale constant along axes.
    # The per-channel terms meet the full-size arrays combined (offset, slope) in one affine map
    # of the centered x, whose transpose is exactly those two reductions (XLA did not merge them
    # when they were separate; the native library makes them one pass).
    sum_centered, sum_plain = centered.sums(dx)
    d_mean = sum_plain / count
    d_spread = sum_centered * inverse_std / count  # mean(x_hat * dx): d var / 2, times 1/std
    gain = scale * inverse_std
    offset = dbias - gain * d_mean
    slope = dscale - gain * d_spread
    d_y = gain * dx + centered.affine(slope * inverse_std, offset)
    y = centered.values * inverse_std * scale + bias
    return (y, centered.mean, centered.var), (d_y, d_mean, 2 * sum_centered / count)


def _running_var_sample(var, count: int, unbiased: bool):
    """The variance the running average receives: biased, or corrected by count / (count - 1)
    (``count >= 2``, checked by the callers)."""
    if not unbiased:
        return var
    return var * (count / (count - 1))


def _update_running(state: BatchNormState, mean, var, momentum: float) -> BatchNormState:
    def blend(old, new):
        updated = momentum * old.astype(new.dtype) + (1 - momentum) * new
        return updated.astype(old.dtype)

    return BatchNormState(blend(state.mean, mean), blend(state.var, var))


def _gaussian_taps(width: int, sigma: float, reach: int) -> np.ndarray:
    """The normalized Gaussian taps of a window ``width`` wide, cut to the offsets within
    ``reach`` of its centre: farther ones only ever weigh zero padding, whose weight the border
    renormalization divides out (a window of 2**31 taps no longer fills the memory)."""
    half = min(width // 2, reach)
    offsets = np.arange(-half, half + 1)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def _separable_filter(z, taps):
    """Zero-padded 'same' filtering of ``z`` ``(N, *spatial)`` by the outer product of ``taps``."""
    out = z[:, None]
    num_spatial = len(taps)
    for axis, axis_taps in enumerate(taps):
        kernel_shape = [1] * num_spatial
        kernel_shape[axis] = axis_taps.size
        kernel = jnp.asarray(axis_taps.reshape(1, 1, *kernel_shape), out.dtype)
        padding = [(0, 0)] * num_spatial
        padding[axis] = (axis_taps.size // 2, axis_taps.size // 2)
        out = lax.conv_general_dilated(
            out, kernel, (1,) * num_spatial, padding, precision=lax.Precision.HIGHEST
        )
    return out[:, 0]


def _safe_sqrt(values):
    """``sqrt`` whose gradient at 0 is 0 rather than infinite (flat regions of an image)."""
    positive = values > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, values, 1.0)), 0.0)


def _check_channel_param(value, name: str, channels: int, *, label: str = "C") -> None:
    if value is None:
        return
    check_array(value, name)
    if tuple(value.shape) != (channels,):
        raise ValueError(
            f"{name}: expected shape ({label},)=({channels},), got {tuple(value.shape)}"
        )


def _check_state(state, name: str, channels: int, *, required: bool, label: str = "C"):
    if state is None:
        if required:
            raise TypeError(f"{name}: expected a BatchNormState(mean, var), got None")
        return None
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(f"{name}: expected a BatchNormState(mean, var), got {type(state).__name__}")
    state = BatchNormState(*state)
    for field in BatchNormState._fields:
        _check_channel_param(getattr(state, field), f"{name}.{field}", channels, label=label)
    return state


def _check_axis_name(axis_name) -> None:
    """Raise unless ``axis_name`` is None, a str or a non-empty tuple of str: JAX takes an int
    for a positional axis of the array, which is not what a mapped axis name means here."""
    if axis_name is None or isinstance(axis_name, str):
        return
    if (
        not isinstance(axis_name, tuple)
        or not axis_name
        or not all(isinstance(name, str) for name in axis_name)
    ):
        raise TypeError(
            "axis_name: expected None, the name (a str) of an axis mapped around this call by "
            f"jax.vmap, shard_map or pmap, or a non-empty tuple of such names, got {axis_name!r}"
        )


def _check_running_options(train, momentum, eps, unbiased_running_var) -> tuple[float, float]:
    """The keyword arguments shared by ``batch_norm`` and ``instance_norm``: ``(momentum, eps)``
    as Python floats."""
    check_bool(train, "train")
    momentum = check_real(momentum, "momentum", low=0, high=1)
    eps = _check_positive(eps, "eps")
    check_bool(unbiased_running_var, "unbiased_running_var")
    return momentum, eps


def _check_positive(value, name: str) -> float:
    """A finite number > 0 (``eps``, ``k``, ``sigma``): infinity would silently zero the output."""
    return check_real(value, name, low=0, low_open=True)


def _check_batch_count(count: int, what: str) -> None:
    """Batch statistics need two values per channel: from one, every output is exactly 0 (the
    value minus itself) and the variance 0, as PyTorch refuses too; from none, NaN."""
    if count < 2:
        raise ValueError(
            f"x: expected more than 1 value per channel when training ({what}), got {count}; "
            "use train=False (running statistics) for a single example"
        )
