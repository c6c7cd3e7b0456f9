"""Dropout (Srivastava et al. 2014) with inverted scaling, and its channel-wise spatial variant."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jcnn.functional._checks import (
    check_array,
    check_bool,
    check_key,
    check_real,
    float32_or_wider,
)

__all__ = ["dropout", "spatial_dropout"]


def _check_dropout_args(key, x, rate, train, *, spatial: bool = False) -> float:
    """The checked arguments' ``rate`` as a Python float."""
    check_key(key)
    check_input(x, spatial=spatial)
    check_bool(train, "train")
    return check_real(rate, "rate", low=0, high=1)


def check_input(x, *, spatial: bool) -> None:
    """Raise unless ``x`` is what ``dropout`` (``spatial``: ``spatial_dropout``) takes, in training
    or not; the modules check it so in evaluation, where they call neither op."""
    check_array(x, "x")
    if spatial and x.ndim < 3:
        raise ValueError(
            f"x: expected rank >= 3 (N, *spatial, C) for spatial dropout, got rank {x.ndim} with "
            f"shape {tuple(x.shape)}; use dropout for (N, C) features"
        )


def _drop(key, x, rate, mask_shape):
    # x times the mask, as in PyTorch: a dropped NaN or infinity stays NaN rather than vanishing.
    if rate == 1:
        return x * jnp.zeros((), x.dtype)
    keep = jax.random.bernoulli(key, 1.0 - rate, mask_shape)
    # Multiply by the rounded reciprocal (XLA would rewrite a division so anyway), in float32 or
    # wider and rounded once: a reciprocal rounded to bfloat16 (1 / 0.9 to 1.109375, as PyTorch's
    # bfloat16 mask holds it) made the expected output 0.16% short of x.
    wide = float32_or_wider(x.dtype)
    scale = jnp.asarray(1.0 / (1.0 - rate), wide)
    return (x.astype(wide) * jnp.where(keep, scale, jnp.zeros((), wide))).astype(x.dtype)


def dropout(key: jax.Array, x: jax.Array, rate: float, *, train: bool = True) -> jax.Array:
    """Zero each element with probability ``rate``, multiply the kept ones by ``1 / (1 - rate)``.

    With this "inverted" scaling the expected output equals ``x``, so evaluation needs no
    rescaling: with ``train=False`` (or ``rate == 0``) the input comes back unchanged. ``rate == 1``
    drops everything and returns zeros (as PyTorch does), with a zero gradient. As in PyTorch, the
    input is multiplied by the mask, so a NaN or infinite input gives NaN even where dropped.

    Args:
        key: a ``jax.random`` key; the same key gives the same mask.
        x: floating array of any shape.
        rate: drop probability, a Python number in ``[0, 1]``.
        train: apply dropout (a Python bool); ``False`` returns ``x``.

    Returns:
        An array like ``x``.

    >>> y = dropout(jax.random.key(0), jnp.ones(1000), 0.25)
    >>> sorted({round(v, 4) for v in y.tolist()})
    [0.0, 1.3333]
    """
    rate = _check_dropout_args(key, x, rate, train)
    if not train or rate == 0:
        return x
    return _drop(key, x, rate, x.shape)


def spatial_dropout(key: jax.Array, x: jax.Array, rate: float, *, train: bool = True) -> jax.Array:
    """Drop whole channels (feature maps) of each example, scaling the kept ones by ``1/(1-rate)``.

    Neighbouring pixels of a feature map are strongly correlated, so elementwise dropout barely
    regularizes a conv layer; dropping entire maps does (Tompson et al. 2015). This is PyTorch's
    ``dropout1d/2d/3d`` for channels-last input: one Bernoulli draw per (example, channel), shared
    by every spatial position.

    Args:
        key: a ``jax.random`` key.
        x: floating array ``(N, *spatial, C)`` with at least one spatial axis.
        rate: drop probability of a channel, a Python number in ``[0, 1]``.
        train: apply dropout (a Python bool); ``False`` returns ``x``.

    Returns:
        An array like ``x``.

    >>> y = spatial_dropout(jax.random.key(1), jnp.ones((2, 3, 3, 4)), 0.5)
    >>> bool(((y == 0).all(axis=(1, 2)) | (y == 2).all(axis=(1, 2))).all())
    True
    """
    rate = _check_dropout_args(key, x, rate, train, spatial=True)
    if not train or rate == 0:
        return x
    return _drop(key, x, rate, (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],))
