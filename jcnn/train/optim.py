"""Optimizers over Optax, written to the update rules of the course notes.

``optimizer(name, learning_rate, ...)`` returns an ``optax.GradientTransformation``:

==============  ==========================================================================
``sgd``         ``x -= α g``
``momentum``    ``v = ρ v + g;  x -= α v``
``nesterov``    ``v = ρ v + g;  x -= α (g + ρ v)`` (PyTorch's and Optax's form; for a constant
                ``α`` the notes' change of variables ``v' = ρ v − α g;  x += −ρ v + (1 + ρ) v'``)
``adagrad``     ``s += g²;  x -= α g / (√s + ε)``
``rmsprop``     ``s = β s + (1 − β) g²;  x -= α g / (√s + ε)``
``adam``        bias-corrected moments, ``x -= α m̂ / (√v̂ + ε)``
``adamw``       Adam with decoupled weight decay (Loshchilov & Hutter)
``lars``        layer-wise trust ratio on SGD+momentum (You et al. 2017), as ``optax.lars``
``lamb``        layer-wise trust ratio on Adam (You et al. 2019), as ``optax.lamb``
==============  ==========================================================================

Differences from Optax's defaults, all to follow the notes: AdaGrad and RMSProp add ``ε`` *outside*
the square root and start their accumulators at 0 (Optax's ``adagrad`` starts at 0.1 and both put
``ε`` inside the root), and ``ε = 1e-7`` everywhere (Optax: 1e-8 for Adam, 1e-7 for AdaGrad).

Weight decay ``λ`` is *coupled* (``g += λ x`` before the optimizer, i.e. L2 regularization) for
every optimizer except ``adamw``, ``lars`` and ``lamb``, where it is *decoupled*
(``x -= α (update + λ x)``); ``decoupled=`` overrides. LARS is the exception: as in You et al.
it always adds ``λ x`` to the gradient before its trust ratio and momentum, so ``decoupled``
changes nothing there. Its trust ratio is Optax's ``η ‖x‖ / ‖g + λ x‖`` (the paper writes
``η ‖x‖ / (‖g‖ + λ ‖x‖)``, whose denominator bounds Optax's from above: equal when ``g`` points
the way ``x`` does, otherwise Optax's steps are larger). A ``mask`` (a pytree of bools or a
function of the params) chooses which parameters decay; the default decays only arrays of rank
>= 2 (conv and dense kernels), never biases or BatchNorm scales/offsets.
``clip_value`` clips each gradient entry to ``[−c, c]`` before anything else; ``clip_norm``
then clips the global gradient norm.

>>> import jax.numpy as jnp
>>> tx = optimizer("momentum", 0.1, momentum=0.9)
>>> params = {"w": jnp.ones(2)}
>>> state = tx.init(params)
>>> updates, state = tx.update({"w": jnp.ones(2)}, state, params)
>>> [round(float(u), 3) for u in updates["w"]]
[-0.1, -0.1]
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcnn.analysis.per_example import _sqrt_of_square
from jcnn.functional._checks import check_bool, check_rate, check_real, check_real_or_traced

__all__ = ["optimizer", "default_decay_mask", "scale_by_adagrad", "scale_by_rmsprop", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "lars", "lamb")
"""The names ``optimizer`` takes (``TrainConfig.optimizer``, ``jcnn-train --optimizer``)."""
_DECOUPLED_BY_DEFAULT = ("adamw", "lars", "lamb")
_ADAM_LIKE = ("adam", "adamw", "lamb")
_USED_BY = {
    "momentum": ("momentum", "nesterov", "lars"),
    "beta1": _ADAM_LIKE,
    "beta2": _ADAM_LIKE,
    "decay": ("rmsprop",),
    "eps": ("adagrad", "rmsprop", *_ADAM_LIKE),
    "trust_coefficient": ("lars",),
}
"""The methods that read each method-specific setting of ``optimizer``."""


class _Default(float):
    """A default value of ``optimizer``, told apart from the same number given explicitly: a
    setting given to a method that does not read it is ignored with a warning, not silently."""

    __slots__ = ()


class _AccumulatorState(NamedTuple):
    accumulator: Any


def _divide(numerator, denominator):
    """``numerator / denominator``, with a denominator of 0 (``eps = 0`` and an entry whose
    gradients have all been 0) read as 1: the step there is 0, where ``0 / 0`` made the parameter
    NaN (and, through LAMB's trust ratio, its whole layer)."""
    return numerator / jnp.where(denominator == 0, 1, denominator)


def _scale_by_accumulated_squares(accumulate, eps: float) -> optax.GradientTransformation:
    """The direction ``g / (√s + ε)`` with ``s = accumulate(s, g)`` per leaf, starting at 0; the
    root's derivative is 0 at ``s = 0`` (``jnp.sqrt``'s infinite one made every derivative through
    an update NaN once an entry had had only zero gradients)."""

    def init(params):
        return _AccumulatorState(jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        accumulator = jax.tree.map(accumulate, state.accumulator, updates)
        scaled = jax.tree.map(
            lambda g, s: _divide(g, _sqrt_of_square(s) + eps), updates, accumulator
        )
        return scaled, _AccumulatorState(accumulator)

    return optax.GradientTransformation(init, update)


def _scale_by_adam(b1, b2, eps) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` (its state and moments), the direction ``m̂ / (√v̂ + ε)`` taken with
    ``_sqrt_of_square``, so that derivatives through it stay finite where a gradient entry is 0."""
    inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def update(updates, state, params=None):
        _, state = inner.update(updates, state, params)
        mu_hat = optax.tree.bias_correction(state.mu, b1, state.count)
        nu_hat = optax.tree.bias_correction(state.nu, b2, state.count)
        return jax.tree.map(
            lambda m, v: _divide(m, _sqrt_of_square(v) + eps), mu_hat, nu_hat
        ), state

    return optax.GradientTransformation(inner.init, update)


def scale_by_adagrad(eps: float = 1e-7) -> optax.GradientTransformation:
    """The notes' AdaGrad direction ``g / (√(Σ g²) + ε)``, the sum starting at 0."""
    return _scale_by_accumulated_squares(lambda s, g: s + g * g, eps)


def scale_by_rmsprop(decay: float = 0.9, eps: float = 1e-7) -> optax.GradientTransformation:
    """The notes' RMSProp direction ``g / (√s + ε)``, ``s = β s + (1 − β) g²`` starting at 0."""
    return _scale_by_accumulated_squares(lambda s, g: decay * s + (1.0 - decay) * g * g, eps)


def _clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scale the updates to a global norm of at most ``max_norm``, the norm computed over
    ``g / max|g|``: Optax's sum of squares overflows float32 for gradients of about 1e19 and
    underflows for about 1e-23, so a huge gradient came out as zeros and a tiny one unclipped."""

    def update(updates, state, params=None):
        del params
        leaves = jax.tree.leaves(updates)
        if not leaves:
            return updates, state
        largest = jnp.max(jnp.stack([jnp.max(jnp.abs(g), initial=0) for g in leaves]))
        unit = jnp.where(largest > 0, largest, 1.0)
        squares = sum(jnp.sum(jnp.square(g / unit.astype(g.dtype))) for g in leaves)
        # >= 1 unless every entry is 0 (the largest one is ±1 here); at 0, no NaN derivative
        ratio = jnp.sqrt(jnp.maximum(squares, 1.0))
        trigger = largest * ratio <= max_norm
        ratio = jnp.where(trigger, 1.0, ratio)

        def clip(g):
            clipped = g / unit.astype(g.dtype) / ratio.astype(g.dtype) * max_norm
            return jax.lax.select(trigger, g, clipped)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def _norm(x) -> jax.Array:
    """``‖x‖``, computed over ``x / max|x|`` (the sum of squares of a float32 gradient of about
    1e20 overflows and one of about 1e-23 underflows), with a derivative of 0, not NaN, at 0."""
    if x.size == 0:
        return jnp.zeros((), x.dtype)
    largest = jnp.max(jnp.abs(x))
    unit = jnp.where(largest > 0, largest, 1).astype(x.dtype)
    return largest * _sqrt_of_square(jnp.sum(jnp.square(x / unit)))


def _scale_by_trust_ratio(trust_coefficient=1.0, mask=None) -> optax.GradientTransformation:
    """``optax.scale_by_trust_ratio`` (``u · η ‖x‖ / ‖u‖``, 1 where either norm is 0) on the
    leaves ``mask`` selects, its norms taken with ``_norm``: Optax's made every derivative through
    the update NaN once a leaf's update was 0, and its step 0 for a gradient of 1e20."""

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(
                "params: expected the parameters (the trust ratio scales by their norms); call "
                "update(updates, state, params)"
            )

        def scale(u, x):
            x_norm, u_norm = _norm(x), _norm(u)
            zero = (x_norm == 0) | (u_norm == 0)
            ratio = trust_coefficient * x_norm / jnp.where(zero, 1, u_norm)
            return u * jnp.where(zero, 1, ratio).astype(u.dtype)

        return jax.tree.map(scale, updates, params), state

    inner = optax.GradientTransformation(optax.init_empty_state, update)
    return inner if mask is None else optax.masked(inner, mask)


def default_decay_mask(params: Any) -> Any:
    """``True`` for the parameters that should decay: arrays of rank >= 2 (kernels)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


_MASK_FORMS = "a pytree of bools or a function params -> pytree of bools"


def _is_bool(leaf) -> bool:
    return isinstance(leaf, (bool, np.bool_)) or (
        getattr(leaf, "dtype", None) == np.bool_ and np.ndim(leaf) == 0
    )


def _check_mask_tree(tree, name: str):
    """``tree`` if every leaf is a bool (Optax reads any other leaf by its truth: 5 or "no"
    would decay everything)."""
    leaves = jax.tree.leaves(tree)
    bad = [leaf for leaf in leaves if not _is_bool(leaf)]
    if bad:
        got = repr(tree) if leaves == [tree] else f"{type(tree).__name__} with a leaf {bad[0]!r}"
        raise TypeError(f"{name}: expected {_MASK_FORMS}, got {got}")
    return tree


def _check_mask_structure(tree, params, name: str):
    """``tree`` if its structure is that of ``params`` or a prefix of it (else Optax fails with
    a bare pytree structure error that names neither the mask nor the parameters)."""
    try:
        jax.tree.map(lambda *_: None, tree, params)
    except ValueError:
        raise ValueError(
            f"{name}: expected the structure of the parameters, "
            f"{jax.tree_util.tree_structure(params)}, or a prefix of it, got "
            f"{jax.tree_util.tree_structure(tree)}"
        ) from None
    return tree


def _check_mask(mask):
    """The weight-decay mask as a function of the params, checked when Optax calls it."""
    if mask is None:
        return default_decay_mask
    if not callable(mask):
        tree = _check_mask_tree(mask, "mask")
        return lambda params: _check_mask_structure(tree, params, "mask")

    def checked(params):
        tree = _check_mask_tree(mask(params), "mask(params)")
        return _check_mask_structure(tree, params, "mask(params)")

    return checked


def optimizer(
    name: str,
    learning_rate: float | Callable,
    *,
    momentum: float = _Default(0.9),
    beta1: float = _Default(0.9),
    beta2: float = _Default(0.999),
    decay: float = _Default(0.9),
    eps: float = _Default(1e-7),
    weight_decay: float = 0.0,
    decoupled: bool | None = None,
    mask: Any | Callable | None = None,
    clip_norm: float | None = None,
    clip_value: float | None = None,
    trust_coefficient: float = _Default(0.001),
) -> optax.GradientTransformation:
    """An Optax optimizer following the notes' update rules.

    Args:
        name: one of ``sgd, momentum, nesterov, adagrad, rmsprop, adam, adamw, lars, lamb``.
        learning_rate: a number or a schedule ``step -> rate`` (see ``jcnn.train.schedules``).
            It, ``weight_decay``, ``momentum``, ``beta1``, ``beta2``, ``decay`` and ``eps`` may
            also be traced 0-d arrays (to sweep them under ``vmap`` or ``jit``), applied unchecked.
        momentum: ``ρ`` of momentum, Nesterov and LARS.
        beta1: Adam/AdamW/LAMB first-moment decay.
        beta2: Adam/AdamW/LAMB second-moment decay.
        decay: RMSProp's ``decay_rate`` of the squared-gradient average.
        eps: added to the denominator of AdaGrad, RMSProp, Adam, AdamW and LAMB (outside the
            square root; LARS's trust ratio has none).
        weight_decay: ``λ``; 0 disables it.
        decoupled: ``True`` for decoupled decay ``x -= α λ x``, ``False`` for L2 (``g += λ x``);
            ``None`` picks decoupled for adamw/lars/lamb and coupled otherwise. LARS adds the
            decay to the gradient before its trust ratio either way (the paper's rule).
        mask: which parameters decay: a pytree of bools or a function of the params;
            default ``default_decay_mask`` (kernels only).
        clip_norm: if given, clip the global gradient norm to this value first.
        clip_value: if given, clip each gradient entry to ``[-clip_value, clip_value]`` first
            (before ``clip_norm``).
        trust_coefficient: LARS's trust coefficient ``η``.

    ``momentum``, ``beta1``, ``beta2``, ``decay``, ``eps`` and ``trust_coefficient`` are read
    only by the methods listed with them; given explicitly to another method (even at its
    default value), a setting is ignored with a ``UserWarning`` that says so (one set of
    settings can be passed to every method in a sweep).

    Returns:
        An ``optax.GradientTransformation``.

    Raises:
        ValueError: an unknown name or a setting out of its range.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name.lower() not in OPTIMIZERS:
        raise ValueError(f"name: expected one of {', '.join(OPTIMIZERS)}, got {name!r}")
    name = name.lower()
    explicit = {
        setting: value
        for setting, value in zip(
            _USED_BY, (momentum, beta1, beta2, decay, eps, trust_coefficient), strict=True
        )
        if type(value) is not _Default
    }
    learning_rate = check_rate(learning_rate, "learning_rate")
    weight_decay = check_real_or_traced(weight_decay, "weight_decay", low=0)
    momentum, beta1, beta2, decay = (
        check_real_or_traced(value, label, low=0, high=1, high_open=True)
        for value, label in (
            (momentum, "momentum"),
            (beta1, "beta1"),
            (beta2, "beta2"),
            (decay, "decay"),
        )
    )
    eps = check_real_or_traced(eps, "eps", low=0)
    trust_coefficient = check_real(trust_coefficient, "trust_coefficient", low=0, low_open=True)
    if clip_norm is not None:
        clip_norm = check_real(clip_norm, "clip_norm", low=0, low_open=True)
    if clip_value is not None:
        clip_value = check_real(clip_value, "clip_value", low=0, low_open=True)
    if decoupled is not None:
        decoupled = check_bool(decoupled, "decoupled")
    # after the range checks, so that a bad value is refused whatever the method
    for setting, value in explicit.items():
        if name not in _USED_BY[setting]:
            warnings.warn(
                f"{setting}: not used by optimizer {name!r}, ignored; it applies to "
                f"{', '.join(_USED_BY[setting])}, got {setting}={value!r}",
                UserWarning,
                stacklevel=2,
            )
    mask = _check_mask(mask)
    if decoupled is None:
        decoupled = name in _DECOUPLED_BY_DEFAULT
    # a traced rate (a sweep under vmap) is applied whatever its value
    decays = isinstance(weight_decay, jax.core.Tracer) or weight_decay > 0

    chain = []
    if clip_value is not None:
        chain.append(optax.clip(clip_value))
    if clip_norm is not None:
        chain.append(_clip_by_global_norm(clip_norm))
    if decays and not decoupled:
        chain.append(optax.add_decayed_weights(weight_decay, mask))

    if name in ("lars", "lamb"):
        decay_here = weight_decay if decoupled else 0.0
        if name == "lars":
            # optax.lars, with the trust ratio above
            base = optax.chain(
                optax.add_decayed_weights(decay_here, mask),
                _scale_by_trust_ratio(trust_coefficient, mask),
                optax.scale_by_learning_rate(learning_rate),
                optax.trace(decay=momentum, nesterov=False),
            )
        else:  # optax.lamb, with the Adam direction above
            base = optax.chain(
                _scale_by_adam(beta1, beta2, eps),
                optax.add_decayed_weights(decay_here, mask),
                _scale_by_trust_ratio(),
                optax.scale_by_learning_rate(learning_rate),
            )
        return optax.chain(*chain, base)

    directions = {
        "sgd": optax.identity,
        "momentum": lambda: optax.trace(decay=momentum, nesterov=False),
        "nesterov": lambda: optax.trace(decay=momentum, nesterov=True),
        "adagrad": lambda: scale_by_adagrad(eps=eps),
        "rmsprop": lambda: scale_by_rmsprop(decay=decay, eps=eps),
        "adam": lambda: _scale_by_adam(beta1, beta2, eps),
        "adamw": lambda: _scale_by_adam(beta1, beta2, eps),
    }
    chain.append(directions[name]())
    if decays and decoupled:
        chain.append(optax.add_decayed_weights(weight_decay, mask))
    chain.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*chain)
