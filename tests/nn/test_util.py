"""What jcnn/nn/_util.py checks for every Linen module with parameters: ``param_dtype``, and for
the windowed layers an input with channels."""

import jax
import jax.numpy as jnp
import pytest

from jcnn import nn

WITH_PARAMETERS = {
    "Conv": lambda **kw: nn.Conv(2, 3, **kw),
    "DepthwiseConv": lambda **kw: nn.DepthwiseConv(3, **kw),
    "ConvTranspose": lambda **kw: nn.ConvTranspose(2, 3, **kw),
    "Dense": lambda **kw: nn.Dense(2, **kw),
    "LayerNorm": lambda **kw: nn.LayerNorm(**kw),
    "GroupNorm": lambda **kw: nn.GroupNorm(2, **kw),
    "LocallyConnected": lambda **kw: nn.LocallyConnected(2, 3, **kw),
    "PReLU": lambda **kw: nn.PReLU(**kw),
}


@pytest.mark.parametrize("make", WITH_PARAMETERS.values(), ids=WITH_PARAMETERS)
def test_param_dtype_is_checked_by_its_name(make):
    # an int dtype was blamed on "dtype" (or on "alpha"), a bad name raised NumPy's
    # "data type 'floaty' not understood"
    x = jnp.ones((1, 5, 5, 4))
    for param_dtype, got in ((jnp.int32, "int32"), ("floaty", "floaty")):
        with pytest.raises(TypeError, match=f"param_dtype: expected None or a floating.*{got}"):
            make(param_dtype=param_dtype).init(jax.random.key(0), x)
    params = make(param_dtype=jnp.bfloat16).init(jax.random.key(0), x)["params"]
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}


WINDOWED = ("Conv", "DepthwiseConv", "ConvTranspose", "LocallyConnected")


@pytest.mark.parametrize("name", WINDOWED)
def test_an_input_without_channels_is_named(name):
    # Conv, ConvTranspose and LocallyConnected blamed "shape" (their initializer's argument)
    x = jnp.ones((1, 5, 5, 0))
    with pytest.raises(ValueError, match=r"^x: expected at least one channel .* \(1, 5, 5, 0\)"):
        WITH_PARAMETERS[name]().init(jax.random.key(0), x)
