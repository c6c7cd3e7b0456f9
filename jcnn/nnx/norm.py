"""Normalization modules, NNX twins of ``jcnn.nn``'s: ``BatchNorm``, ``LayerNorm``,
``GroupNorm``, ``InstanceNorm``, ``LocalContrastNorm``, ``LocalResponseNorm``.

Learned ``scale`` and ``bias`` are ``nnx.Param`` of shape ``(num_features,)``; running statistics
``mean`` and ``var`` are ``nnx.BatchStat`` (the Linen twin's ``batch_stats`` collection), in
``param_dtype`` widened to at least float32, as there.

Train or evaluate: the ``use_running_average`` attribute decides (False after construction and
``model.train()``, True after ``model.eval()`` or in ``nnx.view(model, use_running_average=True)``),
unless a call passes ``train=True``/``False``, which overrides it for that call, as in ``jcnn.nn``.
Running statistics change only in a training call.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import promote_dtype

from jcnn import functional as F
from jcnn import init
from jcnn.functional._checks import (
    check_bool,
    check_count,
    check_dtype,
    check_min_rank,
    check_positive_int,
    check_real,
)
from jcnn.functional.norm import _check_axis_name
from jcnn.nn._shared import running_stats_dtype
from jcnn.nnx._util import (
    Initializer,
    check_flag,
    check_initializer,
    check_rngs,
    check_settings,
    param,
    settings_rank,
    static,
    training,
    value,
)

__all__ = [
    "BatchNorm",
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm",
    "LocalContrastNorm",
    "LocalResponseNorm",
]


def _check_positive(value, name: str) -> float:
    """``eps``, ``k`` or ``sigma`` as a Python float, checked as the ``F`` norms check it."""
    return check_real(value, name, low=0, low_open=True)


class _Affine(nnx.Module):
    """Holds the per-channel ``scale`` and ``bias`` (each ``None`` when not learned)."""

    def _make_affine(
        self,
        num_features,
        use_scale,
        use_bias,
        scale_init,
        bias_init,
        param_dtype,
        dtype,
        rngs,
        owner,
    ):
        check_rngs(rngs, owner)
        check_positive_int(num_features, "num_features")
        check_bool(use_scale, "use_scale")
        check_bool(use_bias, "use_bias")
        scale_init = check_initializer(scale_init, "scale_init")
        bias_init = check_initializer(bias_init, "bias_init")
        self.num_features = static(num_features, "num_features")
        self.dtype = check_dtype(dtype)
        shape = (self.num_features,)
        self.scale = param(rngs, scale_init, shape, param_dtype) if use_scale else None
        self.bias = param(rngs, bias_init, shape, param_dtype) if use_bias else None

    def _operands(self, x, min_rank: int, layout: str):
        check_min_rank(x, "x", min_rank, layout)
        if x.shape[-1] != self.num_features:
            raise ValueError(
                f"x: {type(self).__name__} was built for num_features={self.num_features} "
                f"channels on the last axis, got shape {tuple(x.shape)}"
            )
        return promote_dtype(x, value(self.scale), value(self.bias), dtype=check_dtype(self.dtype))


class _RunningStats(_Affine):
    def _make_stats(self, use_running_average, param_dtype):
        self.use_running_average = check_bool(use_running_average, "use_running_average")
        dtype = running_stats_dtype(param_dtype)
        self.mean = nnx.BatchStat(jnp.zeros((self.num_features,), dtype))
        self.var = nnx.BatchStat(jnp.ones((self.num_features,), dtype))

    def _state(self) -> F.BatchNormState:
        return F.BatchNormState(self.mean[...], self.var[...])

    def _store(self, new_state: F.BatchNormState) -> None:
        self.mean[...] = new_state.mean
        self.var[...] = new_state.var

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: set ``use_running_average`` when given."""
        if use_running_average is not None:
            check_flag(use_running_average, "use_running_average")
            self.use_running_average = use_running_average


