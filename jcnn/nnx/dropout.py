"""Dropout modules, NNX twins of ``jcnn.nn.Dropout`` (per unit) and ``jcnn.nn.SpatialDropout``
(whole channels).

Randomness comes from ``nnx.Rngs``: the ``rngs`` given at construction (its ``"dropout"``
stream, forked) or at the call, which takes precedence. Train or evaluate: the
``deterministic`` attribute decides (False after construction and ``model.train()``, True after
``model.eval()`` or in ``nnx.view(model, deterministic=True)``), unless a call passes
``train=True``/``False``, which overrides it for that call, as in ``jcnn.nn``.
"""

from __future__ import annotations

import jax
from flax import nnx

from jcnn import functional as F
from jcnn.functional._checks import check_bool, check_key, check_real
from jcnn.functional.dropout import check_input
from jcnn.nnx._util import check_flag, training

__all__ = ["Dropout", "SpatialDropout"]


class _Dropout(nnx.Module):
    _drop = staticmethod(F.dropout)
    _spatial = False

    def __init__(
        self,
        rate: float,
        *,
        deterministic: bool = False,
        rng_collection: str = "dropout",
        rngs: nnx.Rngs | nnx.RngStream | None = None,
    ) -> None:
        rate = check_real(rate, "rate", low=0, high=1)  # as the Linen twin checks it
        deterministic = check_bool(deterministic, "deterministic")
        if not isinstance(rng_collection, str):
            raise TypeError(
                f"rng_collection: expected the name of an nnx.Rngs stream (a str), got "
                f"{rng_collection!r}"
            )
        self.rate, self.deterministic, self.rng_collection = rate, deterministic, rng_collection
        self.rngs = nnx.data(self._stream(rngs, "rngs"))

    def _stream(self, rngs, name):
        if rngs is None:
            return None
        if isinstance(rngs, nnx.Rngs):
            return self._named_stream(rngs, name).fork()
        if isinstance(rngs, nnx.RngStream):
            return rngs.fork()
        raise TypeError(
            f"{name}: expected nnx.Rngs, nnx.RngStream or None, got {type(rngs).__name__}"
        )

    def _named_stream(self, rngs: nnx.Rngs, name: str) -> nnx.RngStream:
        """The ``rng_collection`` stream of ``rngs`` (Flax falls back on ``default``), or a
        ValueError naming ``name`` instead of Flax's KeyError when it has neither."""
        try:
            return rngs[self.rng_collection]
        except KeyError:
            raise ValueError(
                f"{name}: the nnx.Rngs has no {self.rng_collection!r} stream (nor a 'default' "
                f"one) for the masks of {type(self).__name__}; give one, e.g. "
                f"nnx.Rngs(seed) or nnx.Rngs(params=0, {self.rng_collection}=1)"
            ) from None

    def set_view(self, deterministic: bool | None = None) -> None:
        """Used by ``nnx.view``: set ``deterministic`` when given."""
        if deterministic is not None:
            check_flag(deterministic, "deterministic")
            self.deterministic = deterministic

    def __call__(
        self,
        x: jax.Array,
        train: bool | None = None,
        *,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
    ) -> jax.Array:
        """Drop when training (``train`` if given, else ``not deterministic``); identity otherwise.

        ``rngs`` (an ``nnx.Rngs``, ``nnx.RngStream`` or key) overrides the construction's.
        """
        if not training(train, not self.deterministic) or self.rate == 0:
            check_input(x, spatial=type(self)._spatial)
            return x
        if isinstance(rngs, jax.Array):
            check_key(rngs, "rngs")  # by the name given here, not the op's "key"
            key = rngs
        elif isinstance(rngs, nnx.Rngs):
            key = self._named_stream(rngs, "rngs")()
        elif isinstance(rngs, nnx.RngStream):
            key = rngs()
        elif rngs is None and self.rngs is not None:
            key = self.rngs()
        elif rngs is None:
            raise ValueError(
                f"rngs: {type(self).__name__} is training but has no randomness; give "
                "rngs=nnx.Rngs(dropout=seed) at construction or at the call"
            )
        else:
            raise TypeError(
                f"rngs: expected nnx.Rngs, nnx.RngStream or a key, got {type(rngs).__name__}"
            )
        return type(self)._drop(key, x, self.rate, train=True)


class Dropout(_Dropout):
    """Zero each unit with probability ``rate`` and scale the rest by ``1 / (1 - rate)``.

    Args:
        rate: probability of dropping a unit, in ``[0, 1]``.
        deterministic: be the identity (evaluation); ``model.eval()`` sets it.
        rng_collection: the stream of ``rngs`` that draws the masks (``"dropout"``).
        rngs: ``nnx.Rngs`` (or one stream) that draws the masks.

    Example:
        >>> import jcnn
        >>> from flax import nnx
        >>> layer = jcnn.nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0))
        >>> sorted({float(v) for v in layer(jnp.ones((2, 4))).ravel()})
        [0.0, 2.0]
        >>> bool((layer(jnp.ones((2, 4)), train=False) == 1).all())
        True
    """

    _drop = staticmethod(F.dropout)


class SpatialDropout(_Dropout):
    """Zero whole channels of each example with probability ``rate`` (Tompson et al. 2015).

    Args:
        rate, deterministic, rng_collection, rngs: as in ``Dropout``.
    """

    _drop = staticmethod(F.spatial_dropout)
    _spatial = True
