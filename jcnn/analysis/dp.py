"""DP-SGD's private gradient for any optax optimizer: clip each example, sum, add noise, average.

``private_grad`` computes ``(sum_i w_i clip_C(g_i) + N(0, (sigma C)^2 I)) / denominator`` from a
loss, parameters and a batch, with the norms and the clipped sum from ``ghost_clipped_sum`` (one
pass, ghost norms or each layer's own per-example gradient, whichever is cheaper; no ``B`` copies
of the parameters) or from the materialized ``per_example_grads``; any optax optimizer then takes
it as its gradient (Abadi et al. 2016 use SGD; the privacy guarantee holds for any optimizer, which
only post-processes it).

With ``Loader(..., sampling="poisson")`` the batches have random sizes; ``pad_batch`` pads them
to a few fixed sizes (so that a jitted step compiles a few times, not once per size), the mask of
real examples is ``weights`` and ``denominator`` is the expected batch size, as the accountant
(``dp_epsilon``) assumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcnn.analysis.ghost import _check_weight_values, _check_weights, _ghost_clipped_sum
from jcnn.analysis.per_example import (
    _add_gaussian_noise,
    _batch_size,
    _check_finite,
    _clip_factors,
    _norms,
    _per_example_grads,
)
from jcnn.functional._checks import check_extent, check_key

__all__ = ["private_grad", "pad_batch"]

_METHODS = ("ghost", "materialize")


def private_grad(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    key: jax.Array,
    *,
    l2_norm_clip: float,
    noise_multiplier: float,
    weights: jax.Array | None = None,
    denominator: float | None = None,
    method: str = "ghost",
    chunk_size: int | None = None,
) -> tuple[Any, jax.Array]:
    """The DP-SGD gradient of one batch: clipped per-example gradients, summed, noised, averaged.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``; each example's gradient is that of
        ``loss_fn`` on the batch made of it alone (as in ``per_example_grads``).
      params: the parameters (any pytree).
      batch: a pytree of arrays with a common leading batch axis ``B``.
      key: a ``jax.random`` key (typed, or a raw ``PRNGKey``) for the noise (a fresh one each
        step: e.g. ``fold_in(key, step)``).
      l2_norm_clip: the per-example bound ``C`` > 0.
      noise_multiplier: ``sigma`` >= 0: the noise's standard deviation is ``sigma * C``.
      weights: optional ``(B,)`` weights of the examples in ``[0, 1]``, 0 for padding
        (``pad_batch``'s mask).
      denominator: what the noised sum is divided by: the expected batch size under Poisson
        sampling (``loader.batch_size``), required with ``weights``; default ``B``.
      method: ``"ghost"`` (default): ``ghost_clipped_sum`` (one pass, no ``B`` copies of the
        parameters); ``"materialize"``: ``per_example_grads`` then clipping.
      chunk_size: as in ``per_example_grads``.

    Returns:
      ``(gradient, norms)``: a pytree like ``params`` and the ``(B,)`` per-example norms before
      clipping (for monitoring; they are not private).

    >>> import jcnn
    >>> model = jcnn.nn.Dense(1, use_bias=False)
    >>> loss = lambda p, b: jnp.mean((model.apply({"params": p}, b[0])[:, 0] - b[1]) ** 2)
    >>> x, y = jnp.array([[3.0, 4.0], [0.0, 1.0]]), jnp.array([0.0, 0.0])
    >>> params = {"kernel": jnp.ones((2, 1))}
    >>> grad, norms = private_grad(loss, params, (x, y), jax.random.key(0), l2_norm_clip=1.0,
    ...                            noise_multiplier=0.0)
    >>> np.round(grad["kernel"][:, 0], 3).tolist(), norms.tolist()  # mean of unit gradients
    ([0.3, 0.9], [70.0, 2.0])
    """
    _check_finite(l2_norm_clip, "l2_norm_clip")
    _check_finite(noise_multiplier, "noise_multiplier", allow_zero=True)
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")
    check_key(key, "key")
    size = _batch_size(batch)
    if weights is not None:
        _check_weights(weights, size)
        _check_weight_values(weights)
        if denominator is None:
            raise ValueError(
                "denominator: required with weights (the expected batch size, e.g. "
                "loader.batch_size under Poisson sampling)"
            )
    if denominator is None:
        if size == 0:
            raise ValueError(
                "denominator: required for an empty batch (B = 0, which Poisson sampling can "
                "draw): the expected batch size, e.g. loader.batch_size"
            )
        denominator = size
    _check_denominator(denominator)

    if method == "ghost":
        total, norms = _ghost_clipped_sum(
            loss_fn, params, batch, l2_norm_clip, weights, chunk_size, "mixed", "private_grad"
        )
    else:
        grads = _per_example_grads(loss_fn, params, batch, chunk_size, None, "private_grad")
        norms = _norms(grads, size)
        factors = _clip_factors(norms, l2_norm_clip)
        if weights is not None:
            # a weight-0 example (padding) adds nothing, even with a gradient that is not finite
            real = jnp.asarray(weights) > 0
            factors = jnp.where(real, factors * jnp.asarray(weights, factors.dtype), 0)
            grads = jax.tree.map(
                lambda g: jnp.where(real.reshape(-1, *(1,) * (g.ndim - 1)), g, 0), grads
            )
        total = jax.tree.map(lambda g: jnp.tensordot(factors.astype(g.dtype), g, axes=1), grads)
    noised = _add_gaussian_noise(key, total, noise_multiplier * l2_norm_clip)
    return jax.tree.map(lambda leaf: leaf / denominator, noised), norms


def _check_denominator(denominator) -> None:
    """``private_grad``'s ``denominator``: a scalar (also when traced), finite and > 0 when
    concrete."""
    if np.ndim(denominator) != 0:
        raise ValueError(
            f"denominator: expected a number (the expected batch size), got shape "
            f"{np.shape(denominator)}"
        )
    _check_finite(denominator, "denominator")


def pad_batch(batch: Any, multiple: int) -> tuple[Any, jax.Array]:
    """``batch`` padded with zero examples to the next multiple of ``multiple``, and its mask.

    Poisson batches have random sizes; padded to multiples of (say) 32, a jitted step compiles
    once per multiple reached instead of once per size. Pass the mask as ``private_grad``'s
    ``weights``: the padding examples then contribute nothing.

    Args:
      batch: a pytree of arrays with a common leading batch axis.
      multiple: a positive int.

    Returns:
      ``(padded_batch, mask)``: ``mask`` is a float32 ``(padded size,)`` array, 1 for the real
      examples (first) and 0 for the padding.

    >>> padded, mask = pad_batch((jnp.ones((3, 2)), jnp.arange(3)), 4)
    >>> padded[1].tolist(), mask.tolist()
    ([0, 1, 2, 0], [1.0, 1.0, 1.0, 0.0])
    """
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(f"multiple: expected a positive int, got {multiple!r}")
    multiple = int(multiple)
    size = _batch_size(batch)
    padded_size = max(multiple, math.ceil(size / multiple) * multiple)
    # a huge multiple (2**63 - 1) aborted the whole process inside XLA
    check_extent((padded_size,), jnp.float32, "multiple", "mask")
    for leaf in jax.tree.leaves(batch):
        check_extent((padded_size, *leaf.shape[1:]), leaf.dtype, "multiple", "padded batch")

    def pad(leaf):
        widths = [(0, padded_size - size)] + [(0, 0)] * (leaf.ndim - 1)
        return jnp.pad(leaf, widths)

    mask = (jnp.arange(padded_size) < size).astype(jnp.float32)
    return jax.tree.map(pad, batch), mask
