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
