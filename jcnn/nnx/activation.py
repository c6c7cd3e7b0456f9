"""Activation modules, NNX twins of ``jcnn.nn``'s: ``PReLU`` and ``Maxout`` (learned) and the
parameter-free ``ReLU``, ``LeakyReLU``, ``ELU``, ``GELU``, ``Tanh``, ``Sigmoid``, ``Rectify``,
``Swish``, ``Softplus``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jcnn import functional as F
from jcnn.functional._checks import (
    check_array,
    check_bool,
    check_dtype,
    check_positive_int,
    check_real,
)
from jcnn.nnx._util import check_input, check_rngs, static
from jcnn.nnx.linear import Dense

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


class PReLU(nnx.Module):
    """Parametric ReLU, ``x if x > 0 else alpha * x`` with a learned slope ``alpha``; the NNX
    twin of ``jcnn.nn.PReLU``.

    Args:
        channelwise: one slope per channel (shape ``(num_features,)``) instead of one scalar.
        alpha_init: initial slope (0.25).
        param_dtype: dtype of ``alpha``.
        num_features: the channels, needed (only) with ``channelwise=True``.
        rngs: optional ``nnx.Rngs``, accepted like the other modules with parameters' (the slope
            starts at the constant ``alpha_init``, so no key is drawn).

    Example:
        >>> import jcnn
        >>> jcnn.nnx.PReLU()(jnp.array([[-2.0, 3.0]])).tolist()
        [[-0.5, 3.0]]
    """

    def __init__(
        self,
        channelwise: bool = False,
        alpha_init: float = 0.25,
        param_dtype: Any = jnp.float32,
        *,
        num_features: int | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        if rngs is not None:
            check_rngs(rngs, "PReLU")
        alpha_init = check_real(alpha_init, "alpha_init")
        if check_bool(channelwise, "channelwise"):
            if num_features is None:
                raise ValueError("num_features: PReLU(channelwise=True) needs the channel count")
            check_positive_int(num_features, "num_features")
        elif num_features is not None:
            raise ValueError(
                f"num_features: only used with channelwise=True, got {num_features!r} with one "
                "shared slope"
            )
        self.channelwise, self.num_features = channelwise, static(num_features, "num_features")
        shape = (self.num_features,) if channelwise else ()
        self.alpha = nnx.Param(jnp.full(shape, alpha_init, check_dtype(param_dtype, "param_dtype")))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the activation to ``x`` of shape ``(N, ..., C)``."""
        if self.channelwise:
            check_input(x, None, self.num_features, "PReLU")
        else:
            check_array(x, "x")
        return F.prelu(x, self.alpha[...])


class Maxout(nnx.Module):
    """Maxout (Goodfellow et al. 2013), the NNX twin of ``jcnn.nn.Maxout``.

    With ``features`` set, a learned ``Dense`` (attribute ``linear``) from ``in_features`` to
    ``features * num_pieces`` units comes first; without it the module only takes the maximum
    over groups of ``num_pieces`` channels (``F.maxout``).

    Args:
        num_pieces: how many linear pieces each output takes the maximum of.
        features: number of outputs of the learned version, or None for the parameter-free one.
        in_features: size of the input's last axis (learned version only).
        dtype: the learned version's computation dtype, as in ``Dense``.
        param_dtype: dtype of the learned version's parameters.
        rngs: ``nnx.Rngs`` for the learned version's kernel.
    """

    def __init__(
        self,
        num_pieces: int,
        features: int | None = None,
        *,
        in_features: int | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        check_positive_int(num_pieces, "num_pieces")
        self.num_pieces, self.features = (
            static(num_pieces, "num_pieces"),
            static(features, "features"),
        )
        if features is None:
            if in_features is not None:
                raise ValueError(
                    f"in_features: only used with features (learned maxout), got {in_features!r}"
                )
            self.linear = None
            return
        check_positive_int(features, "features")
        if in_features is None:
            raise ValueError("in_features: Maxout(features=...) needs the input size")
        self.linear = Dense(
            in_features,
            self.features * self.num_pieces,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=check_rngs(rngs, "Maxout"),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply maxout to ``x`` of shape ``(N, ..., C)``."""
        if self.linear is not None:
            # checked here, so that a wrong size names Maxout and not its inner Dense
            check_input(x, None, self.linear.in_features, "Maxout")
            x = self.linear(x)
        return F.maxout(x, self.num_pieces)


class _Activation(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the activation elementwise."""
        return self._apply(x)


class ReLU(_Activation):
    """``max(x, 0)``, ``F.relu``."""

    def _apply(self, x):
        return F.relu(x)


class LeakyReLU(_Activation):
    """``max(negative_slope * x, x)``, ``F.leaky_relu``."""

    def __init__(self, negative_slope: float = 0.01) -> None:
        self.negative_slope = check_real(negative_slope, "negative_slope")

    def _apply(self, x):
        return F.leaky_relu(x, self.negative_slope)


class ELU(_Activation):
    """Exponential linear unit, ``F.elu``."""

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = check_real(alpha, "alpha")

    def _apply(self, x):
        return F.elu(x, self.alpha)


class GELU(_Activation):
    """Gaussian error linear unit, ``F.gelu`` (exact; ``approximate=True``: the tanh form)."""

    def __init__(self, approximate: bool = False) -> None:
        self.approximate = check_bool(approximate, "approximate")

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
    """Absolute value ``|x|``, ``F.rectify``."""

    def _apply(self, x):
        return F.rectify(x)


class Swish(_Activation):
    """``x * sigmoid(x)``, ``F.swish``."""

    def _apply(self, x):
        return F.swish(x)


class Softplus(_Activation):
    """``log(1 + exp(beta * x)) / beta``, ``x`` where ``beta * x > threshold``, ``F.softplus``."""

    def __init__(self, beta: float = 1.0, threshold: float | None = 20.0) -> None:
        self.beta = check_real(beta, "beta", low=0, low_open=True)
        self.threshold = (
            None if threshold is None else check_real(threshold, "threshold", finite=False)
        )

    def _apply(self, x):
        return F.softplus(x, self.beta, self.threshold)


class SiLU(_Activation):
    """Sigmoid-weighted linear unit ``x * sigmoid(x)`` (the same as ``Swish``), ``F.silu``."""

    def _apply(self, x):
        return F.silu(x)


class Mish(_Activation):
    """``x * tanh(softplus(x))`` (Misra 2019), ``F.mish``."""

    def _apply(self, x):
        return F.mish(x)


class SELU(_Activation):
    """Scaled exponential linear unit (Klambauer et al. 2017), ``F.selu``."""

    def _apply(self, x):
        return F.selu(x)
