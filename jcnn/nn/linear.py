"""Fully-connected layer and flattening: ``Dense`` and ``Flatten``.

``Dense`` keeps a ``kernel`` of shape ``(in_features, features)`` (PyTorch's ``Linear.weight``
transposed) and a ``bias`` of shape ``(features,)``. ``Flatten`` flattens channels-last: an
``(N, H, W, C)`` input becomes ``(N, H * W * C)`` with C varying fastest, whereas PyTorch's NCHW
flatten lets W vary fastest; weights of a dense layer after a flatten must be permuted when they
move between the two libraries.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcnn import functional as F
from jcnn.functional._checks import check_array, check_positive_int
from jcnn.nn._shared import Initializer, dense_kernel
from jcnn.nn._util import kernel_and_bias

__all__ = ["Dense", "Flatten"]


class Dense(nn.Module):
    """Affine map of the last axis: ``y = x @ kernel + bias``.

    Attributes:
        features: number of outputs.
        use_bias: whether to add a learned ``bias``.
        kernel_init: initializer of ``kernel`` (default He normal, suited to ReLU networks).
        bias_init: initializer of ``bias`` (default zeros).
        dtype: computation dtype (default: inferred from inputs and params).
        param_dtype: dtype of the parameters.

    Example:
        >>> import jcnn
        >>> layer = jcnn.nn.Dense(features=3)
        >>> x = jnp.ones((2, 5))
        >>> params = layer.init(jax.random.key(0), x)
        >>> params["params"]["kernel"].shape, layer.apply(params, x).shape
        ((5, 3), (2, 3))
    """

    features: int
    use_bias: bool = True
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layer to ``x`` of shape ``(..., in_features)``; returns ``(..., features)``."""
        check_array(x, "x")
        if x.ndim < 1:
            raise ValueError("x: expected rank >= 1 (..., in_features), got a scalar")
        check_positive_int(self.features, "features")
        x, kernel, bias = kernel_and_bias(self, x, dense_kernel(x.shape[-1], self.features))
        return F.linear(x, kernel, bias)


class Flatten(nn.Module):
    """Flatten every axis after the batch axis, in channels-last (C fastest) order.

    Example:
        >>> import jcnn
        >>> jcnn.nn.Flatten().apply({}, jnp.ones((2, 7, 7, 50))).shape
        (2, 2450)
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Reshape ``x`` of shape ``(N, ...)`` to ``(N, prod(...))``."""
        check_array(x, "x")
        if x.ndim < 1:
            raise ValueError("x: expected rank >= 1 (N, ...), got a scalar")
        # not -1: an empty batch leaves it undetermined (a raw ZeroDivisionError)
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))