class BatchNorm(_RunningStats):
    """Batch normalization over every axis but the last, ``F.batch_norm``; the NNX twin of
    ``jcnn.nn.BatchNorm`` (same arguments and defaults, ``momentum`` the decay of the running
    averages). ``momentum``, ``eps``, ``axis_name``, ``unbiased_running_var``, ``use_scale``,
    ``use_bias``, ``scale_init``, ``bias_init``, ``dtype`` and ``param_dtype`` are as in
    ``jcnn.nn.BatchNorm``.

    Args:
        num_features: number of channels (last axis).
        use_running_average: evaluate with the running statistics (``model.eval()`` sets it,
            ``model.train()`` clears it).
        rngs: ``nnx.Rngs`` for the initializers.

    Example:
        >>> import jcnn
        >>> from flax import nnx
        >>> bn = jcnn.nnx.BatchNorm(2, rngs=nnx.Rngs(0))
        >>> y = bn(jnp.arange(8.0).reshape(4, 2))          # training: updates the statistics
        >>> [round(float(v), 3) for v in bn.mean[...]]
        [0.03, 0.04]
        >>> bn.eval()
        >>> y = bn(jnp.arange(8.0).reshape(4, 2))          # evaluation: uses them, no update
        >>> [round(float(v), 3) for v in bn.mean[...]]
        [0.03, 0.04]
    """

    def __init__(
        self,
        num_features: int,
        momentum: float = 0.99,
        eps: float = 1e-5,
        axis_name: str | None = None,
        unbiased_running_var: bool = False,
        use_scale: bool = True,
        use_bias: bool = True,
        scale_init: Initializer = init.ones,
        bias_init: Initializer = init.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        *,
        use_running_average: bool = False,
        rngs: nnx.Rngs,
    ) -> None:
        self._make_affine(
            num_features,
            use_scale,
            use_bias,
            scale_init,
            bias_init,
            param_dtype,
            dtype,
            rngs,
            "BatchNorm",
        )
        self.momentum = check_real(momentum, "momentum", low=0, high=1)
        self.eps = _check_positive(eps, "eps")
        self.axis_name = static(axis_name, "axis_name")
        _check_axis_name(self.axis_name)
        self.unbiased_running_var = check_bool(unbiased_running_var, "unbiased_running_var")
        self._make_stats(use_running_average, param_dtype)

    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        """Normalize ``x`` ``(N, ..., C)``; ``train`` (when given) overrides the attribute."""
        train = training(train, not self.use_running_average)
        x, scale, bias = self._operands(x, 2, "(N, ..., C)")
        y, new_state = F.batch_norm(
            x,
            scale,
            bias,
            self._state(),
            train=train,
            momentum=self.momentum,
            eps=self.eps,
            axis_name=self.axis_name,
            unbiased_running_var=self.unbiased_running_var,
        )
        if train:
            self._store(new_state)
        return y


class LayerNorm(_Affine):
    """Layer normalization, ``F.layer_norm``; the NNX twin of ``jcnn.nn.LayerNorm``.

    Args:
        num_features: number of channels (last axis).
        eps, use_scale, use_bias, scale_init, bias_init, dtype, param_dtype: as the twin's.
        rngs: ``nnx.Rngs`` for the initializers.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        use_scale: bool = True,
        use_bias: bool = True,
        scale_init: Initializer = init.ones,
        bias_init: Initializer = init.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        self._make_affine(
            num_features,
            use_scale,
            use_bias,
            scale_init,
            bias_init,
            param_dtype,
            dtype,
            rngs,
            "LayerNorm",
        )
        self.eps = _check_positive(eps, "eps")

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalize ``x`` of shape ``(N, ..., C)``."""
        x, scale, bias = self._operands(x, 2, "(N, ..., C)")
        return F.layer_norm(x, scale, bias, eps=self.eps)


class GroupNorm(_Affine):
    """Group normalization, ``F.group_norm``; the NNX twin of ``jcnn.nn.GroupNorm``.

    Args:
        num_features: number of channels (last axis), divisible by ``num_groups``.
        num_groups, eps, use_scale, use_bias, scale_init, bias_init, dtype, param_dtype: as the
            twin's.
        rngs: ``nnx.Rngs`` for the initializers.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        use_scale: bool = True,
        use_bias: bool = True,
        scale_init: Initializer = init.ones,
        bias_init: Initializer = init.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        check_positive_int(num_groups, "num_groups")
        check_positive_int(num_features, "num_features")
        if num_features % num_groups:
            raise ValueError(
                f"num_groups: the channels (num_features={num_features}) must be divisible by "
                f"num_groups ({num_groups})"
            )
        self._make_affine(
            num_features,
            use_scale,
            use_bias,
            scale_init,
            bias_init,
            param_dtype,
            dtype,
            rngs,
            "GroupNorm",
        )
        self.num_groups, self.eps = static(num_groups, "num_groups"), _check_positive(eps, "eps")

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalize ``x`` of shape ``(N, ..., C)``."""
        x, scale, bias = self._operands(x, 2, "(N, ..., C)")
        return F.group_norm(x, scale, bias, num_groups=self.num_groups, eps=self.eps)


