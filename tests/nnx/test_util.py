"""What jcnn/nnx/_util.py checks for every NNX module with parameters: ``param_dtype``."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jcnn import nnx as jnnx

WITH_PARAMETERS = {
    "Conv": lambda r, **kw: jnnx.Conv(3, 2, 3, rngs=r, **kw),
    "DepthwiseConv": lambda r, **kw: jnnx.DepthwiseConv(3, 3, rngs=r, **kw),
    "ConvTranspose": lambda r, **kw: jnnx.ConvTranspose(3, 2, 3, rngs=r, **kw),
    "Dense": lambda r, **kw: jnnx.Dense(3, 2, rngs=r, **kw),
    "BatchNorm": lambda r, **kw: jnnx.BatchNorm(3, rngs=r, **kw),
    "LayerNorm": lambda r, **kw: jnnx.LayerNorm(3, rngs=r, **kw),
    "GroupNorm": lambda r, **kw: jnnx.GroupNorm(4, 2, rngs=r, **kw),
    "InstanceNorm": lambda r, **kw: jnnx.InstanceNorm(3, rngs=r, **kw),
    "LocallyConnected": lambda r, **kw: jnnx.LocallyConnected(
        3, 2, 3, input_size=(5, 5), rngs=r, **kw
    ),
    "PReLU": lambda r, **kw: jnnx.PReLU(rngs=r, **kw),
}


@pytest.mark.parametrize("make", WITH_PARAMETERS.values(), ids=WITH_PARAMETERS)
def test_param_dtype_is_checked_by_its_name(make):
    # an int dtype was blamed on "dtype" (or on "alpha" at the call), a bad name raised NumPy's
    # "data type 'floaty' not understood"
    with pytest.raises(TypeError, match="param_dtype: expected None or a floating dtype.*int32"):
        make(nnx.Rngs(0), param_dtype=jnp.int32)
    with pytest.raises(TypeError, match="param_dtype: expected None or a floating dtype.*floaty"):
        make(nnx.Rngs(0), param_dtype="floaty")
    layer = make(nnx.Rngs(0), param_dtype=jnp.bfloat16)
    assert {p.dtype for p in jax.tree.leaves(nnx.state(layer, nnx.Param))} == {
        jnp.dtype("bfloat16")
    }
