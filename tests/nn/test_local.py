"""jcnn.nn.LocallyConnected: argument checks (the op itself is tested in
tests/functional/test_local.py, the NNX parity in tests/nnx/test_convert.py)."""

import jax
import jax.numpy as jnp
import pytest

from jcnn import nn


def test_use_bias_must_be_a_bool():
    layer = nn.LocallyConnected(4, 3, use_bias="no")
    with pytest.raises(TypeError, match="^use_bias: expected a Python bool, got 'no'"):
        layer.init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))


def test_dtype_sets_the_computation_dtype():
    """As in Conv and Dense: bfloat16 activations with float32 parameters stay bfloat16 with
    dtype=jnp.bfloat16 (promoted to float32 without it); a non-floating dtype is named."""
    x = jnp.ones((2, 5, 5, 3), jnp.bfloat16)
    plain = nn.LocallyConnected(4, 3)
    variables = plain.init(jax.random.key(0), x)
    assert plain.apply(variables, x).dtype == jnp.float32
    half = nn.LocallyConnected(4, 3, dtype=jnp.bfloat16)
    assert half.apply(variables, x).dtype == jnp.bfloat16
    with pytest.raises(TypeError, match="^dtype: expected None or a floating dtype"):
        nn.LocallyConnected(4, 3, dtype=jnp.int32).init(jax.random.key(0), x)


def test_a_window_larger_than_the_input_is_named_kernel_size():
    # it was named `window`, F.locally_connected_output_shape's argument
    with pytest.raises(ValueError, match=r"^kernel_size: the dilated window 9 \(kernel 9, dil"):
        nn.LocallyConnected(4, 9).init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