class InstanceNorm(_RunningStats):
    """Instance normalization, ``F.instance_norm``; the NNX twin of ``jcnn.nn.InstanceNorm``.

    With ``track_running_stats=True`` it keeps ``mean`` and ``var`` as ``nnx.BatchStat`` and, in
    evaluation (``use_running_average`` or ``train=False``), normalizes with them; without it,
    train and evaluation are the same and it holds no statistics. ``track_running_stats``,
    ``momentum``, ``unbiased_running_var``, ``eps``, ``use_scale``, ``use_bias``, ``scale_init``,
    ``bias_init``, ``dtype`` and ``param_dtype`` are as in the twin.

    Args:
        num_features: number of channels (last axis).
        use_running_average: as in ``BatchNorm`` (used only with ``track_running_stats``).
        rngs: ``nnx.Rngs`` for the initializers.
    """

    def __init__(
        self,
        num_features: int,
        track_running_stats: bool = False,
        momentum: float = 0.99,
        unbiased_running_var: bool = False,
        eps: float = 1e-5,
        use_scale: bool = True,
        use_bias: bool = True,
        scale_init: Initializer = init.ones,
        bias_init: Initializer = init.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        *,
        use_running_average: bool = False,
        rngs: nnx.Rngs,
    ) -> None:
        self._make_affine(
            num_features,
            use_scale,
            use_bias,
            scale_init,
            bias_init,
            param_dtype,
            dtype,
            rngs,
            "InstanceNorm",
        )
        self.track_running_stats = check_bool(track_running_stats, "track_running_stats")
        # checked even when unused, as a wrong value there is a mistake all the same
        self.momentum = check_real(momentum, "momentum", low=0, high=1)
        self.unbiased_running_var = check_bool(unbiased_running_var, "unbiased_running_var")
        self.eps = _check_positive(eps, "eps")
        if track_running_stats:
            self._make_stats(use_running_average, param_dtype)
        else:
            self.use_running_average = check_bool(use_running_average, "use_running_average")

    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        """Normalize ``x`` ``(N, *spatial, C)``; ``train`` (when given) overrides the attribute."""
        train = training(train, not self.use_running_average)
        x, scale, bias = self._operands(x, 3, "(N, *spatial, C)")
        if not self.track_running_stats:
            return F.instance_norm(x, scale, bias, eps=self.eps)
        y, new_state = F.instance_norm(
            x,
            scale,
            bias,
            self._state(),
            train=train,
            momentum=self.momentum,
            eps=self.eps,
            unbiased_running_var=self.unbiased_running_var,
        )
        if train:
            self._store(new_state)
        return y


class LocalContrastNorm(nnx.Module):
    """Local contrast normalization (Jarrett et al. 2009), ``F.local_contrast_norm``; the NNX
    twin of ``jcnn.nn.LocalContrastNorm`` (no parameters).

    Args:
        size, sigma, eps: as the twin's.
    """

    def __init__(self, size: int = 9, sigma: float | None = None, eps: float = 1e-4) -> None:
        self.size = static(size, "size")
        self.sigma = None if sigma is None else _check_positive(sigma, "sigma")
        self.eps = _check_positive(eps, "eps")
        check_settings(self, LocalContrastNorm, settings_rank(self.size), 1, window=self.size)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalize ``x`` of shape ``(N, *spatial, C)``."""
        return F.local_contrast_norm(x, size=self.size, sigma=self.sigma, eps=self.eps)


class LocalResponseNorm(nnx.Module):
    """Local response normalization across channels, ``F.local_response_norm``; the NNX twin of
    ``jcnn.nn.LocalResponseNorm`` (no parameters).

    Args:
        size, alpha, beta, k: as the twin's.
    """

    def __init__(
        self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0
    ) -> None:
        self.size = check_count(size, "size")
        self.alpha = check_real(alpha, "alpha", low=0)
        self.beta, self.k = check_real(beta, "beta"), _check_positive(k, "k")

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalize ``x`` of shape ``(N, ..., C)``."""
        return F.local_response_norm(x, self.size, alpha=self.alpha, beta=self.beta, k=self.k)
