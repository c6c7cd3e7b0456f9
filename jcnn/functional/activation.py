"""Elementwise activations and maxout, channels-last.

Each function matches ``torch.nn.functional`` in value and gradient, including the gradient at
exactly ``x == 0``, where PyTorch takes the negative branch: ``relu``, ``leaky_relu``, ``prelu``
and ``elu`` have the gradient of their negative part there.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jcnn.functional._checks import (
    check_array,
    check_bool,
    check_positive_int,
    check_real_or_traced,
)

__all__ = [
    "elu",
    "gelu",
    "leaky_relu",
    "maxout",
    "mish",
    "prelu",
    "rectify",
    "relu",
    "selu",
    "sigmoid",
    "silu",
    "softplus",
    "swish",
    "tanh",
]


def _check_real(value, name: str, **bounds):
    """A real number or a 0-d real array (which may be traced, and is then not range-checked)."""
    return check_real_or_traced(value, name, **bounds)


def relu(x: jax.Array) -> jax.Array:
    """Rectified linear unit ``max(0, x)``.

    Args:
        x: floating array of any shape.

    Returns:
        An array like ``x``.

    >>> relu(jnp.array([-1.0, 0.0, 2.0])).tolist()
    [0.0, 0.0, 2.0]
    """
    check_array(x, "x")
    return jax.nn.relu(x)


def leaky_relu(x: jax.Array, negative_slope: ArrayLike = 0.01) -> jax.Array:
    """Leaky ReLU ``x if x > 0 else negative_slope * x``.

    Args:
        x: floating array of any shape.
        negative_slope: slope of the negative part (a number or a 0-d array).

    Returns:
        An array like ``x``.

    >>> leaky_relu(jnp.array([-2.0, 3.0]), 0.5).tolist()
    [-1.0, 3.0]
    """
    check_array(x, "x")
    negative_slope = _check_real(negative_slope, "negative_slope")
    return jnp.where(x > 0, x, negative_slope * x)


def prelu(x: jax.Array, alpha: ArrayLike) -> jax.Array:
    """Parametric ReLU ``x if x > 0 else alpha * x`` with a learned slope.

    Args:
        x: floating array ``(..., C)``, channels last.
        alpha: the slope: a number or an array of shape ``()`` or ``(1,)``, shared by every
            channel, or one per channel, shape ``(C,)``, broadcast along the last axis of ``x``
            (PyTorch's ``weight``, which it applies along axis 1 of channels-first input).

    Returns:
        An array like ``x`` (of its dtype: ``alpha`` is cast to it).

    >>> prelu(jnp.array([[-2.0, -2.0], [1.0, 1.0]]), jnp.array([0.5, 0.25])).tolist()
    [[-1.0, -0.5], [1.0, 1.0]]
    """
    check_array(x, "x")
    if isinstance(alpha, (int, float, np.integer, np.floating)) and not isinstance(alpha, bool):
        alpha = jnp.asarray(alpha, x.dtype)
    check_array(alpha, "alpha", ndim=(0, 1))
    if x.ndim == 0 and alpha.shape not in ((), (1,)):
        raise ValueError(f"alpha: expected shape () or (1,) for a 0-d x, got {tuple(alpha.shape)}")
    if x.ndim > 0 and alpha.ndim == 1 and alpha.shape[0] not in (1, x.shape[-1]):
        raise ValueError(
            f"alpha: expected shape (), (1,) or ({x.shape[-1]},) (the channels, last axis of x "
            f"with shape {tuple(x.shape)}), got {tuple(alpha.shape)}"
        )
    slope = (alpha.reshape(()) if alpha.shape == (1,) else alpha).astype(x.dtype)
    if slope.ndim == 1:
        slope = slope.reshape((1,) * (x.ndim - 1) + slope.shape)
    return jnp.where(x > 0, x, slope * x)


def elu(x: jax.Array, alpha: ArrayLike = 1.0) -> jax.Array:
    """Exponential linear unit ``x if x > 0 else alpha * (exp(x) - 1)`` (Clevert et al. 2015).

    Args:
        x: floating array of any shape.
        alpha: saturation value of the negative part is ``-alpha``.

    Returns:
        An array like ``x``.

    >>> [round(v, 4) for v in elu(jnp.array([-1.0, 2.0])).tolist()]
    [-0.6321, 2.0]
    """
    check_array(x, "x")
    alpha = _check_real(alpha, "alpha")
    return jax.nn.elu(x, alpha)


def selu(x: jax.Array) -> jax.Array:
    """Scaled ELU (Klambauer et al. 2017) with the self-normalizing constants PyTorch uses.

    Args:
        x: floating array of any shape.

    Returns:
        An array like ``x``: ``1.0507 * elu(x, alpha=1.6733)``.
    """
    check_array(x, "x")
    return jax.nn.selu(x)


def gelu(x: jax.Array, *, approximate: bool = False) -> jax.Array:
    """Gaussian error linear unit ``x * Phi(x)`` (Hendrycks and Gimpel 2016).

    Unlike ``jax.nn.gelu`` (tanh approximation by default), the default is the exact erf form, as
    in PyTorch (``approximate='none'``); ``approximate=True`` is PyTorch's ``approximate='tanh'``.

    Args:
        x: floating array of any shape.
        approximate: use the tanh approximation instead of the exact erf.

    Returns:
        An array like ``x``.

    >>> [round(v, 4) for v in gelu(jnp.array([-1.0, 1.0])).tolist()]
    [-0.1587, 0.8413]
    """
    check_array(x, "x")
    check_bool(approximate, "approximate")
    if approximate:
        return jax.nn.gelu(x, approximate=True)
    # Autodiff of erfc stores several intermediates and XLA splits forward and backward into
    # several passes over memory; recomputing GELU from x in the backward pass (jax.checkpoint)
    # leaves one fused pass each way: 1.4-1.8x faster between two matrix products, ConvNeXt's
    # training step 1.07-1.14x (experiments/benchmarks/README.md, run L). Same values and
    # derivatives.
    return jax.checkpoint(partial(jax.nn.gelu, approximate=False))(x)


def swish(x: jax.Array) -> jax.Array:
    """Swish ``x * sigmoid(x)`` (Ramachandran et al. 2017), PyTorch's ``silu``.

    Args:
        x: floating array of any shape.

    Returns:
        An array like ``x``.

    >>> [round(v, 4) for v in swish(jnp.array([-1.0, 1.0])).tolist()]
    [-0.2689, 0.7311]
    """
    check_array(x, "x")
    return jax.nn.silu(x)


silu = swish


def mish(x: jax.Array) -> jax.Array:
    """Mish ``x * tanh(softplus(x))`` (Misra 2019).

    Args:
        x: floating array of any shape.

    Returns:
        An array like ``x``.
    """
    check_array(x, "x")
    return jax.nn.mish(x)


def maxout(x: jax.Array, num_pieces: int) -> jax.Array:
    """Maxout over the channel axis (Goodfellow et al. 2013): the max of each group of channels.

    The ``C`` channels form ``C // num_pieces`` groups of ``num_pieces`` *consecutive* channels:
    output channel ``j`` is ``max(x[..., j * num_pieces : (j + 1) * num_pieces])``. In PyTorch's
    channels-first layout this is ``x.view(N, C // num_pieces, num_pieces, H, W).amax(2)``.
    The affine maps ``w_i^T x + b_i`` of the maxout unit are the preceding conv or dense layer, with
    ``num_pieces`` times as many output channels.

    Args:
        x: floating array ``(..., C)``, channels last, rank >= 1.
        num_pieces: number of channels per group; must divide ``C``.

    Returns:
        An array ``(..., C // num_pieces)``.

    >>> maxout(jnp.array([[1.0, 4.0, 3.0, 2.0]]), 2).tolist()
    [[4.0, 3.0]]
    """
    check_array(x, "x")
    if x.ndim == 0:
        raise ValueError("x: expected rank >= 1 with channels on the last axis, got a 0-d array")
    num_pieces = check_positive_int(num_pieces, "num_pieces")
    channels = x.shape[-1]
    if channels % num_pieces:
        raise ValueError(
            f"num_pieces: the {channels} channels (last axis of x with shape {tuple(x.shape)}) "
            f"must divide by num_pieces, got {num_pieces}"
        )
    grouped = x.reshape(*x.shape[:-1], channels // num_pieces, num_pieces)
    return jnp.max(grouped, axis=-1)


def rectify(x: jax.Array) -> jax.Array:
    """Absolute-value rectification ``|x|`` (Jarrett et al. 2009), blind to the sign of a feature.

    Args:
        x: floating array of any shape.

    Returns:
        An array like ``x``; its gradient at ``0`` is ``0``.

    >>> rectify(jnp.array([-2.0, 0.0, 3.0])).tolist()
    [2.0, 0.0, 3.0]
    """
    check_array(x, "x")
    # sign(x) * x rather than abs(x): its gradient at 0 is 0, as in PyTorch (lax.abs gives 1).
    return jnp.sign(x) * x


def sigmoid(x: jax.Array) -> jax.Array:
    """Logistic sigmoid ``1 / (1 + exp(-x))``.

    Args:
        x: floating array of any shape.

    Returns:
        An array like ``x`` with values in ``[0, 1]``.

    >>> sigmoid(jnp.array([0.0])).tolist()
    [0.5]
    """
    check_array(x, "x")
    return jax.nn.sigmoid(x)


def tanh(x: jax.Array) -> jax.Array:
    """Hyperbolic tangent.

    Args:
        x: floating array of any shape.

    Returns:
        An array like ``x`` with values in ``[-1, 1]``.
    """
    check_array(x, "x")
    return jnp.tanh(x)


def softplus(x: jax.Array, beta: ArrayLike = 1.0, threshold: ArrayLike | None = 20.0) -> jax.Array:
    """Softplus ``log(1 + exp(beta * x)) / beta``, linear where ``beta * x > threshold``.

    Matches PyTorch's ``softplus(x, beta, threshold)``; the log-sum-exp form is stable for any
    ``x``, so the threshold only decides where the output is exactly ``x``.

    Args:
        x: floating array of any shape.
        beta: sharpness (a positive number).
        threshold: above ``beta * x > threshold`` the output is ``x``; ``None`` never switches.

    Returns:
        An array like ``x``.

    >>> [round(v, 4) for v in softplus(jnp.array([0.0, 30.0])).tolist()]
    [0.6931, 30.0]
    """
    check_array(x, "x")
    beta = _check_real(beta, "beta", low=0, low_open=True)
    smooth = jnp.logaddexp(beta * x, jnp.zeros_like(x)) / beta
    if threshold is None:
        return smooth
    threshold = _check_real(threshold, "threshold", finite=False)
    return jnp.where(beta * x > threshold, x, smooth)
