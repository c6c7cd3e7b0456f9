"""Fully-connected layer and flattening, ``Dense`` and ``Flatten``: NNX twins of
``jcnn.nn.Dense`` and ``jcnn.nn.Flatten``.

``Dense`` keeps a ``kernel`` ``(in_features, features)`` and a ``bias`` ``(features,)``, as the
Linen twin; ``Flatten`` flattens channels-last (C varies fastest).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import promote_dtype

from jcnn import functional as F
from jcnn.functional._checks import check_array, check_dtype, check_positive_int
from jcnn.nn._shared import Initializer, dense_kernel
from jcnn.nnx._util import check_input, check_rngs, kernel_and_bias, static, value

__all__ = ["Dense", "Flatten"]


class Dense(nnx.Module):
    """Affine map of the last axis, ``y = x @ kernel + bias``, the NNX twin of ``jcnn.nn.Dense``.

    Args:
        in_features: size of the input's last axis.
        features: number of outputs.
        use_bias: whether to add a learned ``bias``.
        kernel_init: initializer of ``kernel`` (default He normal, as the Linen twin).
        bias_init: initializer of ``bias`` (default zeros).
        dtype: computation dtype (default: inferred from inputs and params).
        param_dtype: dtype of the parameters.
        rngs: ``nnx.Rngs`` whose ``params`` stream draws the initial kernel.

    Example:
        >>> import jcnn
        >>> from flax import nnx
        >>> layer = jcnn.nnx.Dense(5, 3, rngs=nnx.Rngs(0))
        >>> layer.kernel.shape, layer(jnp.ones((2, 5))).shape
        ((5, 3), (2, 3))
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        use_bias: bool = True,
        kernel_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        check_rngs(rngs, "Dense")
        check_positive_int(in_features, "in_features")
        check_positive_int(features, "features")
        self.in_features = static(in_features, "in_features")
        self.features, self.dtype = static(features, "features"), check_dtype(dtype)
        spec = dense_kernel(self.in_features, self.features)
        self.kernel, self.bias = kernel_and_bias(
            rngs, spec, use_bias, kernel_init, bias_init, param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layer to ``x`` ``(..., in_features)``; returns ``(..., features)``."""
        check_input(x, None, self.in_features, "Dense")
        dtype = check_dtype(self.dtype)
        x, kernel, bias = promote_dtype(x, value(self.kernel), value(self.bias), dtype=dtype)
        return F.linear(x, kernel, bias)


class Flatten(nnx.Module):
    """Flatten every axis after the batch axis, channels-last (C fastest).

    Example:
        >>> import jcnn
        >>> jcnn.nnx.Flatten()(jnp.ones((2, 7, 7, 50))).shape
        (2, 2450)
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reshape ``x`` of shape ``(N, ...)`` to ``(N, prod(...))``."""
        check_array(x, "x")
        if x.ndim < 1:
            raise ValueError("x: expected rank >= 1 (N, ...), got a scalar")
        # not -1: an empty batch leaves it undetermined (a raw ZeroDivisionError)
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))
