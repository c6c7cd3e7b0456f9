"""Elementwise activations and maxout, channels-last.

Each function matches ``torch.nn.functional`` in value and gradient, including the gradient at
exactly ``x == 0``, where PyTorch takes the negative branch: ``relu``, ``leaky_relu``, ``prelu``
and ``elu`` have the gradient of their negative part there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jcnn.functional._checks import (
    check_array,
    check_bool,
    check_positive_int,
    check_real_or_traced,
    float32_or_wider,
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
    xf = x.astype(float32_or_wider(x.dtype))
    return jnp.where(xf > 0, xf, negative_slope * xf).astype(x.dtype)


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
    compute_dtype = float32_or_wider(x.dtype)
    slope = (alpha.reshape(()) if alpha.shape == (1,) else alpha).astype(x.dtype)
    slope = slope.astype(compute_dtype)
    if slope.ndim == 1:
        slope = slope.reshape((1,) * (x.ndim - 1) + slope.shape)
    xf = x.astype(compute_dtype)
    return jnp.where(xf > 0, xf, slope * xf).astype(x.dtype)


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
    compute_dtype = float32_or_wider(x.dtype)
    return _elu(x.astype(compute_dtype), jnp.asarray(alpha, compute_dtype)).astype(x.dtype)


@jax.custom_jvp
def _elu(x: jax.Array, alpha: jax.Array) -> jax.Array:
    """``jax.nn.elu`` whose derivative is ``alpha * exp(x)`` on the negative side. JAX's is
    ``y + alpha`` (expm1's ``ans + 1``), which cancels: in float32 it was 0 at ``x = -18`` and
    44% off at ``x = -17`` where PyTorch's is exact."""
    return jax.nn.elu(x, alpha)


@_elu.defjvp
def _elu_jvp(primals, tangents):
    (x, alpha), (x_tangent, alpha_tangent) = primals, tangents
    negative = jnp.where(x > 0, jnp.zeros_like(x), x)
    slope = jnp.where(x > 0, jnp.ones_like(x), alpha * jnp.exp(negative))
    alpha_slope = jnp.where(x > 0, jnp.zeros_like(x), jnp.expm1(negative))
    return _elu(x, alpha), slope * x_tangent + alpha_slope * alpha_tangent


def selu(x: jax.Array) -> jax.Array:
    """Scaled ELU (Klambauer et al. 2017) with the self-normalizing constants PyTorch uses.

    Args:
        x: floating array of any shape.

    Returns:
        An array like ``x``: ``1.0507 * elu(x, alpha=1.6733)``.
    """
    check_array(x, "x")
    compute_dtype = float32_or_wider(x.dtype)
    alpha = jnp.asarray(_SELU_ALPHA, compute_dtype)
    return (_SELU_SCALE * _elu(x.astype(compute_dtype), alpha)).astype(x.dtype)


_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


# Phi(-a) = t exp(-a^2 / 2) P(t) / 2 with t = 1 / (1 + a / (2 sqrt 2)), a >= 0: P is the degree-10
# polynomial fit by least squares in relative error to erfc(b) exp(b^2) / t, b = a / sqrt 2 in
# [0, 10.5] (past it Phi underflows float32); 2.1e-8 in float64, 1.7e-7 evaluated in float32.
_TAIL_POLYNOMIAL = (
    0.28209197521209717,
    0.2821637988090515,
    0.2461572140455246,
    0.17948688566684723,
    0.07880687713623047,
    -0.026159578934311867,
    0.08364086598157883,
    -0.4091424345970154,
    0.4671368896961212,
    -0.22627395391464233,
    0.042091477662324905,
)
_INV_SQRT_2PI = np.float32(1 / np.sqrt(2 * np.pi))
_SQRT_2_OVER_PI = float(np.sqrt(2 / np.pi))
_TAIL_END = np.float32(16)  # from |x| = 16 on, exp(-x**2 / 2) is 0 in float32


def _exp_minus_half_square(x: jax.Array) -> jax.Array:
    """``exp(-x**2 / 2)`` in float32 to about an ulp, for ``x`` in ``[-16, 16]``.

    Rounding ``x**2`` alone would cost ``x**2 / 2`` ulps of relative error (40 at ``x = -9``), so
    ``x**2 / 2`` is split into ``high**2 / 2``, exact with ``high`` the leading 12 bits of ``x``,
    and a rest below ``x**2 / 8192``, whose exponential is a short Taylor series.
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32) & np.uint32(0xFFFFF000)
    high = jax.lax.bitcast_convert_type(bits, jnp.float32)
    rest = (x - high) * (x + high) * 0.5
    series = 1 - rest * (1 - rest * (0.5 - rest * (1 / 6 - rest * (1 / 24))))
    return jnp.exp(high * high * -0.5) * series


@jax.custom_jvp
def _normal_pdf(x: jax.Array) -> jax.Array:
    """The standard normal density, for ``x`` in ``[-16, 16]``."""
    return _exp_minus_half_square(x) * _INV_SQRT_2PI


_normal_pdf.defjvps(lambda tangent, pdf, x: -x * pdf * tangent)


def _lower_tail_factors(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(c, h, e)``: ``x`` clipped to ``[-16, 16]``, and ``Phi(-|c|) = h * e`` with
    ``e = exp(-c**2 / 2)`` (0 where ``|x| >= 16``, so that ``c * h * e`` is never inf or nan)."""
    x = jnp.clip(x, -_TAIL_END, _TAIL_END)
    t = 1 / (1 + jnp.abs(x) * np.float32(0.5 / np.sqrt(2)))
    polynomial = np.float32(_TAIL_POLYNOMIAL[-1])
    for coefficient in _TAIL_POLYNOMIAL[-2::-1]:
        polynomial = polynomial * t + np.float32(coefficient)
    return x, 0.5 * t * polynomial, _exp_minus_half_square(x)


@jax.custom_jvp
def _gelu_float32(x: jax.Array) -> jax.Array:
    clipped, h, e = _lower_tail_factors(x)
    x_lower = (clipped * h) * e  # in this order it stays a normal float32 while x Phi(x) does
    return jnp.where(x <= 0, x_lower, x - x_lower)


@jax.custom_jvp
def _gelu_derivative(x: jax.Array) -> jax.Array:
    """``Phi(x) + x * phi(x)``, the factor ``e`` applied last (as in ``_gelu_float32``)."""
    clipped, h, e = _lower_tail_factors(x)
    x_density = clipped * _INV_SQRT_2PI
    return jnp.where(x <= 0, (h + x_density) * e, 1 + (x_density - h) * e)


def _gelu_second_derivative(x: jax.Array) -> jax.Array:
    clipped = jnp.clip(x, -_TAIL_END, _TAIL_END)
    return (2 - clipped * clipped) * _normal_pdf(clipped)


_gelu_float32.defjvps(lambda tangent, y, x: _gelu_derivative(x) * tangent)
_gelu_derivative.defjvps(lambda tangent, y, x: _gelu_second_derivative(x) * tangent)


def _exact_gelu(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.float64:
        return jax.nn.gelu(x, approximate=False)
    return _gelu_float32(x.astype(jnp.float32)).astype(x.dtype)


def gelu(x: jax.Array, *, approximate: bool = False) -> jax.Array:
    """Gaussian error linear unit ``x * Phi(x)`` (Hendrycks and Gimpel 2016).

    Unlike ``jax.nn.gelu`` (tanh approximation by default), the default is the exact erf form, as
    in PyTorch (``approximate='none'``); ``approximate=True`` is PyTorch's ``approximate='tanh'``,
    computed as ``x * sigmoid(2 u)`` (equal to ``x (1 + tanh u) / 2``), which keeps its relative
    accuracy for negative ``x`` where ``1 + tanh(u)`` cancels.

    The exact form keeps its relative accuracy where ``Phi(x)`` is tiny (``1 + erf``, PyTorch's
    form, loses it below ``x = -3``): in float32 the value and its first two derivatives are within
    5e-7 of the float64 ones for every ``x`` down to -13 (``Phi(-13) = 6e-39``), where
    ``jax.nn.gelu`` (XLA's ``erfc`` and its rounded square in ``exp(-x**2 / 2)``) is off by up to
    1.5e-5 and its derivative by 6e-3. Below ``x = -16`` the value is -0 (also at ``-inf``), above
    16 it is ``x``. Derivatives of every order come from the exact density. Float16 and bfloat16
    are computed in float32, float64 with ``jax.lax.erfc``.

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
        # x (1 + tanh(u)) / 2 written as x sigmoid(2 u), u = sqrt(2 / pi) (x + 0.044715 x**3): the
        # same function without 1 + tanh(u)'s cancellation (jax.nn.gelu's float32 value was 0.2%
        # off at x = -4 and 0 from x = -5, where PyTorch's is 30% off, then 0 from x = -6).
        xf = x.astype(float32_or_wider(x.dtype))
        inner = _SQRT_2_OVER_PI * (xf + 0.044715 * xf * xf * xf)
        return (xf * _sigmoid(2 * inner)).astype(x.dtype)
    # Recomputed from x in the backward pass (jax.checkpoint): the forward pass writes only its
    # output and the backward pass is one fused loop over x and the cotangent (ConvNeXt's
    # training step 1.07-1.14x faster, experiments/benchmarks/README.md, run L).
    return jax.checkpoint(_exact_gelu)(x)


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
    return jax.nn.silu(x.astype(float32_or_wider(x.dtype))).astype(x.dtype)


silu = swish


def mish(x: jax.Array) -> jax.Array:
    """Mish ``x * tanh(softplus(x))`` (Misra 2019).

    Args:
        x: floating array of any shape.

    Returns:
        An array like ``x``.
    """
    check_array(x, "x")
    return jax.nn.mish(x.astype(float32_or_wider(x.dtype))).astype(x.dtype)


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
    return _sigmoid(x.astype(float32_or_wider(x.dtype))).astype(x.dtype)


@jax.custom_jvp
def _sigmoid(x: jax.Array) -> jax.Array:
    """``jax.nn.sigmoid`` whose derivative is ``e / (1 + e)**2``, ``e = exp(-|x|)``. JAX's is
    ``y (1 - y)``, which cancels where ``y`` nears 1: 0 from ``x = 37`` in float64 and from
    ``x = 17`` in float32, where the slope is ``exp(-x)`` (1e-16, 4e-8)."""
    return jax.nn.sigmoid(x)


@_sigmoid.defjvp
def _sigmoid_jvp(primals, tangents):
    (x,), (x_tangent,) = primals, tangents
    e = jnp.exp(-jnp.abs(x))
    return _sigmoid(x), e / jnp.square(1 + e) * x_tangent


def tanh(x: jax.Array) -> jax.Array:
    """Hyperbolic tangent.

    Args:
        x: floating array of any shape.

    Returns:
        An array like ``x`` with values in ``[-1, 1]``.
    """
    check_array(x, "x")
    return _tanh(x.astype(float32_or_wider(x.dtype))).astype(x.dtype)


@jax.custom_jvp
def _tanh(x: jax.Array) -> jax.Array:
    """``jnp.tanh`` whose derivative is ``sech(x)**2 = 4 e / (1 + e)**2``, ``e = exp(-2 |x|)``,
    from ``|x| = 1`` on. JAX's (and PyTorch's) is ``1 - y**2``, which cancels where ``|y|``
    nears 1: 10% off at ``x = -17`` in float64 and 0 from ``|x| = 9`` in float32."""
    return jnp.tanh(x)


@_tanh.defjvp
def _tanh_jvp(primals, tangents):
    (x,), (x_tangent,) = primals, tangents
    y = _tanh(x)
    e = jnp.exp(-2 * jnp.abs(x))
    # 1 - y**2 where it does not cancel (its own derivative stays exact near 0 too)
    slope = jnp.where(jnp.abs(x) < 1, 1 - jnp.square(y), 4 * e / jnp.square(1 + e))
    return y, slope * x_tangent


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
    xf = x.astype(float32_or_wider(x.dtype))
    smooth = jnp.logaddexp(beta * xf, jnp.zeros_like(xf)) / beta
    if threshold is None:
        return smooth.astype(x.dtype)
    threshold = _check_real(threshold, "threshold", finite=False)
    return jnp.where(beta * xf > threshold, xf, smooth).astype(x.dtype)
