"""Composition modules: ``Sequential`` (a chain of layers) and ``Residual`` (``f(x) + x``).

Both forward ``train`` to every layer whose ``__call__`` takes a ``train`` argument (BatchNorm,
Dropout, nested containers, models) and call the others with ``x`` alone, so parameter-free
functions such as ``F.relu`` can sit in the chain too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax

from jcnn.nn._shared import add_shortcut, call_layer, check_branches, check_layers

__all__ = ["Sequential", "Residual"]


class Sequential(nn.Module):
    """Apply ``layers`` in order, passing ``train`` to those that take it.

    Attributes:
        layers: modules or functions of one array.

    Example:
        >>> import jcnn
        >>> from jcnn import nn
        >>> net = nn.Sequential([nn.Dense(8), jcnn.functional.relu, nn.Dropout(0.5), nn.Dense(2)])
        >>> x = jnp.ones((3, 4))
        >>> variables = net.init(jax.random.key(0), x, train=False)
        >>> net.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)}).shape
        (3, 2)
    """

    layers: Sequence[Callable]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        """Run ``x`` through every layer; ``train`` reaches the layers that accept it."""
        check_layers(self.layers)
        for index, layer in enumerate(self.layers):
            x = call_layer(layer, x, train, f"layer {index}")
        return x


class Residual(nn.Module):
    """``body(x) + x``, or ``body(x) + projection(x)`` when the shapes differ.

    Attributes:
        body: the residual branch (a module or function of one array).
        projection: optional shortcut branch (e.g. a strided 1x1 ``Conv`` then ``BatchNorm``).

    Example:
        >>> import jcnn
        >>> from jcnn import nn
        >>> block = nn.Residual(nn.Conv(4, 3, padding=1), projection=nn.Conv(4, 1))
        >>> x = jnp.ones((1, 5, 5, 2))
        >>> block.apply(block.init(jax.random.key(0), x), x).shape
        (1, 5, 5, 4)
    """

    body: Callable
    projection: Callable | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        """Apply the block to ``x``; ``train`` reaches the branches that accept it."""
        check_branches(self.body, self.projection)
        y = call_layer(self.body, x, train, "body")
        shortcut = (
            x if self.projection is None else call_layer(self.projection, x, train, "projection")
        )
        return add_shortcut(y, shortcut)
