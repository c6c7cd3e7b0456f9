"""Activation modules: ``PReLU`` and ``Maxout`` (learned), and parameter-free wrappers of the
``F`` activations (``ReLU``, ``LeakyReLU``, ``ELU``, ``GELU``, ``Tanh``, ``Sigmoid``, ``Rectify``,
``Swish``, ``Softplus``) so that every layer of a model is a named submodule that shows up in a
layer-by-layer summary.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcnn import functional as F
from jcnn.functional._checks import check_array, check_bool, check_positive_int, check_real
from jcnn.nn._util import param
from jcnn.nn.linear import Dense

__all__ = [
    "PReLU",
    "Maxout",
    "ReLU",
    "LeakyReLU",
    "ELU",
    "GELU",
    "Tanh",
    "Sigmoid",
    "Rectify",
    "Swish",
    "Softplus",
    "SiLU",
    "Mish",
    "SELU",
]


class PReLU(nn.Module):
    """Parametric ReLU, ``x if x > 0 else alpha * x`` with a learned slope ``alpha`` (He et al.
    2015).

    Attributes:
        channelwise: one slope per channel (shape ``(C,)``) instead of one shared scalar.
        alpha_init: initial slope (0.25, as in the paper and PyTorch).
        param_dtype: dtype of ``alpha``.

    Example:
        >>> import jcnn
        >>> layer = jcnn.nn.PReLU()
        >>> x = jnp.array([[-2.0, 3.0]])
        >>> layer.apply(layer.init(jax.random.key(0), x), x).tolist()
        [[-0.5, 3.0]]
    """

    channelwise: bool = False
    alpha_init: float = 0.25
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the activation to ``x`` of shape ``(N, ..., C)``."""
        check_array(x, "x")
        alpha_init = check_real(self.alpha_init, "alpha_init")
        if check_bool(self.channelwise, "channelwise") and x.ndim == 0:
            raise ValueError(
                "x: PReLU(channelwise=True) needs channels on a last axis, got a 0-d x"
            )
        shape = (x.shape[-1],) if self.channelwise else ()
        alpha = param(
            self, "alpha", lambda _, s, d: jnp.full(s, alpha_init, d), shape, self.param_dtype, x
        )
        return F.prelu(x, alpha)


class Maxout(nn.Module):
    """Maxout (Goodfellow et al. 2013): the maximum over ``num_pieces`` groups of channels.

    With ``features`` set, a learned affine map of the last axis to ``features * num_pieces``
    units comes first (submodule ``linear``, then submodule ``maximum``), giving the course's
    unit ``max(w_1^T x + b_1, ..., w_k^T x + b_k)``; without it the module only takes the
    maximum (``F.maxout``) over the channels it receives.

    Attributes:
        num_pieces: how many linear pieces each output takes the maximum of.
        features: number of outputs of the learned version, or None for the parameter-free one.
        dtype: the learned version's computation dtype (default: inferred from inputs and
            params), as in ``Dense``.
        param_dtype: dtype of the learned version's parameters.
    """

    num_pieces: int
    features: int | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply maxout to ``x`` of shape ``(N, ..., C)``."""
        num_pieces = check_positive_int(self.num_pieces, "num_pieces")
        if self.features is not None:
            features = check_positive_int(self.features, "features")
            x = Dense(
                features * num_pieces,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="linear",
            )(x)
            # its own (parameter-free) layer, so that a summary shows the maximum's output too
            return Maxout(num_pieces, name="maximum")(x)
        return F.maxout(x, num_pieces)


class _Activation(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the activation elementwise."""
        return self._apply(x)


class ReLU(_Activation):
    """``max(x, 0)``, ``F.relu``."""

    def _apply(self, x):
        return F.relu(x)


class LeakyReLU(_Activation):
    """``max(negative_slope * x, x)``, ``F.leaky_relu``."""

    negative_slope: float = 0.01

    def _apply(self, x):
        return F.leaky_relu(x, self.negative_slope)


class ELU(_Activation):
    """Exponential linear unit, ``F.elu``."""

    alpha: float = 1.0

    def _apply(self, x):
        return F.elu(x, self.alpha)


class GELU(_Activation):
    """Gaussian error linear unit, ``F.gelu`` (exact; ``approximate=True``: the tanh form)."""

    approximate: bool = False

    def _apply(self, x):
        return F.gelu(x, approximate=self.approximate)


class Tanh(_Activation):
    """Hyperbolic tangent, ``F.tanh``."""

    def _apply(self, x):
        return F.tanh(x)


class Sigmoid(_Activation):
    """Logistic sigmoid, ``F.sigmoid``."""

    def _apply(self, x):
        return F.sigmoid(x)


class Rectify(_Activation):
    """Absolute value ``|x|``, the rectification of Jarrett et al. 2009, ``F.rectify``."""

    def _apply(self, x):
        return F.rectify(x)


class Swish(_Activation):
    """``x * sigmoid(x)``, ``F.swish``."""

    def _apply(self, x):
        return F.swish(x)


class Softplus(_Activation):
    """``log(1 + exp(beta * x)) / beta``, ``x`` where ``beta * x > threshold``, ``F.softplus``."""

    beta: float = 1.0
    threshold: float | None = 20.0

    def _apply(self, x):
        return F.softplus(x, self.beta, self.threshold)


class SiLU(_Activation):
    """Sigmoid-weighted linear unit ``x * sigmoid(x)`` (the same as ``Swish``), ``F.silu``."""

    def _apply(self, x):
        return F.silu(x)


class Mish(_Activation):
    """``x * tanh(softplus(x))`` (Misra 2019), ``F.mish``.

    Example:
        >>> import jcnn
        >>> layer = jcnn.nn.Mish()
        >>> x = jnp.array([-1.0, 0.0, 2.0])
        >>> bool(jnp.allclose(layer.apply({}, x), jcnn.functional.mish(x)))
        True
    """

    def _apply(self, x):
        return F.mish(x)


class SELU(_Activation):
    """Scaled exponential linear unit (Klambauer et al. 2017), ``F.selu``.

    Example:
        >>> import jcnn
        >>> layer = jcnn.nn.SELU()
        >>> x = jnp.array([-1.0, 0.0, 2.0])
        >>> bool(jnp.allclose(layer.apply({}, x), jcnn.functional.selu(x)))
        True
    """

    def _apply(self, x):
        return F.selu(x)
