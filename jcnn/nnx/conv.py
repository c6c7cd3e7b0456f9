"""Convolution modules: ``Conv`` (1-, 2- or 3-D), ``DepthwiseConv`` and ``ConvTranspose``, thin
NNX wrappers of ``F.conv`` and ``F.conv_transpose``, twins of the ``jcnn.nn`` modules.

Parameters and their shapes are the Linen twin's: ``kernel`` ``(*window, C_in // groups,
features)`` (``DepthwiseConv``: ``(*window, 1, C_in * depth_multiplier)``; ``ConvTranspose``:
``(*window, C_in, features // groups)``) and ``bias`` ``(features,)``. As in ``flax.nnx.Conv``,
the input channels come first, at construction (``in_features``), and an int ``kernel_size``
means 2-D unless ``spatial_dims`` says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import promote_dtype

from jcnn import functional as F
from jcnn.functional._checks import PaddingLike, check_dtype, check_positive_int
from jcnn.nn._shared import (
    check_conv_channels,
    check_kernel_fits,
    conv_kernel,
    conv_transpose_kernel,
    depthwise_kernel,
)
from jcnn.nnx._util import (
    Initializer,
    check_input,
    check_rngs,
    check_settings,
    kernel_and_bias,
    spatial_window,
    static,
    value,
)

__all__ = ["Conv", "ConvTranspose", "DepthwiseConv"]


class _ConvBase(nnx.Module):
    def _operands(self, x):
        check_input(x, len(self.kernel_size), self.in_features, type(self).__name__)
        return promote_dtype(x, value(self.kernel), value(self.bias), dtype=check_dtype(self.dtype))


def _checked_window(owner, rngs, in_features, features, groups, kernel_size, spatial_dims):
    """The kernel window, once ``rngs``, the channel counts and ``groups`` are checked."""
    check_rngs(rngs, owner)
    check_positive_int(in_features, "in_features")
    check_conv_channels(in_features, features, groups, "in_features")
    return spatial_window(kernel_size, spatial_dims, owner)


class Conv(_ConvBase):
    """Cross-correlation layer, the NNX twin of ``jcnn.nn.Conv``.

    Args:
        in_features: number of input channels (NNX modules create their parameters at once).
        features: number of output channels.
        kernel_size: window size, an int or one int per spatial dim.
        stride, padding, dilation, groups, padding_mode: as in ``F.conv``.
        use_bias: whether to add a learned ``bias``.
        kernel_init: initializer of ``kernel`` (default He normal, as the Linen twin).
        bias_init: initializer of ``bias`` (default zeros).
        flip: True computes the signal-processing convolution (``F.convolve``).
        dtype: computation dtype (default: inferred from inputs and params).
        param_dtype: dtype of the parameters.
        spatial_dims: spatial rank (1, 2 or 3) when ``kernel_size`` is an int (default 2).
        rngs: ``nnx.Rngs`` whose ``params`` stream draws the initial kernel.

    Example:
        >>> import jcnn
        >>> from flax import nnx
        >>> layer = jcnn.nnx.Conv(3, 10, kernel_size=(5, 5), padding=2, rngs=nnx.Rngs(0))
        >>> layer.kernel.shape, layer(jnp.ones((1, 32, 32, 3))).shape
        ((5, 5, 3, 10), (1, 32, 32, 10))
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: PaddingLike = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        use_bias: bool = True,
        kernel_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        flip: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        *,
        spatial_dims: int | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.kernel_size = _checked_window(
            "Conv", rngs, in_features, features, groups, kernel_size, spatial_dims
        )
        self.in_features = static(in_features, "in_features")
        self.features = static(features, "features")
        self.stride, self.padding = static(stride, "stride"), static(padding, "padding")
        self.dilation, self.groups = static(dilation, "dilation"), static(groups, "groups")
        self.padding_mode, self.flip = static(padding_mode, "padding_mode"), static(flip, "flip")
        self.dtype = dtype
        spec = conv_kernel(self.kernel_size, self.in_features, self.features, self.groups)
        self.kernel, self.bias = kernel_and_bias(
            rngs, spec, use_bias, kernel_init, bias_init, param_dtype
        )
        check_settings(
            self,
            Conv,
            len(self.kernel_size),
            self.in_features,
            window=self.kernel_size,
            dilation=self.dilation,
            padding=self.padding,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layer to ``x`` ``(N, *spatial, in_features)``: ``(N, *out, features)``."""
        x, kernel, bias = self._operands(x)
        check_kernel_fits(self, x.shape[1:-1], kernel.shape[:-2])
        return F.conv(
            x,
            kernel,
            bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            padding_mode=self.padding_mode,
            flip=self.flip,
        )


class DepthwiseConv(_ConvBase):
    """Depthwise convolution, the NNX twin of ``jcnn.nn.DepthwiseConv``: ``F.conv`` with
    ``groups = in_features`` and a kernel ``(*window, 1, in_features * depth_multiplier)``, output
    channels in PyTorch's order (``c * depth_multiplier + j``: filter ``j`` of input channel ``c``).

    Args:
        in_features: number of input channels.
        kernel_size: window size, an int or one int per spatial dim.
        depth_multiplier: filters per input channel, a positive int (default 1).
        stride, padding, dilation, padding_mode: as in ``F.conv``.
        use_bias, kernel_init, bias_init, dtype, param_dtype, spatial_dims, rngs: as in ``Conv``
            (the default kernel initializer is He normal with ``groups = in_features``).

    Example:
        >>> import jcnn
        >>> from flax import nnx
        >>> layer = jcnn.nnx.DepthwiseConv(3, (3, 3), depth_multiplier=2, rngs=nnx.Rngs(0))
        >>> layer.kernel.shape, layer(jnp.ones((1, 8, 8, 3))).shape
        ((3, 3, 1, 6), (1, 6, 6, 6))
    """

    def __init__(
        self,
        in_features: int,
        kernel_size: int | Sequence[int],
        depth_multiplier: int = 1,
        stride: int | Sequence[int] = 1,
        padding: PaddingLike = 0,
        dilation: int | Sequence[int] = 1,
        padding_mode: str = "zeros",
        use_bias: bool = True,
        kernel_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        *,
        spatial_dims: int | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        check_rngs(rngs, "DepthwiseConv")
        check_positive_int(in_features, "in_features")
        check_positive_int(depth_multiplier, "depth_multiplier")
        self.in_features = static(in_features, "in_features")
        self.depth_multiplier = static(depth_multiplier, "depth_multiplier")
        self.kernel_size = spatial_window(kernel_size, spatial_dims, "DepthwiseConv")
        self.stride, self.padding = static(stride, "stride"), static(padding, "padding")
        self.dilation = static(dilation, "dilation")
        self.padding_mode, self.dtype = static(padding_mode, "padding_mode"), dtype
        spec = depthwise_kernel(self.kernel_size, self.in_features, self.depth_multiplier)
        self.features = spec.features
        self.kernel, self.bias = kernel_and_bias(
            rngs, spec, use_bias, kernel_init, bias_init, param_dtype
        )
        check_settings(
            self,
            DepthwiseConv,
            len(self.kernel_size),
            self.in_features,
            window=self.kernel_size,
            dilation=self.dilation,
            padding=self.padding,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layer to ``x`` ``(N, *spatial, in_features)``: ``(N, *out, features)``."""
        x, kernel, bias = self._operands(x)
        check_kernel_fits(self, x.shape[1:-1], kernel.shape[:-2])
        return F.conv(
            x,
            kernel,
            bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.in_features,
            padding_mode=self.padding_mode,
        )


class ConvTranspose(_ConvBase):
    """Transposed convolution, the NNX twin of ``jcnn.nn.ConvTranspose``.

    ``kernel`` has shape ``(*window, in_features, features // groups)``: PyTorch's weight with
    its axes moved, no flip.

    Args:
        in_features: number of input channels.
        features: number of output channels.
        kernel_size: window size, an int or one int per spatial dim.
        stride, padding, output_padding, dilation, groups: as in ``F.conv_transpose``.
        use_bias, kernel_init, bias_init, dtype, param_dtype, spatial_dims, rngs: as in ``Conv``
            (the default kernel initializer is He normal with
            ``fan_in = prod(window) * C_in // groups``).

    Example:
        >>> import jcnn
        >>> from flax import nnx
        >>> layer = jcnn.nnx.ConvTranspose(3, 4, kernel_size=2, stride=2, rngs=nnx.Rngs(0))
        >>> layer(jnp.ones((1, 5, 5, 3))).shape
        (1, 10, 10, 4)
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: PaddingLike = 0,
        output_padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        use_bias: bool = True,
        kernel_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        *,
        spatial_dims: int | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.kernel_size = _checked_window(
            "ConvTranspose", rngs, in_features, features, groups, kernel_size, spatial_dims
        )
        self.in_features = static(in_features, "in_features")
        self.features = static(features, "features")
        self.stride, self.padding = static(stride, "stride"), static(padding, "padding")
        self.output_padding = static(output_padding, "output_padding")
        self.dilation, self.groups = static(dilation, "dilation"), static(groups, "groups")
        self.dtype = dtype
        spec = conv_transpose_kernel(self.kernel_size, self.in_features, self.features, self.groups)
        self.kernel, self.bias = kernel_and_bias(
            rngs, spec, use_bias, kernel_init, bias_init, param_dtype
        )
        check_settings(
            self,
            ConvTranspose,
            len(self.kernel_size),
            self.in_features,
            window=self.kernel_size,
            dilation=self.dilation,
            padding=self.padding,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layer to ``x`` ``(N, *spatial, in_features)``: ``(N, *out, features)``."""
        x, kernel, bias = self._operands(x)
        return F.conv_transpose(
            x,
            kernel,
            bias,
            stride=self.stride,
            padding=self.padding,
            output_padding=self.output_padding,
            dilation=self.dilation,
            groups=self.groups,
        )
