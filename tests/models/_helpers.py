"""Shared by the model tests: parameter counts without allocating or computing anything."""

import jax
import jax.numpy as jnp


def param_shapes(model, input_shape):
    """The ``params`` tree of ``model`` as ShapeDtypeStructs (jax.eval_shape: no FLOPs)."""
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(input_shape, jnp.float32))
    return variables["params"]


def count_params(model, input_shape) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(param_shapes(model, input_shape)))


def assert_refused(model, input_shape, error, says):
    """Building ``model`` on an input of ``input_shape`` raises ``error`` matching ``says``."""
    import pytest

    with pytest.raises(error, match=says):
        param_shapes(model, input_shape)
