"""Pooling modules, NNX twins of ``jcnn.nn``'s: ``MaxPool``, ``AvgPool``, ``LPPool``,
``GlobalAvgPool``, ``GlobalMaxPool``, ``AdaptiveAvgPool``, ``AdaptiveMaxPool``.

Parameter-free wrappers of the ``F`` pooling functions, with the twin's arguments and defaults
(the stride defaults to the window; an int window takes its spatial rank from the input).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from jcnn import functional as F
from jcnn.functional._checks import PaddingLike, check_real
from jcnn.nnx._util import check_settings, settings_rank, static

__all__ = [
    "MaxPool",
    "AvgPool",
    "LPPool",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "AdaptiveAvgPool",
    "AdaptiveMaxPool",
]


class MaxPool(nnx.Module):
    """Max pooling, ``F.max_pool``.

    Args:
        window, stride, padding, dilation, ceil_mode: as in ``F.max_pool``.

    Example:
        >>> import jcnn
        >>> jcnn.nnx.MaxPool(2)(jnp.ones((1, 28, 28, 20))).shape
        (1, 14, 14, 20)
    """

    def __init__(
        self,
        window: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: PaddingLike = 0,
        dilation: int | Sequence[int] = 1,
        ceil_mode: bool = False,
    ) -> None:
        self.window, self.stride = static(window, "window"), static(stride, "stride")
        self.padding, self.dilation = static(padding, "padding"), static(dilation, "dilation")
        self.ceil_mode = static(ceil_mode, "ceil_mode")
        check_settings(
            self,
            MaxPool,
            settings_rank(self.window, self.stride, self.dilation, self.padding),
            1,
            window=self.window,
            dilation=self.dilation,
            padding=self.padding,
        )

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


class AvgPool(nnx.Module):
    """Average pooling, ``F.avg_pool``.

    Args:
        window, stride, padding, ceil_mode, count_include_pad: as in ``F.avg_pool``.
    """

    def __init__(
        self,
        window: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: PaddingLike = 0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
    ) -> None:
        self.window, self.stride = static(window, "window"), static(stride, "stride")
        self.padding, self.ceil_mode = static(padding, "padding"), static(ceil_mode, "ceil_mode")
        self.count_include_pad = static(count_include_pad, "count_include_pad")
        rank = settings_rank(self.window, self.stride, self.padding)
        check_settings(self, AvgPool, rank, 1, window=self.window, padding=self.padding)

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


class LPPool(nnx.Module):
    """Power-average pooling, ``F.lp_pool``.

    Args:
        p, window, stride: as in ``F.lp_pool``.
    """

    def __init__(
        self, p: float, window: int | Sequence[int], stride: int | Sequence[int] | None = None
    ) -> None:
        self.p, self.window = check_real(p, "p", low=0, low_open=True), static(window, "window")
        self.stride = static(stride, "stride")
        check_settings(self, LPPool, settings_rank(self.window, self.stride), 1, window=self.window)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Pool ``x`` of shape ``(N, *spatial, C)``."""
        return F.lp_pool(x, self.p, self.window, self.stride)


class GlobalAvgPool(nnx.Module):
    """Mean over all spatial positions, ``(N, *spatial, C)`` to ``(N, C)``."""

    def __call__(self, x: jax.Array) -> jax.Array:
        """Pool ``x`` of shape ``(N, *spatial, C)``."""
        return F.global_avg_pool(x)


class GlobalMaxPool(nnx.Module):
    """Maximum over all spatial positions, ``(N, *spatial, C)`` to ``(N, C)``."""

    def __call__(self, x: jax.Array) -> jax.Array:
        """Pool ``x`` of shape ``(N, *spatial, C)``."""
        return F.global_max_pool(x)


class AdaptiveAvgPool(nnx.Module):
    """Average pooling to a fixed output size, ``F.adaptive_avg_pool``.

    Args:
        output_size: an int or one int per spatial dim.
    """

    def __init__(self, output_size: int | Sequence[int]) -> None:
        self.output_size = static(output_size, "output_size")
        check_settings(
            self, AdaptiveAvgPool, settings_rank(self.output_size), 1, window=self.output_size
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Pool ``x`` of shape ``(N, *spatial, C)`` to ``(N, *output_size, C)``."""
        return F.adaptive_avg_pool(x, self.output_size)


class AdaptiveMaxPool(nnx.Module):
    """Max pooling to a fixed output size, ``F.adaptive_max_pool``.

    Args:
        output_size: an int or one int per spatial dim.
    """

    def __init__(self, output_size: int | Sequence[int]) -> None:
        self.output_size = static(output_size, "output_size")
        check_settings(
            self, AdaptiveMaxPool, settings_rank(self.output_size), 1, window=self.output_size
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Pool ``x`` of shape ``(N, *spatial, C)`` to ``(N, *output_size, C)``."""
        return F.adaptive_max_pool(x, self.output_size)
