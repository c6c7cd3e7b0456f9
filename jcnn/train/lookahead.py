"""Lookahead on the parameters themselves: every ``sync_period`` steps the weights move to a slow
average that then replaces them (Zhang et al. 2019; airbench94's "lookahead" EMA).

Unlike ``optax.lookahead``, which asks the caller to carry a pair of fast and slow parameters, this
transformation keeps the slow weights in its state and expresses the synchronization as an
update, so it drops into ``fit`` or any ``params = optax.apply_updates(params, updates)`` loop.

>>> import jax.numpy as jnp, optax
>>> tx = lookahead(optax.sgd(1.0), sync_period=2, slow_step_size=0.5)
>>> params = jnp.zeros(1); state = tx.init(params)
>>> for _ in range(2):
...     updates, state = tx.update(-jnp.ones(1), state, params)
...     params = optax.apply_updates(params, updates)
>>> float(params[0])  # fast weights reached 2, the sync pulls them halfway back to the slow 0
1.0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jcnn.functional._checks import _is_real_scalar, is_int

__all__ = ["lookahead", "LookaheadState"]


class LookaheadState(NamedTuple):
    """The inner optimizer's state, the slow weights and the number of updates so far."""

    inner: Any
    slow: Any
    count: jax.Array


def lookahead(
    inner: optax.GradientTransformation,
    sync_period: int,
    slow_step_size: float | Callable[[jax.Array], jax.Array],
    *,
    final_step: int | None = None,
) -> optax.GradientTransformation:
    """Wrap ``inner``: after every ``sync_period``-th update, ``slow += α (fast - slow)`` and the
    parameters become ``slow``: the update is ``slow - params``, so ``apply_updates`` gives
    ``slow`` to the rounding of that sum (a float32 step of ``params``, not of ``slow``, where
    ``slow`` is much smaller; the slow weights themselves are kept exactly).

    Args:
        inner: the optimizer of the fast weights.
        sync_period: updates between synchronizations (``k``), a positive int.
        slow_step_size: ``α`` in ``[0, 1]``, or a function of the update count (a schedule, called
            with the 1-based count of the synchronizing update).
        final_step: the run's last update, if known: there the parameters become the slow
            weights, so that the trained model is the average rather than the last fast weights
            (as airbench94 ends). If it is not a synchronizing update it synchronizes with
            ``α = 0`` (the slow weights as they are). Later updates are plain fast updates again.

    Returns:
        An ``optax.GradientTransformation`` whose ``update`` needs ``params``.
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            f"inner: expected an optax.GradientTransformation, got {type(inner).__name__}"
        )
    if not is_int(sync_period):
        raise TypeError(f"sync_period: expected a positive int, got {sync_period!r}")
    if sync_period < 1:
        raise ValueError(f"sync_period: expected a positive int, got {sync_period!r}")
    if sync_period > 2**31 - 1:  # past it the first update failed inside JAX (an int32 modulus)
        raise ValueError(
            f"sync_period: expected at most 2**31 - 1 (the update count is int32), got "
            f"{sync_period}"
        )
    sync_period = int(sync_period)
    if not callable(slow_step_size):
        if not _is_real_scalar(slow_step_size):
            raise TypeError(
                f"slow_step_size: expected a number or a schedule, got {slow_step_size!r}"
            )
        value = float(slow_step_size)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"slow_step_size: expected a value in [0, 1], got {value!r}")
        slow_step_size = value
    if final_step is not None and not is_int(final_step):
        raise TypeError(f"final_step: expected a positive int or None, got {final_step!r}")
    if final_step is not None and final_step < 1:
        raise ValueError(f"final_step: expected a positive int or None, got {final_step!r}")
    if final_step is not None and final_step > 2**31 - 1:
        raise ValueError(
            f"final_step: expected at most 2**31 - 1 (the update count is int32), got {final_step}"
        )
    final_step = None if final_step is None else int(final_step)

    def init(params):
        slow = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
        return LookaheadState(inner.init(params), slow, jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("params: lookahead needs the current parameters in update()")
        updates, inner_state = inner.update(updates, state.inner, params)
        count = state.count + 1
        fast = optax.apply_updates(params, updates)
        alpha = slow_step_size(count) if callable(slow_step_size) else slow_step_size
        sync = count % sync_period == 0
        if final_step is not None:
            extra = (count == final_step) & ~sync
            alpha = jnp.where(extra, 0.0, alpha)
            sync = sync | extra
        slow = jax.tree.map(
            lambda s, f: jnp.where(sync, s + jnp.asarray(alpha, s.dtype) * (f - s), s),
            state.slow,
            fast,
        )
        updates = jax.tree.map(
            lambda u, s, f, p: jnp.where(sync, s - p, u).astype(u.dtype),
            updates,
            slow,
            fast,
            params,
        )
        return updates, LookaheadState(inner_state, slow, count)

    return optax.GradientTransformation(init, update)
