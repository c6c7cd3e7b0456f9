"""jcnn.nn.Dropout / SpatialDropout: identity in evaluation, masks and scaling in training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import nn


def test_dropout_train_vs_eval_and_gradient():
    layer = nn.Dropout(0.25)
    x = jnp.asarray(np.arange(1.0, 2001.0).reshape(4, 500), jnp.float32)
    np.testing.assert_array_equal(layer.apply({}, x, train=False), x)
    apply = jax.jit(lambda x, key: layer.apply({}, x, train=True, rngs={"dropout": key}))
    y = apply(x, jax.random.key(0))
    kept = np.asarray(y) != 0
    assert 0.7 < kept.mean() < 0.8
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
    # Same rng, same mask; another rng, another mask.
    np.testing.assert_array_equal(apply(x, jax.random.key(0)), y)
    assert (np.asarray(apply(x, jax.random.key(1))) != 0).tolist() != kept.tolist()
    grad = jax.jit(
        jax.grad(
            lambda x: jnp.sum(layer.apply({}, x, train=True, rngs={"dropout": jax.random.key(0)}))
        )
    )(x)
    np.testing.assert_allclose(grad, kept / 0.75, rtol=1e-6)


def test_spatial_dropout_drops_whole_channels():
    layer = nn.SpatialDropout(0.5)
    x = jnp.ones((8, 5, 5, 16))
    np.testing.assert_array_equal(layer.apply({}, x, train=False), x)
    y = np.asarray(layer.apply({}, x, train=True, rngs={"dropout": jax.random.key(3)}))
    per_channel = y.reshape(8, 25, 16)
    assert (per_channel == per_channel[:, :1]).all()  # constant over space
    assert set(np.unique(y)) == {0.0, 2.0}
    assert 0.3 < (per_channel[:, 0] == 0).mean() < 0.7


def test_dropout_argument_errors():
    with pytest.raises(ValueError, match="rate"):
        nn.Dropout(1.5).apply({}, jnp.ones(3), train=False)
    with pytest.raises(Exception, match="dropout"):
        nn.Dropout(0.5).apply({}, jnp.ones(3), train=True)  # no "dropout" rng given
    with pytest.raises(TypeError, match="train"):
        nn.Dropout(0.5).apply({}, jnp.ones(3))


@pytest.mark.parametrize("module", [nn.Dropout(0.5), nn.SpatialDropout(0.5)])
def test_training_without_a_dropout_rng_names_rngs(module):
    with pytest.raises(ValueError, match=r"^rngs: \w+ is training but has no randomness"):
        module.apply({}, jnp.ones((2, 3, 4)), train=True)


@pytest.mark.parametrize("rate", [0.5, 0.0])
def test_evaluation_checks_x_as_the_functional_op_does(rate):
    # the module returned x unchecked where F.dropout/F.spatial_dropout(train=False) raise
    with pytest.raises(ValueError, match=r"^x: expected rank >= 3 .*shape \(2, 4\)"):
        nn.SpatialDropout(rate).apply({}, jnp.ones((2, 4)), train=False)
    for layer in (nn.Dropout(rate), nn.SpatialDropout(rate)):
        with pytest.raises(TypeError, match="^x: expected an array, got list"):
            layer.apply({}, [[[1.0]]], train=False)
        with pytest.raises(TypeError, match="^x: expected a floating-point array, got dtype int32"):
            layer.apply({}, jnp.ones((1, 1, 1), jnp.int32), train=False)
