"""Convolution modules: ``Conv`` (1-, 2- or 3-D), ``DepthwiseConv`` and ``ConvTranspose``, thin
wrappers of ``F.conv`` and ``F.conv_transpose``.

Parameters: ``kernel`` of shape ``(*window, C_in // groups, features)`` (HWIO; PyTorch's OIHW
weight is ``weight.permute(2, 3, 1, 0)``) and ``bias`` of shape ``(features,)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcnn import functional as F
from jcnn.functional._checks import PaddingLike, check_positive_int
from jcnn.nn._shared import (
    Initializer,
    check_conv_channels,
    check_kernel_fits,
    conv_kernel,
    conv_transpose_kernel,
    depthwise_kernel,
)
from jcnn.nn._util import kernel_and_bias, window_and_check

__all__ = ["Conv", "ConvTranspose", "DepthwiseConv"]


def _window_and_channels(module, x) -> tuple[tuple[int, ...], int]:
    """The window and the input channels, once ``x``, ``features`` and ``groups`` are checked."""
    window = window_and_check(module.kernel_size, x, "kernel_size")
    c_in = x.shape[-1]
    check_conv_channels(c_in, module.features, module.groups, "input channels")
    return window, c_in


class Conv(nn.Module):
    """Cross-correlation layer (what every deep-learning library calls convolution).

    The spatial rank comes from ``len(kernel_size)``; an int ``kernel_size`` takes it from the
    input (``(N, L, C)``, ``(N, H, W, C)`` or ``(N, D, H, W, C)``).

    Attributes:
        features: number of output channels.
        kernel_size: window size, an int or one int per spatial dim.
        stride, padding, dilation, groups, padding_mode: as in ``F.conv`` (padding defaults to 0,
            as in PyTorch; ``"SAME"`` and ``"VALID"`` are accepted).
        use_bias: whether to add a learned ``bias``.
        kernel_init: initializer of ``kernel`` (default He normal, suited to ReLU networks).
        bias_init: initializer of ``bias`` (default zeros).
        flip: True computes the signal-processing convolution (``F.convolve``).
        dtype: computation dtype (default: inferred from inputs and params).
        param_dtype: dtype of the parameters.

    Example:
        >>> import jcnn
        >>> layer = jcnn.nn.Conv(features=10, kernel_size=(5, 5), padding=2)
        >>> x = jnp.ones((1, 32, 32, 3))
        >>> params = layer.init(jax.random.key(0), x)
        >>> params["params"]["kernel"].shape, layer.apply(params, x).shape
        ((5, 5, 3, 10), (1, 32, 32, 10))
    """

    features: int
    kernel_size: int | Sequence[int]
    stride: int | Sequence[int] = 1
    padding: PaddingLike = 0
    dilation: int | Sequence[int] = 1
    groups: int = 1
    padding_mode: str = "zeros"
    use_bias: bool = True
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = None
    flip: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layer to ``x`` ``(N, *spatial, C_in)``; returns ``(N, *out, features)``."""
        spec = conv_kernel(*_window_and_channels(self, x), self.features, self.groups)
        x, kernel, bias = kernel_and_bias(self, x, spec)
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


class DepthwiseConv(nn.Module):
    """Depthwise convolution: each input channel convolved with its own ``depth_multiplier``
    filters (Keras' ``DepthwiseConv2D``; PyTorch's ``Conv2d(C, C * depth_multiplier, k,
    groups=C)``).

    It is ``F.conv`` with ``groups = C_in`` and a kernel ``(*window, 1, C_in * depth_multiplier)``.
    Output channel ``c * depth_multiplier + j`` is filter ``j`` of input channel ``c``, PyTorch's
    order, so a PyTorch weight ``(C_in * depth_multiplier, 1, *window)`` moves over as in ``Conv``
    (``weight.permute(2, 3, 1, 0)`` in 2-D).

    Attributes:
        kernel_size: window size, an int (spatial rank from the input) or one int per spatial dim.
        depth_multiplier: filters per input channel, a positive int (default 1).
        stride, padding, dilation, padding_mode: as in ``F.conv`` (padding defaults to 0).
        use_bias: whether to add a learned ``bias`` ``(C_in * depth_multiplier,)``.
        kernel_init: initializer of ``kernel`` (default He normal with ``groups = C_in``, as
            ``Conv`` with those groups: ``fan_in = prod(window)``).
        bias_init, dtype, param_dtype: as in ``Conv``.

    Example:
        >>> import jcnn
        >>> layer = jcnn.nn.DepthwiseConv((3, 3), depth_multiplier=2, padding=1)
        >>> x = jnp.ones((1, 8, 8, 3))
        >>> params = layer.init(jax.random.key(0), x)
        >>> params["params"]["kernel"].shape, layer.apply(params, x).shape
        ((3, 3, 1, 6), (1, 8, 8, 6))
    """

    kernel_size: int | Sequence[int]
    depth_multiplier: int = 1
    stride: int | Sequence[int] = 1
    padding: PaddingLike = 0
    dilation: int | Sequence[int] = 1
    padding_mode: str = "zeros"
    use_bias: bool = True
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layer to ``x`` ``(N, *spatial, C_in)``; returns
        ``(N, *out, C_in * depth_multiplier)``."""
        check_positive_int(self.depth_multiplier, "depth_multiplier")
        window = window_and_check(self.kernel_size, x, "kernel_size")
        c_in = x.shape[-1]
        spec = depthwise_kernel(window, c_in, self.depth_multiplier)
        x, kernel, bias = kernel_and_bias(self, x, spec)
        check_kernel_fits(self, x.shape[1:-1], kernel.shape[:-2])
        return F.conv(
            x,
            kernel,
            bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=c_in,
            padding_mode=self.padding_mode,
        )


class ConvTranspose(nn.Module):
    """Transposed convolution (the gradient of ``Conv`` with respect to its input).

    ``kernel`` has shape ``(*window, C_in, features // groups)``: PyTorch's ``ConvTranspose``
    weight ``(C_in, C_out // groups, *window)`` with its axes moved, no flip, so that outputs equal
    ``torch.nn.functional.conv_transpose2d`` with the same weights and arguments.

    Attributes:
        features: number of output channels.
        kernel_size: window size, an int or one int per spatial dim.
        stride, padding, output_padding, dilation, groups: as in ``F.conv_transpose``.
        kernel_init: initializer of ``kernel`` (default He normal with
            ``fan_in = prod(window) * C_in // groups``).
        use_bias, bias_init, dtype, param_dtype: as in ``Conv``.

    Example:
        >>> import jcnn
        >>> layer = jcnn.nn.ConvTranspose(features=4, kernel_size=2, stride=2)
        >>> x = jnp.ones((1, 5, 5, 3))
        >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
        (1, 10, 10, 4)
    """

    features: int
    kernel_size: int | Sequence[int]
    stride: int | Sequence[int] = 1
    padding: PaddingLike = 0
    output_padding: int | Sequence[int] = 0
    dilation: int | Sequence[int] = 1
    groups: int = 1
    use_bias: bool = True
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layer to ``x`` ``(N, *spatial, C_in)``; returns ``(N, *out, features)``."""
        spec = conv_transpose_kernel(*_window_and_channels(self, x), self.features, self.groups)
        x, kernel, bias = kernel_and_bias(self, x, spec)
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
