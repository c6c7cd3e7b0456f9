"""jcnn.nnx.Sequential and Residual: train forwarding, plain functions, checks."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jcnn import functional as F
from jcnn import nnx as jnnx


class _NeedsTrain(nnx.Module):
    def __call__(self, x, train):
        return x + (1.0 if train else 0.0)


def test_sequential_forwards_train_only_where_taken_and_when_given():
    net = jnnx.Sequential([F.relu, _NeedsTrain(), jnnx.Dropout(0.0)])
    x = jnp.array([[-1.0, 2.0]])
    np.testing.assert_array_equal(net(x, train=True), [[1.0, 3.0]])
    np.testing.assert_array_equal(net(x, train=False), [[0.0, 2.0]])
    with pytest.raises(ValueError, match=r"train: layer 1 \(_NeedsTrain\) needs train"):
        net(x)
    assert isinstance(net.layers, nnx.List) and net.layers[0] is F.relu


def test_residual_adds_the_shortcut_and_checks_shapes():
    block = jnnx.Residual(_NeedsTrain())
    x = jnp.array([[1.0, 2.0]])
    np.testing.assert_array_equal(block(x, train=True), [[3.0, 5.0]])
    with pytest.raises(ValueError, match="projection"):
        jnnx.Residual(jnnx.Dense(2, 3, rngs=nnx.Rngs(0)))(x)


def test_container_arguments_are_checked():
    with pytest.raises(TypeError, match="layers"):
        jnnx.Sequential(F.relu)
    with pytest.raises(TypeError, match="entry 1"):
        jnnx.Sequential([F.relu, 3])
    with pytest.raises(TypeError, match="body"):
        jnnx.Residual(None)
    with pytest.raises(TypeError, match="projection"):
        jnnx.Residual(F.relu, projection=2)
