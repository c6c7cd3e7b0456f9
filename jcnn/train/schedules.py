"""Learning-rate schedules: callables ``step -> learning rate`` usable by any Optax optimizer.

Every schedule follows the formulas of the course notes, with ``t`` the optimizer step (a Python int
or a traced integer array, so schedules work inside ``jit``):

=================  ===========================================================
``constant``       ``α0``
``step``           ``α0 · factor^(number of boundaries <= t)`` (e.g. ×0.1 at epochs 30/60/90)
``exponential``    ``α0 · e^(−k t)``
``inverse_time``   ``α0 / (1 + k t)``
``cosine``         ``½ α0 (1 + cos(π t / T))`` for ``t <= T``, ``0`` after
``linear``         ``α0 (1 − t / T)`` for ``t <= T``, ``0`` after
``inverse_sqrt``   ``α0 / sqrt(max(t, 1))`` (the notes' ``α0/√t``, defined at ``t = 0``)
``warmup``         linear ramp from 0 over ``warmup_steps``, then any schedule, shifted
``one_cycle``      linear ramp ``max/div → max``, then cosine ``max → max/final_div``
=================  ===========================================================

Optax has no inverse-time or inverse-sqrt schedule; all of these are written here directly so
that each is its formula and nothing else.

>>> sched = warmup(cosine(0.1, total_steps=100), warmup_steps=10)
>>> [round(float(sched(t)), 4) for t in (0, 5, 10, 60, 110)]
[0.0, 0.05, 0.1, 0.05, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jcnn.functional._checks import check_int, check_positive_int, check_real

__all__ = [
    "Schedule",
    "constant",
    "step",
    "exponential",
    "inverse_time",
    "cosine",
    "linear",
    "inverse_sqrt",
    "warmup",
    "one_cycle",
    "SCHEDULES",
]

Schedule = Callable[[int], jnp.ndarray]
"""A learning rate schedule: the step (an int, or traced) to the rate."""
_MAX_STEP = 2**31 - 1  # optax's count and TrainState.step are int32


def _check_positive(value, name: str, *, allow_zero: bool = False) -> float:
    """A finite number > 0 (>= 0 where ``allow_zero``) as a Python float; NumPy scalars too."""
    return check_real(value, name, low=0, low_open=not allow_zero)


def _check_steps(value, name: str) -> int:
    """A positive int of steps that the int32 step counter can reach (a larger one overflowed
    inside the schedule's first call, with a raw error naming neither it nor the limit)."""
    steps = check_positive_int(value, name)
    if steps > _MAX_STEP:
        raise ValueError(
            f"{name}: expected a step <= {_MAX_STEP} (the step counter is int32), got {steps}"
        )
    return steps


def _float():
    """float32, or float64 under ``jax_enable_x64``: a float64 model's rate is not rounded to
    float32 (Optax casts the rate to each parameter's dtype, so float32 models are unchanged)."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _as_float(t) -> jnp.ndarray:
    return jnp.asarray(t, dtype=_float())


def _half_cosine(remaining, length: int) -> jnp.ndarray:
    """``½ (1 + cos(π (1 − r / L)))`` for ``r`` steps remaining of ``L``, clipped to ``[0, 1]``.

    Written ``sin²(π r / 2L)``: the same value, but the ``1 + cos`` form cancels to a few
    float32 ulps near the end, so its last rates were off by up to 0.25% (T = 1000) rather
    than 4e-7, and it does not reach exactly 0 at ``r = 0``.
    """
    return jnp.sin(0.5 * jnp.pi * jnp.clip(remaining / length, 0.0, 1.0)) ** 2


def constant(learning_rate: float) -> Schedule:
    """``α0`` at every step.

    Args:
        learning_rate: the constant ``α0``.

    Returns:
        A schedule ``t -> α0``.
    """
    lr = _check_positive(learning_rate, "learning_rate", allow_zero=True)
    return lambda t: jnp.full((), lr, _float()) + 0.0 * _as_float(t)


def step(learning_rate: float, boundaries: Sequence[int], factor: float = 0.1) -> Schedule:
    """Piecewise-constant decay: multiply by ``factor`` at each boundary step.

    Args:
        learning_rate: ``α0``, the rate before the first boundary.
        boundaries: increasing steps at which the rate is multiplied by ``factor`` (the new rate
            applies from that step on).
        factor: the multiplier at each boundary (0.1 for the classic ResNet schedule, 0.5 for
            "halve every few epochs").

    Returns:
        A schedule ``t -> α0 · factor^(#{b in boundaries : b <= t})``.

    >>> sched = step(1.0, [3, 6], factor=0.5)
    >>> [float(sched(t)) for t in range(8)]
    [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
    """
    lr = _check_positive(learning_rate, "learning_rate", allow_zero=True)
    factor = _check_positive(factor, "factor")
    if (
        isinstance(boundaries, (str, bytes))
        or not hasattr(boundaries, "__iter__")
        or getattr(boundaries, "ndim", 1) == 0  # a 0-d array: iterating it raises
    ):
        raise TypeError(f"boundaries: expected a sequence of int steps, got {boundaries!r}")
    bounds = [check_int(b, f"boundaries[{i}]", low=0) for i, b in enumerate(boundaries)]
    for i, b in enumerate(bounds):
        if b > _MAX_STEP:
            raise ValueError(
                f"boundaries[{i}]: expected a step <= {_MAX_STEP} (the step counter is int32), "
                f"got {b}"
            )
    if any(b >= c for b, c in zip(bounds[:-1], bounds[1:], strict=True)):
        raise ValueError(f"boundaries: expected strictly increasing steps, got {bounds}")
    bounds_array = jnp.asarray(bounds, dtype=jnp.int32)

    def schedule(t):
        t = jnp.asarray(t, jnp.int32)
        # per step: an array of steps gets an array of rates, as from every other schedule
        bounds = bounds_array.reshape((1,) * t.ndim + (-1,))
        passed = jnp.sum(t[..., None] >= bounds, axis=-1)
        return lr * jnp.power(jnp.asarray(factor, _float()), passed.astype(_float()))

    return schedule


def exponential(learning_rate: float, decay_rate: float) -> Schedule:
    """Exponential decay ``α0 · e^(−k t)``.

    Args:
        learning_rate: ``α0``.
        decay_rate: ``k >= 0`` per step.

    Returns:
        The schedule.
    """
    lr = _check_positive(learning_rate, "learning_rate", allow_zero=True)
    k = _check_positive(decay_rate, "decay_rate", allow_zero=True)
    return lambda t: lr * jnp.exp(-k * _as_float(t))


def inverse_time(learning_rate: float, decay_rate: float) -> Schedule:
    """The notes' 1/t decay ``α0 / (1 + k t)``.

    Args:
        learning_rate: ``α0``.
        decay_rate: ``k >= 0`` per step.

    Returns:
        The schedule.
    """
    lr = _check_positive(learning_rate, "learning_rate", allow_zero=True)
    k = _check_positive(decay_rate, "decay_rate", allow_zero=True)
    return lambda t: lr / (1.0 + k * _as_float(t))


def cosine(learning_rate: float, total_steps: int) -> Schedule:
    """Cosine decay ``½ α0 (1 + cos(π t / T))``, held at 0 after ``T``.

    Args:
        learning_rate: ``α0``.
        total_steps: ``T``, the step at which the rate reaches 0.

    Returns:
        The schedule.
    """
    lr = _check_positive(learning_rate, "learning_rate", allow_zero=True)
    total = _check_steps(total_steps, "total_steps")

    def schedule(t):
        return lr * _half_cosine(total - _as_float(t), total)

    return schedule


def linear(learning_rate: float, total_steps: int) -> Schedule:
    """Linear decay ``α0 (1 − t / T)``, held at 0 after ``T``.

    Args:
        learning_rate: ``α0``.
        total_steps: ``T``.

    Returns:
        The schedule.
    """
    lr = _check_positive(learning_rate, "learning_rate", allow_zero=True)
    total = _check_steps(total_steps, "total_steps")
    # ``(T − t) / T``: the same value, but ``1 − t / T`` cancels to a few float32 ulps near the
    # end, so its last rates were off by up to 2e-4 (T = 10000) rather than 1e-7
    return lambda t: lr * (jnp.clip(total - _as_float(t), 0.0, total) / total)


def inverse_sqrt(learning_rate: float) -> Schedule:
    """Inverse square-root decay ``α0 / √t``, with ``t`` clamped to at least 1.

    Args:
        learning_rate: ``α0``.

    Returns:
        The schedule (``α0`` at steps 0 and 1).
    """
    lr = _check_positive(learning_rate, "learning_rate", allow_zero=True)
    return lambda t: lr / jnp.sqrt(jnp.maximum(_as_float(t), 1.0))


def _check_peak(peak) -> None:
    """``warmup``'s ``schedule(0)``, when concrete: a real scalar, finite and >= 0."""
    if isinstance(peak, jax.core.Tracer):
        return
    array = np.asarray(peak)
    if array.shape != () or array.dtype.kind not in "iuf":
        raise TypeError(
            f"schedule: expected a schedule returning a real scalar rate, got {peak!r} at step 0"
        )
    value = float(array)
    if not 0 <= value < math.inf:
        raise ValueError(
            "schedule: expected a finite rate >= 0 at step 0 (the peak of the warmup; a "
            f"negative rate ascends the loss), got {value:g}"
        )


def warmup(schedule: Schedule, warmup_steps: int) -> Schedule:
    """Linear warmup from 0 to ``schedule(0)`` over ``warmup_steps``, then ``schedule(t − W)``.

    The wrapped schedule starts after the warmup, so its own horizon (``T`` of cosine/linear) is
    counted from the end of the warmup.

    Args:
        schedule: any schedule.
        warmup_steps: ``W``, the length of the ramp (``t = W`` is the first step of ``schedule``).

    Returns:
        The warmed-up schedule.
    """
    if not callable(schedule):
        raise TypeError(
            f"schedule: expected a callable step -> rate, got {type(schedule).__name__}"
        )
    ramp = _check_steps(warmup_steps, "warmup_steps")
    # asked as Optax asks (an int32 count): a schedule written for it may not take a Python int
    peak = schedule(jnp.zeros((), jnp.int32))
    _check_peak(peak)

    def warmed(t):
        t_float = _as_float(t)
        after = schedule(jnp.maximum(jnp.asarray(t, jnp.int32) - ramp, 0))
        return jnp.where(t_float < ramp, peak * t_float / ramp, after)

    return warmed


def one_cycle(
    max_learning_rate: float,
    total_steps: int,
    *,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> Schedule:
    """The one-cycle policy (Smith & Topin 2018) in its common two-phase form.

    From ``max/div_factor`` the rate rises linearly to ``max`` over the first ``pct_start · T``
    steps, then falls along a half cosine to ``max/(div_factor · final_div_factor)`` at ``T``
    (PyTorch's ``OneCycleLR`` with ``anneal_strategy="cos"`` anneals the rise with a cosine too,
    and reaches its peak and its final rate one step earlier, at ``pct_start · T - 1`` and
    ``T - 1``; the rise here is linear).

    Args:
        max_learning_rate: the peak rate.
        total_steps: ``T``.
        pct_start: the fraction of ``T`` spent rising, in ``(0, 1)``; ``round(pct_start · T)``
            (at least 1) rising steps must leave at least one falling step.
        div_factor: the initial rate is ``max / div_factor``.
        final_div_factor: the final rate is ``initial / final_div_factor``.

    Returns:
        The schedule.
    """
    peak = _check_positive(max_learning_rate, "max_learning_rate")
    total = _check_steps(total_steps, "total_steps")
    pct_start = check_real(pct_start, "pct_start", low=0, high=1, low_open=True, high_open=True)
    initial = peak / _check_positive(div_factor, "div_factor")
    final = initial / _check_positive(final_div_factor, "final_div_factor")
    if total < 2:
        raise ValueError(
            f"total_steps: expected at least 2 for one_cycle (a rising and a falling step), "
            f"got {total}"
        )
    rise = max(1, int(round(pct_start * total)))
    if rise >= total:
        # else the fall would end after step T, and the run would stop at the peak
        raise ValueError(
            f"pct_start: expected a fraction of total_steps={total} that leaves at least one "
            f"falling step, got {pct_start!r} ({rise} rising steps)"
        )
    fall = total - rise

    def schedule(t):
        t_float = _as_float(t)
        up = initial + (peak - initial) * jnp.clip(t_float / rise, 0.0, 1.0)
        down = final + (peak - final) * _half_cosine(total - t_float, fall)
        return jnp.where(t_float < rise, up, down)

    return schedule


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": constant,
    "step": step,
    "exponential": exponential,
    "inverse_time": inverse_time,
    "cosine": cosine,
    "linear": linear,
    "inverse_sqrt": inverse_sqrt,
    "one_cycle": one_cycle,
}
"""The schedules by name, as ``TrainConfig.schedule`` and ``jcnn-train --schedule`` take them."""
