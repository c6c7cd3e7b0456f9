"""jcnn.nnx.Conv and ConvTranspose: kernel shapes and spatial rank at construction, input
checks, and the functional op they wrap (the Linen parity is in test_convert.py)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jcnn import functional as F
from jcnn import init
from jcnn import nnx as jnnx


@pytest.mark.parametrize(
    ("kernel_size", "spatial_dims", "shape"),
    [(3, None, (3, 3)), (3, 1, (3,)), (3, 3, (3, 3, 3)), ((2, 5), None, (2, 5)), ((4,), 1, (4,))],
)
def test_conv_kernel_rank_comes_from_kernel_size_or_spatial_dims(kernel_size, spatial_dims, shape):
    layer = jnnx.Conv(6, 4, kernel_size, groups=2, spatial_dims=spatial_dims, rngs=nnx.Rngs(0))
    assert layer.kernel.shape == (*shape, 3, 4)
    transpose = jnnx.ConvTranspose(
        6, 4, kernel_size, groups=2, spatial_dims=spatial_dims, rngs=nnx.Rngs(0)
    )
    assert transpose.kernel.shape == (*shape, 6, 2)


def test_conv_computes_f_conv_with_its_parameters(rng):
    layer = jnnx.Conv(
        3,
        5,
        (3, 2),
        stride=(2, 1),
        padding=((1, 0), (2, 1)),
        dilation=(1, 2),
        bias_init=init.normal(1.0),
        rngs=nnx.Rngs(0),
    )
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 3)), jnp.float32)
    expected = F.conv(
        x,
        layer.kernel[...],
        layer.bias[...],
        stride=(2, 1),
        padding=((1, 0), (2, 1)),
        dilation=(1, 2),
    )
    np.testing.assert_array_equal(layer(x), expected)
    assert not np.allclose(layer.bias[...], 0)


def test_conv_default_initializer_is_he_normal_with_the_grouped_fan_in():
    layer = jnnx.Conv(64, 64, 3, groups=4, use_bias=False, rngs=nnx.Rngs(0))
    assert layer.bias is None
    fan_in = 3 * 3 * 64 // 4
    np.testing.assert_allclose(np.std(layer.kernel[...]), np.sqrt(2 / fan_in), rtol=0.05)


def test_conv_checks_its_arguments_and_input():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="groups: in_features"):
        jnnx.Conv(3, 4, 3, groups=2, rngs=rngs)
    with pytest.raises(ValueError, match="groups: features"):
        jnnx.ConvTranspose(4, 3, 3, groups=2, rngs=rngs)
    with pytest.raises(ValueError, match="spatial_dims"):
        jnnx.Conv(3, 4, (3, 3), spatial_dims=1, rngs=rngs)
    with pytest.raises(ValueError, match="spatial_dims"):
        jnnx.Conv(3, 4, 3, spatial_dims=4, rngs=rngs)
    with pytest.raises(ValueError, match="in_features"):
        jnnx.Conv(0, 4, 3, rngs=rngs)
    with pytest.raises(TypeError, match="rngs"):
        jnnx.Conv(3, 4, 3, rngs=0)
    layer = jnnx.Conv(3, 4, 3, rngs=rngs)
    with pytest.raises(ValueError, match=r"x: expected rank 4 \(N, H, W, C\) for a 2-D Conv"):
        layer(jnp.ones((2, 5, 3)))
    with pytest.raises(ValueError, match="built for 3 features"):
        layer(jnp.ones((2, 5, 5, 2)))
