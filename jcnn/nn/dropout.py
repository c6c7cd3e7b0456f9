"""Dropout modules: ``Dropout`` (per unit) and ``SpatialDropout`` (whole channels).

Both draw their randomness from the ``"dropout"`` rng collection
(``model.apply(variables, x, train=True, rngs={"dropout": key})``) and are the identity when
``train=False``.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jcnn import functional as F
from jcnn.functional._checks import check_bool, check_real
from jcnn.functional.dropout import check_input

__all__ = ["Dropout", "SpatialDropout"]


def _apply(module, drop, x, train: bool, *, spatial: bool = False):
    """``drop(key, x, rate)`` with a key from the ``"dropout"`` rng collection, when ``train``.

    The rate and ``x`` (``spatial``: as ``F.spatial_dropout`` takes it) are checked here too, so
    that a bad one raises in evaluation (where ``drop`` is not called and no rng is needed) as
    well.
    """
    rate = check_real(module.rate, "rate", low=0, high=1)
    check_bool(train, "train")
    if not train or rate == 0:
        check_input(x, spatial=spatial)
        return x
    if not (module.has_rng("dropout") or module.has_rng("params")):  # Flax falls back on params
        raise ValueError(
            f"rngs: {type(module).__name__} is training but has no randomness; pass "
            "rngs={'dropout': key} to apply"
        )
    return drop(module.make_rng("dropout"), x, rate, train=True)


class Dropout(nn.Module):
    """Zero each unit with probability ``rate`` and scale the rest by ``1 / (1 - rate)``.

    Attributes:
        rate: probability of dropping a unit, in ``[0, 1]``.

    Example:
        >>> import jcnn
        >>> layer = jcnn.nn.Dropout(0.5)
        >>> x = jnp.ones((2, 4))
        >>> bool((layer.apply({}, x, train=False) == x).all())
        True
        >>> y = layer.apply({}, x, train=True, rngs={"dropout": jax.random.key(0)})
        >>> sorted({float(v) for v in y.ravel()})
        [0.0, 2.0]
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Apply dropout to ``x`` when ``train``; identity otherwise."""
        return _apply(self, F.dropout, x, train)


class SpatialDropout(nn.Module):
    """Zero whole channels of each example with probability ``rate`` (Tompson et al. 2015).

    Attributes:
        rate: probability of dropping a channel, in ``[0, 1]``.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Apply spatial dropout to ``x`` of shape ``(N, *spatial, C)`` when ``train``."""
        return _apply(self, F.spatial_dropout, x, train, spatial=True)
