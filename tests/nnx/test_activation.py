"""jcnn.nnx activations with parameters (PReLU, Maxout): shapes and checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jcnn import nnx as jnnx


def test_prelu_slopes():
    shared = jnnx.PReLU()
    assert shared.alpha.shape == ()
    channelwise = jnnx.PReLU(channelwise=True, alpha_init=0.5, num_features=2)
    channelwise.alpha[...] = jnp.array([0.5, 2.0])
    np.testing.assert_array_equal(
        channelwise(jnp.array([[-2.0, -2.0], [1.0, 3.0]])), [[-1.0, -4.0], [1.0, 3.0]]
    )
    with pytest.raises(ValueError, match="num_features"):
        jnnx.PReLU(channelwise=True)
    with pytest.raises(ValueError, match="num_features"):
        jnnx.PReLU(num_features=3)
    with pytest.raises(ValueError, match="built for 2 features"):
        channelwise(jnp.ones((1, 3)))


def test_prelu_takes_rngs_like_every_module_with_parameters():
    # jcnn.nnx's convention: a module with parameters is built with rngs=nnx.Rngs(...)
    layer = jnnx.PReLU(channelwise=True, num_features=2, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(layer.alpha[...], [0.25, 0.25])
    with pytest.raises(TypeError, match="rngs"):
        jnnx.PReLU(rngs=0)


def test_maxout_learned_and_parameter_free(rng):
    learned = jnnx.Maxout(3, 2, in_features=4, rngs=nnx.Rngs(0))
    assert learned.linear.kernel.shape == (4, 6)
    x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    assert learned(x).shape == (5, 2)
    free = jnnx.Maxout(2)
    assert free.linear is None
    np.testing.assert_array_equal(free(jnp.array([[1.0, 4.0, 3.0, 2.0]])), [[4.0, 3.0]])
    with pytest.raises(ValueError, match="in_features"):
        jnnx.Maxout(2, 3)
    with pytest.raises(ValueError, match="in_features"):
        jnnx.Maxout(2, in_features=3)
    with pytest.raises(TypeError, match="rngs"):
        jnnx.Maxout(2, 3, in_features=4)


def test_maxout_learned_unit_takes_dtype_and_param_dtype(rng):
    """As the Linen twin: float64 parameters (jax_enable_x64), a bfloat16 compute dtype."""
    x = rng.normal(size=(5, 4))
    with jax.enable_x64(True):
        layer = jnnx.Maxout(3, 2, in_features=4, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        assert layer.linear.kernel[...].dtype == layer.linear.bias[...].dtype == jnp.float64
        y = layer(jnp.asarray(x))
    kernel = np.asarray(layer.linear.kernel[...])
    pieces = (x @ kernel + np.asarray(layer.linear.bias[...])).reshape(5, 2, 3)
    np.testing.assert_allclose(y, pieces.max(-1), rtol=1e-13)
    half = jnnx.Maxout(3, 2, in_features=4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert half(jnp.asarray(x, jnp.float32)).dtype == jnp.bfloat16


def test_prelu_arguments_are_checked_as_in_the_linen_twin():
    with pytest.raises(TypeError, match="^alpha_init: expected a finite number, got 'a'$"):
        jnnx.PReLU(alpha_init="a")
    with pytest.raises(TypeError, match="^channelwise: expected a Python bool, got 'no'$"):
        jnnx.PReLU(channelwise="no", num_features=3)


def test_maxout_wrong_input_size_names_maxout():
    # the learned Maxout's inner Dense is an implementation detail: the error names Maxout
    layer = jnnx.Maxout(3, 2, in_features=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x: Maxout was built for 4 features .*\(5, 3\)"):
        layer(jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="rank >= 1 .* for Maxout"):
        layer(jnp.float32(1.0))
