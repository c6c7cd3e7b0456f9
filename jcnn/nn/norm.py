"""Normalization modules: ``BatchNorm``, ``LayerNorm``, ``GroupNorm``, ``InstanceNorm``,
``LocalContrastNorm`` and ``LocalResponseNorm``, thin wrappers of the ``F.*_norm`` functions.

Learned parameters are per channel (last axis): ``scale`` and ``bias`` of shape ``(C,)``.
Running statistics live in Flax's ``batch_stats`` collection as ``mean`` and ``var`` of shape
``(C,)``, in ``param_dtype`` widened to at least float32 (float32 for half-precision parameters,
float64 for float64 ones); they change only in a call with ``train=True`` (and
``mutable=["batch_stats"]``), never during ``init``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from jcnn import functional as F
from jcnn import init
from jcnn.functional._checks import (
    check_bool,
    check_dtype,
    check_min_rank,
    check_positive_int,
    check_real,
)
from jcnn.nn._shared import Initializer, check_initializer, running_stats_dtype
from jcnn.nn._util import param

__all__ = [
    "BatchNorm",
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm",
    "LocalContrastNorm",
    "LocalResponseNorm",
]


def _scale_and_bias(module, x):
    """The module's ``(C,)`` ``scale`` and ``bias`` parameters (``C`` the channels of ``x``),
    each ``None`` when not learned."""
    check_bool(module.use_scale, "use_scale")
    check_bool(module.use_bias, "use_bias")
    scale_init = check_initializer(module.scale_init, "scale_init")
    bias_init = check_initializer(module.bias_init, "bias_init")
    shape = (x.shape[-1],)
    scale = (
        param(module, "scale", scale_init, shape, module.param_dtype, x)
        if module.use_scale
        else None
    )
    bias = (
        param(module, "bias", bias_init, shape, module.param_dtype, x) if module.use_bias else None
    )
    return scale, bias


def _running_stats(module, channels: int):
    dtype = running_stats_dtype(module.param_dtype)
    mean = module.variable("batch_stats", "mean", jnp.zeros, (channels,), dtype)
    var = module.variable("batch_stats", "var", jnp.ones, (channels,), dtype)
    return mean, var


def _store_running_stats(module, mean, var, new_state: F.BatchNormState, train: bool) -> None:
    """Write ``new_state`` into the ``batch_stats`` variables in training (never during init)."""
    if train and not module.is_initializing():
        mean.value = new_state.mean
        var.value = new_state.var


class BatchNorm(nn.Module):
    """Batch normalization over every axis but the last (channels), ``F.batch_norm``.

    With ``train=True`` it normalizes with the batch statistics and updates the running ones,
    ``new = momentum * old + (1 - momentum) * batch`` (``momentum`` is the decay: PyTorch's
    ``momentum=m`` is jcnn's ``1 - m``); with ``train=False`` it uses the running statistics and
    changes nothing.

    Attributes:
        momentum: decay of the running averages (default 0.99, as in the course notes and Flax).
        eps: added to the variance before the square root.
        axis_name: a ``pmap``/``shard_map`` axis name over which batch statistics are averaged.
        unbiased_running_var: store the unbiased batch variance in the running average, as
            PyTorch does (default False: the biased one, as in the course notes and Flax).
        use_scale: learn a per-channel ``scale`` (gamma); without it the scale is 1.
        use_bias: learn a per-channel ``bias`` (beta); without it the bias is 0.
        scale_init, bias_init: initializers (ones and zeros).
        dtype: computation dtype of the output; param_dtype: dtype of ``scale`` and ``bias``.

    Example:
        >>> import jcnn
        >>> bn = jcnn.nn.BatchNorm()
        >>> x = jnp.arange(8.0).reshape(4, 2)
        >>> variables = bn.init(jax.random.key(0), x, train=False)
        >>> y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
        >>> [round(float(v), 3) for v in updates["batch_stats"]["mean"]]
        [0.03, 0.04]
    """

    momentum: float = 0.99
    eps: float = 1e-5
    axis_name: str | None = None
    unbiased_running_var: bool = False
    use_scale: bool = True
    use_bias: bool = True
    scale_init: Initializer = init.ones
    bias_init: Initializer = init.zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Normalize ``x`` of shape ``(N, ..., C)``; running stats update only when ``train``."""
        check_min_rank(x, "x", 2, "(N, ..., C)")
        channels = x.shape[-1]
        mean, var = _running_stats(self, channels)
        scale, bias = _scale_and_bias(self, x)
        x, scale, bias = promote_dtype(x, scale, bias, dtype=check_dtype(self.dtype))
        y, new_state = F.batch_norm(
            x,
            scale,
            bias,
            F.BatchNormState(mean.value, var.value),
            train=train,
            momentum=self.momentum,
            eps=self.eps,
            axis_name=None if self.is_initializing() else self.axis_name,
            unbiased_running_var=self.unbiased_running_var,
        )
        _store_running_stats(self, mean, var, new_state, train)
        return y


class LayerNorm(nn.Module):
    """Layer normalization, ``F.layer_norm``: each example over all its axes (spatial and
    channels, as in the course notes), then a per-channel affine map.

    Attributes:
        eps: added to the variance before the square root.
        use_scale, use_bias, scale_init, bias_init, dtype, param_dtype: as in ``BatchNorm``.
    """

    eps: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    scale_init: Initializer = init.ones
    bias_init: Initializer = init.zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalize ``x`` of shape ``(N, ..., C)``."""
        check_min_rank(x, "x", 2, "(N, ..., C)")
        scale, bias = _scale_and_bias(self, x)
        x, scale, bias = promote_dtype(x, scale, bias, dtype=check_dtype(self.dtype))
        return F.layer_norm(x, scale, bias, eps=self.eps)


class GroupNorm(nn.Module):
    """Group normalization, ``F.group_norm``: statistics per example over each group of channels.

    Attributes:
        num_groups: number of channel groups (must divide the channels).
        eps, use_scale, use_bias, scale_init, bias_init, dtype, param_dtype: as in ``LayerNorm``.
    """

    num_groups: int = 32
    eps: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    scale_init: Initializer = init.ones
    bias_init: Initializer = init.zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalize ``x`` of shape ``(N, ..., C)``."""
        check_min_rank(x, "x", 2, "(N, ..., C)")
        channels = x.shape[-1]
        num_groups = check_positive_int(self.num_groups, "num_groups")
        if channels % num_groups:
            raise ValueError(
                f"num_groups: the channels ({channels}) must be divisible by num_groups "
                f"({num_groups})"
            )
        scale, bias = _scale_and_bias(self, x)
        x, scale, bias = promote_dtype(x, scale, bias, dtype=check_dtype(self.dtype))
        return F.group_norm(x, scale, bias, num_groups=num_groups, eps=self.eps)


class InstanceNorm(nn.Module):
    """Instance normalization, ``F.instance_norm``: statistics per example and channel.

    With ``track_running_stats=True`` it also keeps running averages in ``batch_stats`` and,
    like ``BatchNorm``, normalizes with them when ``train=False``; ``train`` must then be given.

    Attributes:
        track_running_stats: keep running statistics (PyTorch's option of the same name).
        momentum: decay of the running averages.
        unbiased_running_var: as in ``BatchNorm``.
        eps, use_scale, use_bias, scale_init, bias_init, dtype, param_dtype: as in ``LayerNorm``.
    """

    track_running_stats: bool = False
    momentum: float = 0.99
    unbiased_running_var: bool = False
    eps: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    scale_init: Initializer = init.ones
    bias_init: Initializer = init.zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        """Normalize ``x`` of shape ``(N, *spatial, C)``."""
        check_min_rank(x, "x", 3, "(N, *spatial, C)")
        channels = x.shape[-1]
        scale, bias = _scale_and_bias(self, x)
        x, scale, bias = promote_dtype(x, scale, bias, dtype=check_dtype(self.dtype))
        # checked even when unused, as a wrong value there is a mistake all the same
        check_real(self.momentum, "momentum", low=0, high=1)
        check_bool(self.unbiased_running_var, "unbiased_running_var")
        if not check_bool(self.track_running_stats, "track_running_stats"):
            return F.instance_norm(x, scale, bias, eps=self.eps)
        if train is None:
            raise ValueError("train: InstanceNorm(track_running_stats=True) needs train=True/False")
        mean, var = _running_stats(self, channels)
        y, new_state = F.instance_norm(
            x,
            scale,
            bias,
            F.BatchNormState(mean.value, var.value),
            train=train,
            momentum=self.momentum,
            eps=self.eps,
            unbiased_running_var=self.unbiased_running_var,
        )
        _store_running_stats(self, mean, var, new_state, train)
        return y


class LocalContrastNorm(nn.Module):
    """Local contrast normalization (Jarrett et al. 2009), ``F.local_contrast_norm``.

    Subtracts a Gaussian-weighted local mean over a ``size x size`` window and all channels, then
    divides by ``max(c, local std, eps)``, ``c`` the mean local std of the example. No parameters.

    Attributes:
        size: side of the Gaussian window.
        sigma: its standard deviation (``None``: the functional default).
        eps: the floor of the divisor.
    """

    size: int = 9
    sigma: float | None = None
    eps: float = 1e-4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalize ``x`` of shape ``(N, *spatial, C)`` (1 to 3 spatial axes)."""
        return F.local_contrast_norm(x, size=self.size, sigma=self.sigma, eps=self.eps)


class LocalResponseNorm(nn.Module):
    """Local response normalization across channels (Krizhevsky et al. 2012).

    Attributes:
        size: number of neighbouring channels summed over.
        alpha, beta, k: the constants of ``F.local_response_norm``.
    """

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalize ``x`` of shape ``(N, ..., C)``."""
        return F.local_response_norm(x, self.size, alpha=self.alpha, beta=self.beta, k=self.k)
