"""jcnn.nnx.Dense and Flatten: shapes, the affine map, input checks."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jcnn import init
from jcnn import nnx as jnnx


def test_dense_is_the_affine_map_of_the_last_axis(rng):
    layer = jnnx.Dense(5, 3, bias_init=init.normal(1.0), rngs=nnx.Rngs(0))
    x = rng.normal(size=(2, 4, 5)).astype(np.float32)
    expected = x @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])
    np.testing.assert_allclose(layer(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)
    assert jnnx.Dense(5, 3, use_bias=False, rngs=nnx.Rngs(0)).bias is None


def test_dense_and_flatten_check_their_input():
    layer = jnnx.Dense(5, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="built for 5 features"):
        layer(jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="scalar"):
        layer(jnp.float32(1.0))
    with pytest.raises(ValueError, match="features"):
        jnnx.Dense(5, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="scalar"):
        jnnx.Flatten()(jnp.float32(1.0))
    x = jnp.arange(24.0).reshape(2, 3, 2, 2)
    np.testing.assert_array_equal(jnnx.Flatten()(x), np.arange(24.0).reshape(2, 12))
    # an empty batch: reshape(0, -1) raised a raw ZeroDivisionError
    assert jnnx.Flatten()(jnp.ones((0, 3, 2, 2))).shape == (0, 12)


def test_a_non_floating_compute_dtype_is_a_type_error():
    # refused at construction, as every setting of an NNX module (it was at the first call)
    with pytest.raises(TypeError, match="dtype: expected None or a floating dtype"):
        jnnx.Dense(3, 2, dtype=jnp.int32, rngs=nnx.Rngs(0))
