"""``LocallyConnected``: the unshared-weight layer of lecture 004, a thin wrapper of
``F.locally_connected``.

Parameters: ``kernel`` of shape ``(*out_spatial, *window, C_in, features)`` (one filter bank per
output position) and ``bias`` of shape ``(*out_spatial, features)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from jcnn import functional as F
from jcnn import init
from jcnn.functional._checks import PaddingLike, check_bool, check_dtype, check_positive_int
from jcnn.nn._shared import Initializer, check_initializer, check_kernel_fits
from jcnn.nn._util import param, window_and_check

__all__ = ["LocallyConnected"]


class LocallyConnected(nn.Module):
    """Locally connected layer (unshared convolution), ``F.locally_connected``.

    Attributes:
        features: output channels.
        kernel_size: window, an int (every spatial axis) or one per axis (1-, 2- or 3-D).
        stride, padding, dilation: as for ``F.locally_connected`` (zero padding).
        use_bias: add an unshared bias ``(*out_spatial, features)``.
        kernel_init: initializer of ``kernel`` (default: He normal with
            ``fan_in = prod(window) * C_in``, drawn independently for every position).
        bias_init: initializer of ``bias`` (default zeros).
        dtype: computation dtype (default: inferred from inputs and params).
        param_dtype: dtype of the parameters.

    Example:
        >>> import jcnn
        >>> layer = jcnn.nn.LocallyConnected(4, 3)
        >>> x = jnp.ones((2, 6, 5, 3))
        >>> variables = layer.init(jax.random.key(0), x)
        >>> variables["params"]["kernel"].shape, layer.apply(variables, x).shape
        ((4, 3, 3, 3, 3, 4), (2, 4, 3, 4))
    """

    features: int
    kernel_size: int | Sequence[int]
    stride: int | Sequence[int] = 1
    padding: PaddingLike = 0
    dilation: int | Sequence[int] = 1
    use_bias: bool = True
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layer to ``x`` of shape ``(N, *spatial, C_in)``."""
        window = window_and_check(self.kernel_size, x, "kernel_size")
        features = check_positive_int(self.features, "features")
        kernel_init = check_initializer(
            self.kernel_init, "kernel_init", init.he_normal_per_position()
        )
        bias_init = check_initializer(self.bias_init, "bias_init", init.zeros)
        check_kernel_fits(self, x.shape[1:-1], window)
        out = F.locally_connected_output_shape(
            x.shape[1:-1],
            window,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
        )
        kernel = param(
            self,
            "kernel",
            kernel_init,
            (*out, *window, x.shape[-1], features),
            self.param_dtype,
            x,
        )
        bias = None
        if check_bool(self.use_bias, "use_bias"):
            bias = param(
                self,
                "bias",
                bias_init,
                (*out, features),
                self.param_dtype,
                x,
            )
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=check_dtype(self.dtype))
        return F.locally_connected(
            x, kernel, bias, stride=self.stride, padding=self.padding, dilation=self.dilation
        )
