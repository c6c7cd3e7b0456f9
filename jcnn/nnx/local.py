"""``LocallyConnected``: the unshared-weight layer of lecture 004, the NNX twin of
``jcnn.nn.LocallyConnected`` (a thin wrapper of ``F.locally_connected``).

Its kernel holds one filter bank per output position, so besides ``in_features`` the module needs
the input's spatial size at construction (``input_size``) to create it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import promote_dtype

from jcnn import functional as F
from jcnn import init
from jcnn.functional._checks import (
    PaddingLike,
    as_int_tuple,
    check_bool,
    check_dtype,
    check_positive_int,
)
from jcnn.nn._shared import check_kernel_fits, window_rank
from jcnn.nnx._util import (
    Initializer,
    check_initializer,
    check_input,
    check_rngs,
    param,
    spatial_window,
    static,
    value,
)

__all__ = ["LocallyConnected"]


class LocallyConnected(nnx.Module):
    """Locally connected layer (unshared convolution), ``F.locally_connected``.

    Args:
        in_features: input channels.
        features: output channels.
        kernel_size: window, an int or one per spatial axis.
        input_size: the input's spatial size ``(H, W)`` (or ``(L,)``, ``(D, H, W)``); it sets
            the spatial rank (an int is every axis of a 2-D input unless ``kernel_size`` is a
            sequence).
        stride, padding, dilation: as for ``F.locally_connected`` (zero padding).
        use_bias: add an unshared bias ``(*out_spatial, features)``.
        kernel_init: initializer of ``kernel`` (default ``init.he_normal_per_position()``).
        bias_init: initializer of ``bias`` (default zeros).
        dtype: computation dtype (default: inferred from inputs and params).
        param_dtype: dtype of the parameters.
        rngs: ``nnx.Rngs`` for the initializers.

    Example:
        >>> from flax import nnx
        >>> from jcnn import nnx as jnnx
        >>> layer = jnnx.LocallyConnected(3, 4, 3, input_size=(6, 5), rngs=nnx.Rngs(0))
        >>> layer.kernel.shape, layer(jnp.ones((2, 6, 5, 3))).shape
        ((4, 3, 3, 3, 3, 4), (2, 4, 3, 4))
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        kernel_size: int | Sequence[int],
        *,
        input_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: PaddingLike = 0,
        dilation: int | Sequence[int] = 1,
        use_bias: bool = True,
        kernel_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        check_rngs(rngs, "LocallyConnected")
        check_positive_int(in_features, "in_features")
        check_positive_int(features, "features")
        check_bool(use_bias, "use_bias")
        kernel_init = check_initializer(kernel_init, "kernel_init", init.he_normal_per_position())
        bias_init = check_initializer(bias_init, "bias_init", init.zeros)
        rank = window_rank(input_size, "input_size")
        kernel_rank = window_rank(kernel_size, "kernel_size")
        if None not in (rank, kernel_rank) and rank != kernel_rank:
            raise ValueError(
                f"input_size: {input_size!r} has {rank} spatial sizes, but kernel_size "
                f"{kernel_size!r} has {kernel_rank}"
            )
        self.kernel_size = spatial_window(kernel_size, rank, "LocallyConnected")
        self.input_size = as_int_tuple(input_size, len(self.kernel_size), "input_size", minimum=1)
        self.in_features = static(in_features, "in_features")
        self.features = static(features, "features")
        self.dtype = check_dtype(dtype)
        self.stride, self.padding = static(stride, "stride"), static(padding, "padding")
        self.dilation = static(dilation, "dilation")
        check_kernel_fits(self, self.input_size, self.kernel_size)
        out = F.locally_connected_output_shape(
            self.input_size,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
        )
        self.kernel = param(
            rngs,
            kernel_init,
            (*out, *self.kernel_size, self.in_features, self.features),
            param_dtype,
        )
        bias_shape = (*out, self.features)
        self.bias = param(rngs, bias_init, bias_shape, param_dtype) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layer to ``x`` of shape ``(N, *input_size, in_features)``."""
        check_input(x, len(self.kernel_size), self.in_features, "LocallyConnected")
        if tuple(x.shape[1:-1]) != self.input_size:
            raise ValueError(
                f"x: LocallyConnected was built for spatial size {self.input_size}, got shape "
                f"{tuple(x.shape)}"
            )
        dtype = check_dtype(self.dtype)
        x, kernel, bias = promote_dtype(x, value(self.kernel), value(self.bias), dtype=dtype)
        return F.locally_connected(
            x,
            kernel,
            bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
        )
