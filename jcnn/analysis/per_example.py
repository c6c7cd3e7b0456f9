"""Per-example gradients, their norms, clipping, and DP-SGD as an optax transformation.

A loss is written once, for a batch: ``loss_fn(params, batch) -> scalar`` where ``batch`` is a
pytree of arrays sharing a leading batch axis (e.g. ``(images, labels)``). The per-example
gradient of example ``i`` is the gradient of ``loss_fn`` on the batch made of example ``i`` alone
(``jax.vmap`` over examples, each given as a batch of one, so models that expect a batch axis
work unchanged). For a mean loss, the batch gradient is the mean of the per-example ones.

DP-SGD (Abadi et al. 2016) clips each example's gradient to L2 norm at most ``C`` (over all
parameters together), sums, adds Gaussian noise of standard deviation ``noise_multiplier * C``
and divides by the batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "per_example_grads",
    "per_example_grad_norms",
    "clip_per_example",
    "dp_aggregate",
    "dp_sgd",
]


def _batch_size(batch, name: str = "batch") -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError(f"{name}: expected a pytree of arrays with a leading batch axis, got none")
    sizes = set()
    for leaf in leaves:
        if not hasattr(leaf, "shape") or len(leaf.shape) == 0:
            raise ValueError(
                f"{name}: every leaf needs a leading batch axis, got {type(leaf).__name__} "
                f"with shape {getattr(leaf, 'shape', None)}"
            )
        sizes.add(leaf.shape[0])
    if len(sizes) != 1:
        shapes = [tuple(leaf.shape) for leaf in leaves]
        raise ValueError(f"{name}: leaves disagree on the batch size (leading axis): {shapes}")
    return sizes.pop()


def _check_clip(l2_norm_clip) -> None:
    if not l2_norm_clip > 0:
        raise ValueError(f"l2_norm_clip: expected a positive number, got {l2_norm_clip!r}")


def per_example_grads(loss_fn: Callable, params, batch, *, chunk_size: int | None = None):
    """Gradient of ``loss_fn`` for each example of ``batch`` separately.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the parameters (any pytree).
      batch: a pytree of arrays with a common leading batch axis ``B``.
      chunk_size: compute ``chunk_size`` examples at a time (``jax.lax.map`` over vmapped
        chunks) to bound memory; ``None`` vmaps the whole batch.

    Returns:
      A pytree like ``params`` whose leaves have a leading axis ``B``.

    >>> loss = lambda w, batch: jnp.mean((batch[0] @ w - batch[1]) ** 2)
    >>> x, y = jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([1.0, 0.0])
    >>> per_example_grads(loss, jnp.zeros(2), (x, y)).tolist()
    [[-2.0, 0.0], [0.0, 0.0]]
    """
    _batch_size(batch)
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    grad_fn = jax.grad(loss_fn)

    def one(example):
        return grad_fn(params, jax.tree.map(lambda leaf: leaf[None], example))

    if chunk_size is None:
        return jax.vmap(one)(batch)
    return jax.lax.map(one, batch, batch_size=chunk_size)


def _norms(per_example) -> jax.Array:
    squares = [
        jnp.sum(jnp.square(leaf.astype(jnp.float32)).reshape(leaf.shape[0], -1), axis=1)
        for leaf in jax.tree.leaves(per_example)
    ]
    return jnp.sqrt(sum(squares))


def per_example_grad_norms(loss_fn: Callable, params, batch, *, chunk_size: int | None = None):
    """L2 norm of each example's gradient over all parameters together, shape ``(B,)``.

    Args:
      loss_fn, params, batch, chunk_size: as in ``per_example_grads``.

    >>> loss = lambda w, batch: jnp.mean((batch[0] @ w - batch[1]) ** 2)
    >>> x, y = jnp.array([[3.0, 4.0], [0.0, 1.0]]), jnp.array([0.0, 0.0])
    >>> per_example_grad_norms(loss, jnp.ones(2), (x, y)).tolist()
    [70.0, 2.0]
    """
    return _norms(per_example_grads(loss_fn, params, batch, chunk_size=chunk_size))


def clip_per_example(per_example, l2_norm_clip: float):
    """Scale each example's gradient to L2 norm at most ``l2_norm_clip`` (all leaves together).

    Args:
      per_example: a pytree whose leaves have a leading batch axis (``per_example_grads``).
      l2_norm_clip: the bound ``C`` > 0.

    Returns:
      The clipped per-example gradients (same structure).
    """
    _check_clip(l2_norm_clip)
    _batch_size(per_example, "per_example")
    factor = jnp.minimum(1.0, l2_norm_clip / jnp.maximum(_norms(per_example), 1e-12))

    def scale(leaf):
        return leaf * factor.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)

    return jax.tree.map(scale, per_example)


class DPAggregateState(NamedTuple):
    """State of ``dp_aggregate``: the random key of the next noise draw."""

    key: Any


def dp_aggregate(l2_norm_clip: float, noise_multiplier: float, seed: int = 0):
    """Optax transformation: per-example gradients in, clipped noised mean gradient out.

    ``update(per_example, state)`` takes per-example gradients (leaves with a leading batch axis
    ``B``, from ``per_example_grads``) and returns ``(sum_i clip(g_i) + N(0, (sigma C)^2)) / B``
    with the structure of ``params``.

    Args:
      l2_norm_clip: the per-example bound ``C`` > 0.
      noise_multiplier: ``sigma`` >= 0 (0 gives clipping alone).
      seed: seed of the noise; each update draws with a fresh key.

    Returns:
      An ``optax.GradientTransformation``.
    """
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier: expected a number >= 0, got {noise_multiplier!r}")
    _check_clip(l2_norm_clip)

    def init(params):
        del params
        return DPAggregateState(jax.random.key(seed))

    def update(per_example, state, params=None):
        del params
        size = _batch_size(per_example, "per_example")
        clipped = clip_per_example(per_example, l2_norm_clip)
        key, next_key = jax.random.split(state.key)
        leaves, treedef = jax.tree.flatten(clipped)
        keys = jax.random.split(key, len(leaves))
        std = noise_multiplier * l2_norm_clip
        noised = [
            (jnp.sum(leaf, axis=0) + std * jax.random.normal(k, leaf.shape[1:], leaf.dtype)) / size
            for leaf, k in zip(leaves, keys, strict=True)
        ]
        return jax.tree.unflatten(treedef, noised), DPAggregateState(next_key)

    return optax.GradientTransformation(init, update)


def dp_sgd(
    learning_rate,
    l2_norm_clip: float,
    noise_multiplier: float,
    *,
    seed: int = 0,
    momentum: float | None = None,
    nesterov: bool = False,
):
    """DP-SGD: ``dp_aggregate`` followed by ``optax.sgd``; feed it per-example gradients.

    Args:
      learning_rate: a float or an optax schedule.
      l2_norm_clip, noise_multiplier, seed: as in ``dp_aggregate``.
      momentum, nesterov: as in ``optax.sgd``.

    Returns:
      An ``optax.GradientTransformation``: ``updates, state = tx.update(per_example_grads(...),
      state)`` then ``optax.apply_updates(params, updates)``.

    >>> loss = lambda w, batch: jnp.mean((batch[0] @ w - batch[1]) ** 2)
    >>> x, y = jnp.array([[3.0, 4.0], [0.0, 1.0]]), jnp.array([0.0, 0.0])
    >>> w = jnp.ones(2)
    >>> tx = dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=0.0)
    >>> updates, _ = tx.update(per_example_grads(loss, w, (x, y)), tx.init(w))
    >>> [round(u, 3) for u in updates.tolist()]  # -0.1 * mean of the unit-norm clipped gradients
    [-0.03, -0.09]
    """
    return optax.chain(
        dp_aggregate(l2_norm_clip, noise_multiplier, seed),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )
