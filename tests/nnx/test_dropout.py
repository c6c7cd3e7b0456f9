"""jcnn.nnx.Dropout and SpatialDropout: where the randomness comes from, modes, checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jcnn import functional as F
from jcnn import nnx as jnnx


def test_dropout_draws_from_the_construction_stream_or_the_call():
    x = jnp.ones((4, 50))
    layer = jnnx.Dropout(0.5, rngs=nnx.Rngs(dropout=3))
    expected_stream = nnx.Rngs(dropout=3)["dropout"].fork()
    np.testing.assert_array_equal(layer(x), F.dropout(expected_stream(), x, 0.5))
    np.testing.assert_array_equal(layer(x), F.dropout(expected_stream(), x, 0.5))  # a new mask
    key = jax.random.key(9)
    np.testing.assert_array_equal(layer(x, rngs=key), F.dropout(key, x, 0.5))
    call_rngs = nnx.Rngs(dropout=5)
    np.testing.assert_array_equal(
        layer(x, rngs=call_rngs), F.dropout(nnx.Rngs(dropout=5).dropout(), x, 0.5)
    )


def test_spatial_dropout_drops_whole_channels():
    layer = jnnx.SpatialDropout(0.5, rngs=nnx.Rngs(dropout=0))
    y = np.asarray(layer(jnp.ones((4, 3, 3, 16))))
    per_channel = y.reshape(4, 9, 16)
    assert ((per_channel == 0).all(axis=1) | (per_channel == 2).all(axis=1)).all()
    assert (y == 0).any() and (y == 2).any()


def test_dropout_modes_and_checks():
    x = jnp.ones((2, 4))
    layer = jnnx.Dropout(0.5)
    with pytest.raises(ValueError, match="rngs"):
        layer(x)
    np.testing.assert_array_equal(layer(x, train=False), x)
    layer.eval()
    np.testing.assert_array_equal(layer(x), x)
    np.testing.assert_array_equal(jnnx.Dropout(0.0)(x), x)
    for rate in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"rate: expected a number in \[0, 1\]"):
            jnnx.Dropout(rate)
    for rate in (True, "0.5", None):  # as the Linen twin refuses them
        with pytest.raises(TypeError, match="rate"):
            jnnx.Dropout(rate)
    assert jnnx.Dropout(np.float32(0.25)).rate == 0.25
    with pytest.raises(TypeError, match="rngs"):
        jnnx.Dropout(0.5, rngs=0)
    with pytest.raises(TypeError, match="rngs"):
        jnnx.Dropout(0.5)(x, rngs=3)
    for layer in (jnnx.Dropout, jnnx.SpatialDropout):
        with pytest.raises(TypeError, match="rng_collection: expected the name of an nnx.Rngs"):
            layer(0.5, rng_collection=None)


@pytest.mark.parametrize("layer", [jnnx.Dropout, jnnx.SpatialDropout])
def test_rngs_without_the_stream_is_a_value_error_naming_rngs(layer):
    x = jnp.ones((2, 3, 3, 4))
    message = r"rngs: the nnx.Rngs has no 'dropout' stream \(nor a 'default' one\)"
    with pytest.raises(ValueError, match=message):  # was Flax's KeyError
        layer(0.5, rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match=message):
        layer(0.5)(x, rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match="rngs: the nnx.Rngs has no 'noise' stream"):
        layer(0.5, rng_collection="noise", rngs=nnx.Rngs(dropout=0))
    assert layer(0.5, rngs=nnx.Rngs(3))(x).shape == x.shape  # the default stream serves


@pytest.mark.parametrize("layer", [jnnx.Dropout, jnnx.SpatialDropout])
def test_a_bad_key_at_the_call_is_named_rngs(layer):
    x = jnp.ones((2, 3, 3, 4))
    with pytest.raises(TypeError, match=r"^rngs: expected a jax.random key .*got dtype float32"):
        layer(0.5)(x, rngs=jnp.ones(2))  # was named "key", the functional op's argument
    with pytest.raises(ValueError, match=r"^rngs: expected a single jax.random key, .*\(2,\)"):
        layer(0.5)(x, rngs=jax.random.split(jax.random.key(0), 2))


@pytest.mark.parametrize("rate", [0.5, 0.0])
def test_evaluation_checks_x_as_the_functional_op_does(rate):
    # the module returned x unchecked where F.dropout/F.spatial_dropout(train=False) raise
    with pytest.raises(ValueError, match=r"^x: expected rank >= 3 .*shape \(2, 4\)"):
        jnnx.SpatialDropout(rate, deterministic=True)(jnp.ones((2, 4)))
    for layer in (jnnx.Dropout(rate), jnnx.SpatialDropout(rate)):
        with pytest.raises(TypeError, match="^x: expected an array, got list"):
            layer([[[1.0]]], train=False)
        with pytest.raises(TypeError, match="^x: expected a floating-point array, got dtype int32"):
            layer(jnp.ones((1, 1, 1), jnp.int32), train=False)


@pytest.mark.parametrize("layer", [jnnx.Dropout, jnnx.SpatialDropout])
@pytest.mark.parametrize("bad", [None, 1, "yes"])
def test_deterministic_must_be_a_bool(layer, bad):
    # None was accepted and meant dropping, silently
    with pytest.raises(TypeError, match=f"^deterministic: expected a Python bool, got {bad!r}"):
        layer(0.5, deterministic=bad)
