"""Composition modules, NNX twins of ``jcnn.nn.Sequential`` and ``jcnn.nn.Residual``.

Both forward ``train`` (when a call gives one) to every layer whose ``__call__`` takes a
``train`` argument, and call the others with ``x`` alone, so plain functions such as ``F.relu``
can sit in the chain. Without ``train``, each layer follows its own attributes (``model.train()``
and ``model.eval()`` set them all).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from flax import nnx

from jcnn.nn._shared import add_shortcut, call_layer, check_branches, check_layers
from jcnn.nnx._util import check_flag

__all__ = ["Sequential", "Residual"]


class Sequential(nnx.Module):
    """Apply ``layers`` in order, passing ``train`` to those that take it.

    Args:
        layers: modules or functions of one array (stored as ``self.layers``, an ``nnx.List``,
            so that parameter paths are ``layers/<index>/...``; the Linen twin's are
            ``layers_<index>/...``).

    Example:
        >>> import jcnn
        >>> from flax import nnx
        >>> from jcnn import nnx as jnnx
        >>> rngs = nnx.Rngs(0)
        >>> net = jnnx.Sequential(
        ...     [jnnx.Dense(4, 8, rngs=rngs), jcnn.functional.relu, jnnx.Dropout(0.5, rngs=rngs),
        ...      jnnx.Dense(8, 2, rngs=rngs)])
        >>> net(jnp.ones((3, 4))).shape
        (3, 2)
    """

    def __init__(self, layers: Sequence[Callable]) -> None:
        check_layers(layers)
        self.layers = nnx.List(layers)

    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        """Run ``x`` through every layer; ``train`` (when given) reaches those that accept it."""
        check_flag(train, "train")
        for index, layer in enumerate(self.layers):
            x = call_layer(layer, x, train, f"layer {index}")
        return x


class Residual(nnx.Module):
    """``body(x) + x``, or ``body(x) + projection(x)`` when the shapes differ.

    Args:
        body: the residual branch (a module or function of one array).
        projection: optional shortcut branch.

    Example:
        >>> import jcnn
        >>> from flax import nnx
        >>> rngs = nnx.Rngs(0)
        >>> block = jcnn.nnx.Residual(jcnn.nnx.Conv(2, 4, 3, padding=1, rngs=rngs),
        ...                           projection=jcnn.nnx.Conv(2, 4, 1, rngs=rngs))
        >>> block(jnp.ones((1, 5, 5, 2))).shape
        (1, 5, 5, 4)
    """

    def __init__(self, body: Callable, projection: Callable | None = None) -> None:
        check_branches(body, projection)
        self.body, self.projection = body, projection

    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        """Apply the block to ``x``; ``train`` (when given) reaches the branches that take it."""
        check_flag(train, "train")
        y = call_layer(self.body, x, train, "body")
        shortcut = (
            x if self.projection is None else call_layer(self.projection, x, train, "projection")
        )
        return add_shortcut(y, shortcut)
