"""Pooling modules: ``MaxPool``, ``AvgPool``, ``LPPool``, ``GlobalAvgPool``, ``GlobalMaxPool``,
``AdaptiveAvgPool``, ``AdaptiveMaxPool``.

Parameter-free wrappers of the ``F`` pooling functions of the same names; the stride defaults to
the window, as in PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from jcnn import functional as F
from jcnn.functional._checks import PaddingLike

__all__ = [
    "MaxPool",
    "AvgPool",
    "LPPool",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "AdaptiveAvgPool",
    "AdaptiveMaxPool",
]


class MaxPool(nn.Module):
    """Max pooling over a window of each channel (1-, 2- or 3-D, from the input's rank).

    Attributes:
        window, stride, padding, dilation, ceil_mode: as in ``F.max_pool``.

    Example:
        >>> import jcnn
        >>> jcnn.nn.MaxPool(2).apply({}, jnp.ones((1, 28, 28, 20))).shape
        (1, 14, 14, 20)
    """

    window: int | Sequence[int]
    stride: int | Sequence[int] | None = None
    padding: PaddingLike = 0
    dilation: int | Sequence[int] = 1
    ceil_mode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Pool ``x`` of shape ``(N, *spatial, C)``."""
        return F.max_pool(
            x,
            self.window,
            self.stride,
            self.padding,
            dilation=self.dilation,
            ceil_mode=self.ceil_mode,
        )


class AvgPool(nn.Module):
    """Average pooling over a window of each channel.

    Attributes:
        window, stride, padding, ceil_mode, count_include_pad: as in ``F.avg_pool``.
    """

    window: int | Sequence[int]
    stride: int | Sequence[int] | None = None
    padding: PaddingLike = 0
    ceil_mode: bool = False
    count_include_pad: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Pool ``x`` of shape ``(N, *spatial, C)``."""
        return F.avg_pool(
            x,
            self.window,
            self.stride,
            self.padding,
            ceil_mode=self.ceil_mode,
            count_include_pad=self.count_include_pad,
        )


class LPPool(nn.Module):
    """Power-average pooling, ``(sum over the window of x**p) ** (1/p)``.

    Attributes:
        p: the power (1 is sum pooling, large p approaches max pooling).
        window, stride: as in ``F.lp_pool``.
    """

    p: float
    window: int | Sequence[int]
    stride: int | Sequence[int] | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Pool ``x`` of shape ``(N, *spatial, C)``."""
        return F.lp_pool(x, self.p, self.window, self.stride)


class GlobalAvgPool(nn.Module):
    """Mean over all spatial positions: ``(N, *spatial, C)`` to ``(N, C)``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Pool ``x`` of shape ``(N, *spatial, C)``."""
        return F.global_avg_pool(x)


class GlobalMaxPool(nn.Module):
    """Maximum over all spatial positions: ``(N, *spatial, C)`` to ``(N, C)``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Pool ``x`` of shape ``(N, *spatial, C)``."""
        return F.global_max_pool(x)


class AdaptiveAvgPool(nn.Module):
    """Average pooling to a fixed output size whatever the input size (as PyTorch's).

    Attributes:
        output_size: an int or one int per spatial dim.
    """

    output_size: int | Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Pool ``x`` of shape ``(N, *spatial, C)`` to ``(N, *output_size, C)``."""
        return F.adaptive_avg_pool(x, self.output_size)


class AdaptiveMaxPool(nn.Module):
    """Max pooling to a fixed output size whatever the input size (as PyTorch's).

    Attributes:
        output_size: an int or one int per spatial dim.
    """

    output_size: int | Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Pool ``x`` of shape ``(N, *spatial, C)`` to ``(N, *output_size, C)``."""
        return F.adaptive_max_pool(x, self.output_size)
